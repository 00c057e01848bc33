"""The pipeline: load → align → fuse → save → evaluate, driven by a validated Recipe.

This module wires the stages together; each stage lives in its own package. It holds no
state of its own: everything a run needs is in the :class:`Recipe` and :class:`RunOptions`.
"""

from __future__ import annotations

import fnmatch
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from merge_cli import __version__, fuse
from merge_cli.errors import OutputError, PlanError
from merge_cli.fuse.executor import (
    DEFAULT_CHUNK_BYTES,
    KEPT_CHUNK_BUDGETS,
    ExecutionOptions,
    execute,
    input_bytes,
    keeps_inputs,
)
from merge_cli.fuse.plan import MergePlan, build_plan, output_dtype
from merge_cli.fuse.registry import Method, ModelFuseResult
from merge_cli.fuse.vocab import (
    UnionVocabulary,
    is_vocab_tensor,
    match_vocabulary,
    read_union_vocabulary,
    union_vocabulary,
)
from merge_cli.io.checkpoint import Checkpoint, TensorInfo
from merge_cli.io.resolve import open_checkpoint
from merge_cli.io.tokenizer import union_tokenizer_files
from merge_cli.io.writer import ShardedWriter
from merge_cli.progress import NullProgress, Progress
from merge_cli.recipe import Recipe

#: File in the output directory holding a whole-model method's report (learned coefficients).
REPORT_FILE = "merge_report.json"
#: The writer's buffer, in chunk budgets (16 MiB by default): the bytes of a direct write.
WRITE_BUFFER_CHUNKS = 2


@dataclass(frozen=True)
class RunOptions:
    device: str = "cpu"
    overwrite: bool = False
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    progress: Progress = field(default_factory=NullProgress)
    #: CPU threads for compute (None: all cores but one, at most 4; executor.compute_threads).
    threads: int | None = None


@dataclass
class RunResult:
    """What a run produced, for the CLI's summary and ``--json``."""

    output: Path | None
    plan: dict[str, Any] | None
    seconds: float
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)


def open_models(recipe: Recipe, names: list[str] | None = None) -> dict[str, Checkpoint]:
    """Open (headers only) the recipe's models, or those named."""
    return {
        name: open_checkpoint(recipe.models[name].path)
        for name in (names if names is not None else list(recipe.models))
    }


def method_of(recipe: Recipe) -> Method:
    assert recipe.fuse is not None
    return fuse.METHODS[recipe.fuse.method]


def prepare_vocabulary(
    recipe: Recipe, checkpoints: dict[str, Checkpoint]
) -> tuple[dict[str, Checkpoint], UnionVocabulary | None]:
    """Apply ``fuse.tokenizer_source``: the checkpoints the fuse stage reads, and the union
    vocabulary when it is ``union`` (reads tokenizer.json files, no tensor data)."""
    spec = recipe.fuse
    if spec is None or spec.tokenizer_source is None:
        return checkpoints, None
    fused = spec.model_names(list(recipe.models))
    reference = spec.base or fused[0]
    if spec.tokenizer_source == "base":
        return match_vocabulary(checkpoints, reference), None
    members = [*fused, *([spec.base] if spec.base else [])]
    union = read_union_vocabulary(checkpoints, members, reference)
    return union_vocabulary(checkpoints, union, spec.base), union


def plan_streaming(
    recipe: Recipe, checkpoints: dict[str, Checkpoint], union: UnionVocabulary | None
) -> tuple[MergePlan, dict[str, bytes]]:
    """The plan of a streaming method and the files its output gets besides the copied ones
    (a union vocabulary's tokenizer; its size also goes into the plan's config updates)."""
    plan = plan_merge(recipe, checkpoints)
    files = union_outputs(recipe, plan, checkpoints, union) if union is not None else {}
    return plan, files


def union_outputs(
    recipe: Recipe, plan: MergePlan, checkpoints: dict[str, Checkpoint], union: UnionVocabulary
) -> dict[str, bytes]:
    """The union tokenizer's files (those ``save.copy_files`` selects; none when the union
    adds no token); records the output's ``vocab_size`` in ``plan.config_updates`` when the
    copied config.json says otherwise."""
    assert recipe.save is not None
    rows = [t.shape[0] for t in plan.tensors if is_vocab_tensor(t.name) and t.shape]
    vocab_size = max(rows, default=union.size)
    config_dir = plan.sources(checkpoints)[plan.config_source].directory
    config_path = config_dir / "config.json" if config_dir is not None else None
    if config_path is not None and config_path.is_file():
        try:
            config = json.loads(config_path.read_text())
        except ValueError as error:
            raise OutputError(f"{config_path}: not valid JSON ({error})") from None
        if config.get("vocab_size") != vocab_size:
            plan.config_updates["vocab_size"] = vocab_size
    directory = checkpoints[union.reference].directory
    if not union.appended or directory is None:
        return {}
    return {
        name: data
        for name, data in union_tokenizer_files(directory, union.appended).items()
        if any(fnmatch.fnmatch(name, pattern) for pattern in recipe.save.copy_files)
    }


def plan_merge(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> MergePlan:
    """The merge plan of a streaming method, from headers only."""
    spec = recipe.fuse
    assert spec is not None and recipe.save is not None
    method = method_of(recipe)
    model_names = spec.model_names(list(recipe.models))
    params = method.params.model_validate(
        {k: v for k, v in spec.params.items() if k in method.params.model_fields}
    )
    derived = method.derived_inputs(recipe, checkpoints) if method.derived_inputs else None
    return build_plan(
        method,
        params,
        checkpoints,
        model_names,
        spec.base,
        recipe.save.dtype,
        int(recipe.save.shard_size),
        derived,
    )


def plan_summary(
    recipe: Recipe,
    plan: MergePlan,
    checkpoints: dict[str, Checkpoint],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, Any]:
    """Bytes read and written, shards, and the expected peak memory of a streaming run."""
    method = method_of(recipe)
    checkpoints = plan.sources(checkpoints)
    read = 0
    largest_chunk = 0
    largest_kept = 0
    for tensor in plan.tensors:
        tensor_bytes = input_bytes(checkpoints, tensor)
        read += tensor_bytes
        if keeps_inputs(method, checkpoints, tensor, chunk_bytes):
            largest_kept = max(largest_kept, tensor_bytes)
        row_elems = max(
            1,
            tensor.nbytes
            // tensor.dtype.itemsize
            // max(1, tensor.shape[0] if tensor.shape else 1),
        )
        rows = tensor.shape[0] if tensor.shape else 1
        chunk_elems = min(rows, max(1, chunk_bytes // (4 * row_elems))) * row_elems
        largest_chunk = max(largest_chunk, chunk_elems * len(tensor.sources))
    # per input element in flight: raw read (<=4 B) + float32 copy (4 B); x2 for read-ahead;
    # plus the float32 result and its cast. Two tensors' statistics (the merge's and the one
    # ahead) may hold their inputs (a tensor read once) and what a method keeps for its merge
    # (TensorJob.keep_bytes). The writer's buffer; the interpreter and torch add ~0.3 GB.
    in_flight = largest_chunk * (4 + 4) * 2 + largest_chunk // max(1, len(plan.model_names)) * 8
    in_flight += WRITE_BUFFER_CHUNKS * chunk_bytes
    if method.statistics is not None:
        in_flight += 2 * (largest_kept + KEPT_CHUNK_BUDGETS * chunk_bytes // 2)
    return {
        "method": method.name,
        "models": plan.model_names,
        "base": plan.base,
        "tensors": len(plan.tensors),
        "merged_tensors": sum(1 for t in plan.tensors if not t.copy_from),
        "copied_tensors": sum(1 for t in plan.tensors if t.copy_from),
        "bytes_read": read,
        "bytes_written": plan.bytes_written,
        "shards": [
            {"file": name, "tensors": len(shard), "bytes": sum(t.nbytes for t in shard)}
            for name, shard in zip(plan.shard_file_names(), plan.shards, strict=True)
        ],
        "expected_peak_memory": in_flight + 300 * 2**20,
        "config_updates": plan.config_updates,
    }


def plan_whole_model(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> dict[str, Any]:
    """What a whole-model method will do, from headers only: models, and cache disk needs."""
    assert recipe.fuse is not None
    method = method_of(recipe)
    summary: dict[str, Any] = {
        "method": method.name,
        "models": recipe.fuse.model_names(list(recipe.models)),
        "base": recipe.fuse.base,
        "note": "whole-model method: loads the models and the task's data",
    }
    if method.cache_bytes is not None:
        summary["cache_bytes"] = method.cache_bytes(recipe, checkpoints)
    return summary


def run(recipe: Recipe, options: RunOptions | None = None) -> RunResult:
    """Run every stage of ``recipe``."""
    options = options or RunOptions()
    started = time.perf_counter()
    checkpoints = open_models(recipe)
    output = None
    summary = None
    report: dict[str, Any] = {}
    if recipe.align is not None:
        from merge_cli.align.stage import align_models

        checkpoints = align_models(recipe, checkpoints, options)
    if recipe.fuse is not None:
        method = method_of(recipe)
        checkpoints, union = prepare_vocabulary(recipe, checkpoints)
        if method.streaming:
            plan, files = plan_streaming(recipe, checkpoints, union)
            summary = plan_summary(recipe, plan, checkpoints, options.chunk_bytes)
            output = save_streaming(recipe, plan, method, checkpoints, options, files)
        else:
            assert method.fuse_model is not None
            merged = method.fuse_model(recipe, checkpoints, options)
            files: dict[str, bytes] = {}
            if isinstance(merged, ModelFuseResult):
                merged, report, files = merged.checkpoint, merged.report, merged.files
            # A method that writes its own output layout (an ensemble directory) returns its path.
            output = (
                merged
                if isinstance(merged, Path)
                else save_checkpoint(
                    recipe, merged, checkpoints, options, report=report, files=files
                )
            )
        if recipe.align is not None and recipe.align.repair:
            from merge_cli.align.stage import repair_output

            output = repair_output(recipe, checkpoints, output, options)
    evaluation: list[dict[str, Any]] = []
    if recipe.evaluate:
        from merge_cli.evaluate.stage import evaluate_recipe

        evaluation = evaluate_recipe(recipe, checkpoints, output, options)
    return RunResult(output, summary, time.perf_counter() - started, evaluation, report)


def save_streaming(
    recipe: Recipe,
    plan: MergePlan,
    method: Method,
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
    method: Method,
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
    from merge_cli.fuse.passthrough import METHOD as PASSTHROUGH
    from merge_cli.fuse.plan import OutputTensor, split_into_shards

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
        PASSTHROUGH,
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
        config.update(config_updates)
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
