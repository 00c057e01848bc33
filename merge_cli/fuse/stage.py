"""The fuse stage as the pipeline runs it: vocabulary, plan, execution and save.

:func:`fuse_models` runs either kind of method: a per-tensor method's plan is made from
headers (:func:`plan_streaming`) and streamed into the writer; a whole-model method returns
its result, which is saved (unless it wrote its own output). ``merge-cli plan`` and
``validate`` call the planning functions alone, so they see what a run would do before any
tensor is read. The method is passed in: the registry is looked up by the pipeline.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_cli import save
from merge_cli.engine.executor import KEPT_CHUNK_BUDGETS, input_bytes, keeps_inputs
from merge_cli.engine.method import Method, ModelFuseResult, ModelMethod, TensorMethod
from merge_cli.engine.params import plan_params
from merge_cli.engine.plan import MergePlan, build_plan
from merge_cli.engine.quantize import quantized_plan
from merge_cli.engine.vocab import (
    UnionVocabulary,
    is_vocab_tensor,
    match_vocabulary,
    read_union_vocabulary,
    union_vocabulary,
)
from merge_cli.errors import OutputError
from merge_cli.io.checkpoint import Checkpoint
from merge_cli.io.tokenizer import union_tokenizer_files
from merge_cli.options import DEFAULT_CHUNK_BYTES, RunOptions
from merge_cli.recipe import Recipe


@dataclass
class FuseResult:
    """The fuse stage's output directory, its plan summary (streaming methods) and report
    (whole-model methods)."""

    output: Path
    plan: dict[str, Any] | None = None
    report: dict[str, Any] = field(default_factory=dict)


def fuse_models(
    recipe: Recipe, method: Method, checkpoints: dict[str, Checkpoint], options: RunOptions
) -> FuseResult:
    """Fuse the recipe's models with ``method`` and save the result at ``save.path``."""
    checkpoints, union = prepare_vocabulary(recipe, checkpoints)
    if isinstance(method, TensorMethod):
        plan, files = plan_streaming(recipe, method, checkpoints, union)
        summary = plan_summary(method, plan, checkpoints, options.chunk_bytes)
        output = save.save_streaming(recipe, plan, method, checkpoints, options, files)
        return FuseResult(output, summary)
    fused = method.fuse(recipe, checkpoints, options)
    if isinstance(fused, Path):  # the method wrote its own output layout (an ensemble)
        return FuseResult(fused)
    report: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    if isinstance(fused, ModelFuseResult):
        fused, report, files = fused.checkpoint, fused.report, fused.files
    output = save.save_checkpoint(
        recipe, fused, checkpoints, options, report=report, files=files, method=method
    )
    return FuseResult(output, None, report)


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
    recipe: Recipe,
    method: TensorMethod,
    checkpoints: dict[str, Checkpoint],
    union: UnionVocabulary | None,
) -> tuple[MergePlan, dict[str, bytes]]:
    """The plan of a streaming method and the files its output gets besides the copied ones
    (a union vocabulary's tokenizer; its size also goes into the plan's config updates)."""
    plan = plan_merge(recipe, method, checkpoints)
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


def plan_merge(
    recipe: Recipe, method: TensorMethod, checkpoints: dict[str, Checkpoint]
) -> MergePlan:
    """The merge plan of a streaming method, from headers only."""
    spec = recipe.fuse
    assert spec is not None and recipe.save is not None
    model_names = spec.model_names(list(recipe.models))
    params = plan_params(spec, method)
    derived = method.derived_inputs(recipe, checkpoints) if method.derived_inputs else None
    plan = build_plan(
        method,
        params,
        checkpoints,
        model_names,
        spec.base,
        recipe.save.dtype,
        int(recipe.save.shard_size),
        derived,
        spec.params.get("heads"),
    )
    return quantized_plan(plan, checkpoints, recipe.save.quantize, int(recipe.save.shard_size))


def plan_summary(
    method: TensorMethod,
    plan: MergePlan,
    checkpoints: dict[str, Checkpoint],
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict[str, Any]:
    """Bytes read and written, shards, and the expected peak memory of a streaming run."""
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
    in_flight += save.WRITE_BUFFER_CHUNKS * chunk_bytes
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


def plan_whole_model(
    recipe: Recipe, method: ModelMethod, checkpoints: dict[str, Checkpoint]
) -> dict[str, Any]:
    """What a whole-model method will do, from headers only: models, and cache disk needs."""
    assert recipe.fuse is not None
    summary: dict[str, Any] = {
        "method": method.name,
        "models": recipe.fuse.model_names(list(recipe.models)),
        "base": recipe.fuse.base,
        "note": "whole-model method: loads the models and the task's data",
    }
    if method.cache_bytes is not None:
        summary["cache_bytes"] = method.cache_bytes(recipe, checkpoints)
    return summary
