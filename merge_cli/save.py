"""The save stage: a fused model into its output directory.

Streaming plans run through the executor into the sharded writer (a temporary sibling
directory, renamed into place when complete); a whole-model method's result is saved the
same way, as a plan of copied tensors. Beside the weights: the base's config and tokenizer
files (``save.copy_files``), config updates the plan asks for, a report, and the model card.
"""

from __future__ import annotations

import fnmatch
import json
from pathlib import Path
from typing import Any

import yaml

from merge_cli.engine.executor import ExecutionOptions, execute
from merge_cli.engine.method import TensorMethod, copy_first
from merge_cli.engine.plan import MergePlan, OutputTensor, output_dtype, split_into_shards
from merge_cli.errors import OutputError, PlanError
from merge_cli.io.checkpoint import Checkpoint, TensorInfo
from merge_cli.io.writer import ShardedWriter
from merge_cli.options import RunOptions
from merge_cli.recipe import Recipe
from merge_cli.version import __version__

#: File in the output directory holding a whole-model method's report (learned coefficients).
REPORT_FILE = "merge_report.json"
#: The writer's buffer, in chunk budgets (16 MiB by default): the bytes of a direct write.
WRITE_BUFFER_CHUNKS = 2
#: The method that writes a whole-model method's result: every tensor is copied.
COPY_TENSORS = TensorMethod(
    name="passthrough",
    family="weight_average",
    summary="Copy every tensor of one checkpoint unchanged.",
    reference="merge-cli",
    merge=copy_first,
)


def save_streaming(
    recipe: Recipe,
    plan: MergePlan,
    method: TensorMethod,
    checkpoints: dict[str, Checkpoint],
    options: RunOptions,
    files: dict[str, bytes] | None = None,
) -> Path:
    """Execute a streaming merge into the recipe's output directory.

    ``files`` (name -> contents) are written after the copied config/tokenizer files,
    replacing those of the same name.
    """
    assert recipe.save is not None and recipe.fuse is not None
    return _write_plan(
        recipe,
        plan,
        method,
        plan.sources(checkpoints),
        checkpoints[plan.config_source],
        options,
        ExecutionOptions(
            device=options.device, chunk_bytes=options.chunk_bytes, threads=options.threads
        ),
        files=files,
    )


def _write_plan(
    recipe: Recipe,
    plan: MergePlan,
    method: TensorMethod,
    sources: dict[str, Checkpoint],
    config_source: Checkpoint,
    options: RunOptions,
    execution: ExecutionOptions,
    report: dict[str, Any] | None = None,
    files: dict[str, bytes] | None = None,
) -> Path:
    """Run ``plan`` into the recipe's output directory (temp sibling, renamed when done)."""
    assert recipe.save is not None and recipe.fuse is not None
    target = Path(recipe.save.path)
    shards = [[TensorInfo(t.name, t.shape, t.dtype) for t in shard] for shard in plan.shards]
    with ShardedWriter(
        target,
        shards,
        plan.shard_file_names(),
        options.overwrite,
        buffer_bytes=WRITE_BUFFER_CHUNKS * options.chunk_bytes,
        # an output of copied tensors only (passthrough) goes file to file in the kernel
        direct=any(tensor.copy_from is None for tensor in plan.tensors),
    ) as writer:
        execute(plan, method, recipe.fuse, sources, writer, execution, options.progress)
        write_extras(recipe, writer, config_source, plan.config_updates)
        if report:
            writer.write_text(REPORT_FILE, json.dumps(report, indent=2) + "\n")
        for relative, data in (files or {}).items():
            writer.write_bytes(relative, data)
        return writer.finish()


def save_checkpoint(
    recipe: Recipe,
    merged: Checkpoint,
    checkpoints: dict[str, Checkpoint],
    options: RunOptions,
    config_source: str | None = None,
    config_updates: dict[str, Any] | None = None,
    report: dict[str, Any] | None = None,
    files: dict[str, bytes] | None = None,
) -> Path:
    """Save a whole-model method's result (any Checkpoint) through the streaming writer.

    A non-empty ``report`` is written beside the weights as :data:`REPORT_FILE`, and
    ``files`` (relative path -> contents) inside the output directory.
    """
    assert recipe.save is not None and recipe.fuse is not None
    tensors = []
    for name in merged.tensor_names():
        info = merged.info(name)
        tensors.append(
            OutputTensor(
                name,
                info.shape,
                output_dtype(info.dtype, recipe.save.dtype),
                copy_from=("merged", name),
            )
        )
    if not tensors:
        raise PlanError(f"fuse ({recipe.fuse.method}) produced no tensors")
    plan = MergePlan(
        tensors=tensors,
        shards=split_into_shards(tensors, int(recipe.save.shard_size)),
        model_names=["merged"],
        base=None,
        config_source="merged",
        config_updates=config_updates or {},
    )
    source = config_source or recipe.fuse.base or recipe.fuse.model_names(list(recipe.models))[0]
    return _write_plan(
        recipe,
        plan,
        COPY_TENSORS,
        {"merged": merged},
        checkpoints[source],
        options,
        ExecutionOptions(device="cpu", chunk_bytes=options.chunk_bytes, threads=options.threads),
        report,
        files,
    )


def write_extras(
    recipe: Recipe,
    writer: ShardedWriter,
    config_source: Checkpoint,
    config_updates: dict[str, Any],
) -> None:
    """Copy config/tokenizer files, apply config updates (and ``save.dtype`` as
    config.json's ``torch_dtype``/``dtype``), write the model card."""
    assert recipe.save is not None
    directory = config_source.directory
    copied: set[str] = set()
    if directory is not None and directory.is_dir():
        for path in sorted(directory.iterdir()):
            if not path.is_file() or path.suffix in (".safetensors", ".bin", ".pt", ".pth"):
                continue
            if path.name in (
                "README.md",
                "model.safetensors.index.json",
                "pytorch_model.bin.index.json",
            ):
                continue
            if any(fnmatch.fnmatch(path.name, pattern) for pattern in recipe.save.copy_files):
                writer.copy_file(path, path.name)
                copied.add(path.name)
    if config_updates and "config.json" not in copied:
        raise OutputError(f"{config_source.source}: no config.json to update with {config_updates}")
    updates = dict(config_updates)
    if recipe.save.dtype != "keep" and "config.json" in copied:
        # transformers reads `dtype` (>= 4.56) or `torch_dtype` (before): with both,
        # from_pretrained(dtype="auto") loads the dtype the shards hold.
        updates.update(torch_dtype=recipe.save.dtype, dtype=recipe.save.dtype)
    if updates:
        config = json.loads((writer.temp / "config.json").read_text())
        config.update(updates)
        writer.write_text("config.json", json.dumps(config, indent=2) + "\n")
    if recipe.save.model_card:
        writer.write_text("README.md", model_card(recipe))


def model_card(recipe: Recipe) -> str:
    """A Hugging Face model card holding the recipe and the tool version."""
    recipe_yaml = yaml.safe_dump(
        recipe.model_dump(mode="json", exclude_defaults=True), sort_keys=False
    )
    method = recipe.fuse.method if recipe.fuse else "none"
    sources = "\n".join(f"- `{name}`: {entry.path}" for name, entry in recipe.models.items())
    return (
        "---\ntags:\n- merge\n- merge-cli\n---\n\n"
        f"# Merged model\n\nThis model was produced by merge-cli {__version__} "
        f"with the `{method}` method from these models:\n\n{sources}\n\n"
        f"## Recipe\n\n```yaml\n{recipe_yaml}```\n"
    )
