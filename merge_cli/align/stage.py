"""The align stage as the pipeline runs it, and REPAIR after the fuse step.

:func:`align_models` resolves the recipe's spec, runs the aligner and returns the reference
checkpoint unchanged and every other model as a lazy :class:`PermutedCheckpoint` view, so
the fuse step still streams (and any fuse method composes with alignment). ZipIt! maps the
reference too (see :mod:`merge_cli.align.zipit`). :func:`repair_output` applies REPAIR to
the saved fused checkpoint and rewrites it in place.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from merge_cli.align import ALIGNERS
from merge_cli.align.checks import reference_name
from merge_cli.align.context import AlignContext
from merge_cli.align.fx_spec import derive_spec
from merge_cli.align.permuted import PermutedCheckpoint
from merge_cli.align.repair import repair_state_dict
from merge_cli.align.spec import BUILTIN_SPECS, PermutationSpec, load_spec_file, validate_spec
from merge_cli.errors import PlanError
from merge_cli.io.checkpoint import Checkpoint, InMemoryCheckpoint, read_state_dict
from merge_cli.io.resolve import open_checkpoint
from merge_cli.options import RunOptions
from merge_cli.recipe import Recipe
from merge_cli.save import save_checkpoint
from merge_cli.task import Task

_LLAMA_TYPES = {"llama", "mistral", "qwen2", "qwen3"}


def resolve_spec(name: str, checkpoint: Checkpoint, task: Task | None) -> PermutationSpec:
    """A built-in spec, a spec file, or (``auto``) one derived from ``task.model``."""
    # Only built where the spec needs it (never a transformers model: that would allocate it)
    buildable = task is not None and task.spec.model not in (None, "transformers")
    model = task.build_model(checkpoint) if buildable and name in ("auto", "mlp", "cnn") else None
    if name == "auto":
        if model is not None and task is not None:
            if task.spec.data is not None:
                example = next(iter(task.data("train")))[0]
            else:
                first = next((m for m in model.modules() if isinstance(m, torch.nn.Linear)), None)
                if first is None:
                    raise PlanError("align.spec: auto needs task.data for an example input")
                example = torch.zeros(2, first.in_features)
            return derive_spec(model, example)
        config = checkpoint.directory / "config.json" if checkpoint.directory else None
        if (
            config is not None
            and config.exists()
            and json.loads(config.read_text()).get("model_type") in _LLAMA_TYPES
        ):
            return BUILTIN_SPECS["llama"](checkpoint, None)
        raise PlanError(
            "align.spec: auto needs task.model (traced with torch.fx) or a Llama-style "
            "config.json; name a built-in spec (mlp, cnn, resnet, llama) or a spec file"
        )
    if name in BUILTIN_SPECS:
        order = [n for n, _ in model.named_modules()] if model is not None else None
        return BUILTIN_SPECS[name](checkpoint, order)
    return load_spec_file(Path(name), checkpoint)


def alignment_spec(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> PermutationSpec:
    assert recipe.align is not None
    reference = reference_name(recipe)
    task_spec = recipe.task_for(reference)
    task = Task(task_spec) if task_spec is not None else None
    spec = resolve_spec(recipe.align.spec, checkpoints[reference], task)
    for name, checkpoint in checkpoints.items():
        validate_spec(spec, checkpoint, f"align.spec ({recipe.align.spec}) on model {name!r}")
    if not spec.groups:
        raise PlanError(f"align.spec ({recipe.align.spec}): found no permutable units")
    return spec


def align_models(
    recipe: Recipe, checkpoints: dict[str, Checkpoint], options: RunOptions
) -> dict[str, Checkpoint]:
    """Every model in the reference's unit order (lazy views; the reference unchanged)."""
    assert recipe.align is not None
    aligner = ALIGNERS[recipe.align.method]
    params = aligner.params.model_validate(recipe.align.params)
    reference = reference_name(recipe)
    task_spec = recipe.task_for(reference)
    context = AlignContext(
        Task(task_spec) if task_spec is not None else None, options.progress.note, options.device
    )
    started = time.perf_counter()
    spec = alignment_spec(recipe, checkpoints)
    options.progress.note(
        f"align ({aligner.name}, spec {spec.name}): {len(spec.groups)} groups, "
        f"reference {reference!r}"
    )
    maps = aligner.align(checkpoints, reference, spec, params, context)
    options.progress.note(f"align done in {time.perf_counter() - started:.2f} s")
    return {
        name: PermutedCheckpoint(checkpoint, spec, maps[name]) if name in maps else checkpoint
        for name, checkpoint in checkpoints.items()
    }


def repair_output(
    recipe: Recipe, checkpoints: dict[str, Checkpoint], output: Path, options: RunOptions
) -> Path:
    """REPAIR the saved fused model (``align.repair: true``) and save it in its place."""
    assert recipe.align is not None and recipe.fuse is not None
    task_spec = recipe.task_for(reference_name(recipe))
    assert task_spec is not None
    fused = recipe.fuse.model_names(list(recipe.models))
    weights = [float(recipe.fuse.model_values(n).get("weight", 1.0)) for n in fused]
    merged = open_checkpoint(str(output))
    state = read_state_dict(merged)
    started = time.perf_counter()
    repaired = repair_state_dict(
        Task(task_spec),
        alignment_spec(recipe, checkpoints),
        state,
        [checkpoints[n] for n in fused],
        weights,
        recipe.align.params.get("max_batches"),
    )
    options.progress.note(f"repair done in {time.perf_counter() - started:.2f} s")
    return save_checkpoint(
        recipe,
        InMemoryCheckpoint(repaired, source=str(output), directory=output),
        checkpoints,
        replace(options, overwrite=True),
    )
