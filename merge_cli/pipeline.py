"""The pipeline: load → align → fuse → save → evaluate, driven by a validated Recipe.

This is the only module that knows the stage order. It offers the CLI what each command
needs: :func:`run` (every stage), :func:`run_evaluation` (``merge-cli eval``: load, align,
evaluate), :func:`check` (``validate``: every check a run makes before reading tensor data)
and :func:`plan` (``plan``). Each stage lives in its own package and never imports this
module; everything a run needs is in the :class:`Recipe` and the
:class:`~merge_cli.options.RunOptions`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from merge_cli.align.stage import align_models, repair_output
from merge_cli.engine.executor import torch_threads
from merge_cli.engine.method import Method, ModelMethod
from merge_cli.errors import CheckpointError, PublishError, TaskError
from merge_cli.evaluate.stage import default_report_path, evaluate_recipe
from merge_cli.fuse import METHODS
from merge_cli.fuse.adapters.combine import fuse_adapters, plan_adapter_merge
from merge_cli.fuse.adapters.extract import extract_recipe, plan_extraction
from merge_cli.fuse.stage import (
    fuse_models,
    plan_merge,
    plan_streaming,
    plan_summary,
    plan_whole_model,
    prepare_vocabulary,
)
from merge_cli.io.adapters import open_model
from merge_cli.io.checkpoint import Checkpoint
from merge_cli.io.hub import push_blocker, push_folder
from merge_cli.options import DEFAULT_CHUNK_BYTES, RunOptions
from merge_cli.recipe import Recipe
from merge_cli.save import CardInputs, check_output_target, input_paths, update_model_card
from merge_cli.task import task_problems

__all__ = [
    "RunOptions",
    "RunResult",
    "check",
    "check_publishing",
    "run_evaluation",
    "method_of",
    "open_models",
    "plan",
    "run",
    "stage_names",
]


@dataclass
class RunResult:
    """What a run produced, for the CLI's summary and ``--json``."""

    output: Path | None
    plan: dict[str, Any] | None
    seconds: float
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    report: dict[str, Any] = field(default_factory=dict)
    #: The URL of the Hub commit holding the output (``save.push_to_hub``).
    commit_url: str | None = None


def stage_names(recipe: Recipe) -> list[str]:
    """The stages a run of ``recipe`` goes through, in order (as ``merge-cli plan`` shows)."""
    stages = ["load"]
    if recipe.align:
        stages.append(f"align ({recipe.align.method})")
    if recipe.fuse and recipe.fuse.output == "adapter":
        stages += [f"fuse ({recipe.fuse.method}, adapter space)", "save (adapter)"]
    elif recipe.fuse:
        stages += [f"fuse ({recipe.fuse.method})", "save"]
        if recipe.align and recipe.align.repair:
            stages.append("repair")
    if recipe.extract:
        stages += ["extract-lora", "save (adapter)"]
    if recipe.evaluate:
        stages.append("evaluate")
    if recipe.fuse and recipe.save is not None and recipe.save.push_to_hub is not None:
        stages.append(f"upload ({recipe.save.push_to_hub.repo_id})")
    return stages


def open_models(recipe: Recipe, names: list[str] | None = None) -> dict[str, Checkpoint]:
    """Open (headers only) the recipe's models, or those named: a quantized one through a
    view that dequantizes on read (refusing, from headers, what it cannot), a model with a
    ``lora`` adapter as its base seen through the adapter (applied on read)."""
    return {
        name: open_model(recipe.models[name].path, recipe.models[name].lora)
        for name in (names if names is not None else list(recipe.models))
    }


def method_of(recipe: Recipe) -> Method:
    """The registry entry of the recipe's fuse method (the recipe is validated)."""
    assert recipe.fuse is not None
    return METHODS[recipe.fuse.method]


def run(recipe: Recipe, options: RunOptions | None = None) -> RunResult:
    """Run every stage of ``recipe`` (on ``options.threads`` torch threads when set); with
    ``save.push_to_hub``, upload the complete output last (its card holding the evaluation
    results)."""
    options = options or RunOptions()
    check_publishing(recipe)
    with torch_threads(options.threads):
        return _run(recipe, options)


def _run(recipe: Recipe, options: RunOptions) -> RunResult:
    started = time.perf_counter()
    checkpoints = open_models(recipe)
    if recipe.fuse is not None and recipe.save is not None:
        check_output_target(
            Path(recipe.save.path),
            [*input_paths(recipe, checkpoints), *options.protected],
            options.overwrite,
        )
    output = None
    summary = None
    report: dict[str, Any] = {}
    if recipe.align is not None:
        checkpoints = align_models(recipe, checkpoints, options)
    if recipe.extract is not None:
        output, summary, _ = extract_recipe(recipe, checkpoints, options)
    elif recipe.fuse is not None and recipe.fuse.output == "adapter":
        output, summary = fuse_adapters(recipe, checkpoints, options)
    elif recipe.fuse is not None:
        fused = fuse_models(recipe, method_of(recipe), checkpoints, options)
        output, summary, report = fused.output, fused.plan, fused.report
        if recipe.align is not None and recipe.align.repair:
            output = repair_output(recipe, checkpoints, output, options)
    evaluation: list[dict[str, Any]] = []
    if recipe.evaluate:
        evaluation = evaluate_recipe(recipe, checkpoints, output, options)
        if output is not None and recipe.fuse is not None:
            update_model_card(
                recipe, output, CardInputs(method_of(recipe), checkpoints), evaluation
            )
    commit_url = None
    push = recipe.save.push_to_hub if recipe.save is not None else None
    if push is not None and output is not None:
        options.progress.note(f"uploading {output} to {push.repo_id}")
        commit_url = push_folder(
            output, push.repo_id, push.private, push.revision, push.commit_message
        )
    seconds = time.perf_counter() - started
    return RunResult(output, summary, seconds, evaluation, report, commit_url)


def check_publishing(recipe: Recipe) -> None:
    """Refuse a ``save.push_to_hub`` this environment cannot honour (offline, no token)
    before any merge work. A :class:`PublishError` (exit 1): the recipe is valid, the
    machine cannot upload; the repository id itself is checked with the recipe (exit 2)."""
    if recipe.save is None or recipe.save.push_to_hub is None:
        return
    blocker = push_blocker()
    if blocker is not None:
        raise PublishError(f"save.push_to_hub: {blocker}")


def run_evaluation(
    recipe: Recipe,
    options: RunOptions,
    merged: str | None = None,
    report: Path | None = None,
) -> tuple[list[dict[str, Any]], Path | None]:
    """``merge-cli eval``: the evaluate stage alone, on existing checkpoints (no fuse).

    ``merged`` is the fused model to score as ``merged`` (default: ``save.path`` when it
    exists). Alignment runs first when the recipe has it, as in a full run. Returns the rows
    and the report written (``None`` when there was nowhere to write it)."""
    with torch_threads(options.threads):
        return _run_evaluation(recipe, options, merged, report)


def _run_evaluation(
    recipe: Recipe, options: RunOptions, merged: str | None, report: Path | None
) -> tuple[list[dict[str, Any]], Path | None]:
    checkpoints = open_models(recipe)
    if recipe.align is not None:
        checkpoints = align_models(recipe, checkpoints, options)
    merged_path = Path(merged) if merged is not None else None
    if merged_path is None and recipe.save is not None and Path(recipe.save.path).exists():
        merged_path = Path(recipe.save.path)
    if merged_path is not None and not merged_path.exists():
        raise CheckpointError(f"--merged {merged_path}: no such file or directory")
    report = report or default_report_path(recipe, merged_path)
    rows = evaluate_recipe(recipe, checkpoints, merged_path, options, report)
    return rows, report


def check(recipe: Recipe, protected: tuple[Path, ...] = ()) -> None:
    """Every check a run makes before reading tensor data: that an upload can start (with
    ``save.push_to_hub``: online, a token), the inputs' headers, the output directory (never
    an input, nor ``protected``, nor a directory holding one), each model's task (its
    functions' signatures, its model against the checkpoint's headers), the vocabularies,
    and a streaming method's plan (names, shapes, dtypes)."""
    check_publishing(recipe)
    opened = open_models(recipe)
    if recipe.fuse is not None and recipe.save is not None:
        check_output_target(
            Path(recipe.save.path), [*input_paths(recipe, opened), *protected], overwrite=False
        )
    problems = []
    for name, checkpoint in opened.items():
        spec = recipe.task_for(name)
        if spec is not None:
            own = recipe.models[name].task is not None
            problems += task_problems(spec, checkpoint, f"models.{name}.task" if own else "task")
    if problems:
        raise TaskError("\n".join(dict.fromkeys(problems)))
    checkpoints, _ = prepare_vocabulary(recipe, opened)
    if recipe.extract is not None:
        plan_extraction(recipe, checkpoints)
    if recipe.fuse is not None and recipe.fuse.output == "adapter":
        plan_adapter_merge(recipe, checkpoints)
    elif recipe.fuse is not None:
        method = method_of(recipe)
        if isinstance(method, ModelMethod):
            if method.preflight is not None:
                method.preflight(recipe)
        else:
            plan_merge(recipe, method, checkpoints)


def plan(recipe: Recipe, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict[str, Any]:
    """What a run will do, from headers only: its stages and, with a fuse stage, the bytes
    read and written, the shards and the expected peak memory (streaming methods) or the
    models and cache needs (whole-model methods)."""
    checkpoints, union = prepare_vocabulary(recipe, open_models(recipe))
    summary: dict[str, Any] = {"stages": stage_names(recipe)}
    if recipe.extract is not None:
        return {**summary, "streaming": True, **plan_extraction(recipe, checkpoints)}
    if recipe.fuse is None:
        return summary
    if recipe.fuse.output == "adapter":
        return {**summary, "streaming": True, **plan_adapter_merge(recipe, checkpoints).summary()}
    method = method_of(recipe)
    if isinstance(method, ModelMethod):
        if method.preflight is not None:
            method.preflight(recipe)
        return {**summary, "streaming": False, **plan_whole_model(recipe, method, checkpoints)}
    merge_plan, _ = plan_streaming(recipe, method, checkpoints, union)
    streaming = plan_summary(method, merge_plan, checkpoints, chunk_bytes)
    return {**summary, "streaming": True, **streaming}
