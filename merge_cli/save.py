"""The save stage: a fused model into its output directory.

Streaming plans run through the executor into the sharded writer (a temporary sibling
directory, renamed into place when complete); a whole-model method's result is saved the
same way, as a plan of copied tensors. Beside the weights: the base's config and tokenizer
files (``save.copy_files``), config updates the plan asks for, a report, and the model card.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from merge_cli.engine.executor import ExecutionOptions, execute
from merge_cli.engine.method import TensorMethod, copy_first
from merge_cli.engine.plan import MergePlan, OutputTensor, output_dtype, split_into_shards
from merge_cli.engine.quantize import quantization_updates
from merge_cli.errors import OutputError, PlanError
from merge_cli.io.checkpoint import Checkpoint, TensorInfo
from merge_cli.io.writer import ShardedWriter
from merge_cli.options import RunOptions
from merge_cli.recipe import Recipe
from merge_cli.task.ensemble import MANIFEST
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


#: Files whose presence marks a directory as a checkpoint or ensemble merge-cli may replace.
OUTPUT_MARKERS = ("model.safetensors.index.json", "model.safetensors", MANIFEST)
#: How much of a README.md is read to see whether it is merge-cli's model card.
CARD_PROBE_BYTES = 4096


def input_paths(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> list[Path]:
    """Every path a run reads its models from: each local reference and each checkpoint's
    directory (a Hub model's snapshot directory included)."""
    paths = [
        Path(entry.path).expanduser()
        for entry in recipe.models.values()
        if not entry.path.startswith("hf://")
    ]
    paths += [c.directory for c in checkpoints.values() if c.directory is not None]
    return paths


def check_output_target(target: Path, protected: Iterable[Path], overwrite: bool) -> None:
    """Refuse an output directory that would destroy what the user did not ask to replace.

    ``target`` may not be, or contain, any of ``protected`` (the inputs, the recipe): the
    old directory is deleted when the new one is in place. With ``overwrite``, an existing
    ``target`` must be an earlier merge-cli output (empty, or holding a merge-cli model
    card, a safetensors checkpoint or an ensemble manifest).
    """
    real = Path(os.path.realpath(target))
    for path in protected:
        resolved = Path(os.path.realpath(path))
        if real == resolved or real in resolved.parents:
            relation = "is" if real == resolved else "contains"
            raise OutputError(
                f"{target}: the output directory {relation} {path}, an input of this run; "
                "writing there would delete it; choose another --out"
            )
    if overwrite and target.is_dir() and not is_merge_cli_output(target):
        raise OutputError(
            f"{target}: exists and is not a merge-cli output (no merge-cli model card, "
            "checkpoint or ensemble manifest); --overwrite only replaces an earlier output, "
            "so remove this directory yourself or choose another --out"
        )


def is_merge_cli_output(directory: Path) -> bool:
    """Whether ``directory`` is empty or looks like an output merge-cli wrote."""
    try:
        entries = {path.name: path for path in directory.iterdir()}
    except OSError:
        return False
    if not entries or any(name in entries for name in OUTPUT_MARKERS):
        return True
    card = entries.get("README.md")
    if card is None or not card.is_file():
        return False
    try:
        with open(card, "rb") as handle:
            head = handle.read(CARD_PROBE_BYTES)
    except OSError:
        return False
    return b"merge-cli" in head


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
            device=options.device,
            chunk_bytes=options.chunk_bytes,
            threads=options.threads,
            allow_nonfinite=options.allow_nonfinite,
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
    # the result of dequantized inputs is plain floating point: no quantization_config
    plan.config_updates = {**quantization_updates(checkpoints[source], None), **plan.config_updates}
    return _write_plan(
        recipe,
        plan,
        COPY_TENSORS,
        {"merged": merged},
        checkpoints[source],
        options,
        ExecutionOptions(
            device="cpu",
            chunk_bytes=options.chunk_bytes,
            threads=options.threads,
            allow_nonfinite=options.allow_nonfinite,
        ),
        report,
        files,
    )


def write_extras(
    recipe: Recipe,
    writer: ShardedWriter,
    config_source: Checkpoint,
    config_updates: dict[str, Any],
) -> None:
    """Copy config/tokenizer files, apply config updates, write the model card."""
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
    if config_updates:
        if "config.json" not in copied:
            raise OutputError(
                f"{config_source.source}: no config.json to update with {config_updates}"
            )
        config = json.loads((writer.temp / "config.json").read_text())
        for key, value in config_updates.items():  # None removes a key
            if value is None:
                config.pop(key, None)
            else:
                config[key] = value
        writer.write_text("config.json", json.dumps(config, indent=2) + "\n")
    if recipe.save.model_card:
        writer.write_text("README.md", model_card(recipe))


def model_card(recipe: Recipe) -> str:
    """A Hugging Face model card holding the recipe and the tool version."""
    recipe_yaml = yaml.safe_dump(
        recipe.model_dump(mode="json", exclude_defaults=True), sort_keys=False
    )
    method = recipe.fuse.method if recipe.fuse else "none"
    sources = "\n".join(
        f"- `{name}`: {entry.path}" + (f" with the LoRA adapter {entry.lora}" if entry.lora else "")
        for name, entry in recipe.models.items()
    )
    return (
        "---\ntags:\n- merge\n- merge-cli\n---\n\n"
        f"# Merged model\n\nThis model was produced by merge-cli {__version__} "
        f"with the `{method}` method from these models:\n\n{sources}\n\n"
        f"## Recipe\n\n```yaml\n{recipe_yaml}```\n"
    )
