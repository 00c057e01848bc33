"""``barrier``: loss and accuracy along a path between two models, and the barrier height.

``points`` evenly spaced models on the path from ``between[0]`` (t = 0) to ``between[1]``
(t = 1) are scored on the task's data; models with BatchNorm get their running statistics
recomputed at every point first (Garipov et al. 2018). The barrier of the loss and of the
error (1 - accuracy) is :func:`~merge_cli.connect.interpolate.loss_barrier` (Entezari et al.
2022; Frankle et al. 2020). ``path: curve`` scores the curve through a trained bend
(``fuse.method: curve``) and, for comparison, the linear path; both are drawn in one plot.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from merge_cli.connect.batchnorm import has_batchnorm, recompute_batchnorm
from merge_cli.connect.interpolate import interpolate_state_dicts, loss_barrier, path_points
from merge_cli.connect.path import BEND_FILE, curve_point, load_bend
from merge_cli.errors import TaskError
from merge_cli.evaluate.plots import plot_paths
from merge_cli.evaluate.registry import MERGED, EvalContext, Metric, MetricParams, MetricResult
from merge_cli.io.checkpoint import read_state_dict
from merge_cli.recipe import EvalSpec, Recipe
from merge_cli.task.scoring import read_weights, score

PATHS = ("linear", "curve")


class BarrierParams(MetricParams):
    split: Literal["train", "val", "test"] = Field("test", description="data split to score on")
    bn_split: Literal["train", "val", "test"] = Field(
        "train", description="split used to recompute BatchNorm statistics at each point"
    )
    bend: str | None = Field(
        None,
        description="path: curve: a model name, a bend file or a curve output directory "
        f"(default: this recipe's curve output, {BEND_FILE})",
    )
    curve: Literal["bezier", "polychain"] | None = Field(
        None, description="curve kind (default: as saved with the bend, else bezier)"
    )


def _bend(context: EvalContext, params: BarrierParams) -> tuple[dict[str, torch.Tensor], str]:
    metadata: dict[str, str] = {}
    if params.bend is not None and params.bend in context.checkpoints:
        bend = read_state_dict(context.checkpoints[params.bend])
    else:
        if params.bend is not None:
            where = Path(params.bend)
        elif MERGED in context.checkpoints and context.checkpoints[MERGED].directory:
            where = context.checkpoints[MERGED].directory  # type: ignore[assignment]
        else:
            raise TaskError("barrier: path: curve needs a bend (params.bend or a curve fuse stage)")
        bend, metadata = load_bend(where)
    return bend, params.curve or metadata.get("curve", "bezier")


def run_barrier(context: EvalContext, spec: EvalSpec, params: BarrierParams) -> MetricResult:
    assert spec.between is not None
    first, second = spec.between
    task = context.task(first)
    start = read_weights(context.checkpoint(first), context.progress, first)
    end = read_weights(context.checkpoint(second), context.progress, second)
    model = task.build_model(context.checkpoint(first)).to(context.device)
    statistics_data = list(task.data(params.bn_split)) if has_batchnorm(model) else []
    data = list(task.data(params.split))
    causal = task.spec.loss == "causal_lm"

    paths = {"linear": lambda t: interpolate_state_dicts(start, end, t)}
    kind = None
    if spec.path == "curve":
        bend, kind = _bend(context, params)
        paths["curve"] = lambda t: curve_point(start, bend, end, t, kind)

    points = path_points(spec.points)
    values: dict[str, dict[str, list[float]]] = {}
    for path_name, point_at in paths.items():
        losses, accuracies = [], []
        context.progress.note(f"barrier {first} ↔ {second}: {path_name} path, {len(points)} points")
        for t in points:
            model.load_state_dict(point_at(t), strict=True)
            model.to(context.device)
            recompute_batchnorm(model, statistics_data, context.device)
            scores = score(model, data, task.loss, context.device, causal)
            losses.append(scores.loss)
            accuracies.append(scores.accuracy)
        values[path_name] = {"loss": losses, "accuracy": accuracies}

    label = f"{first} ↔ {second}"
    rows, details = [], {"between": [first, second], "points": points, "split": params.split}
    for path_name, curves in values.items():
        errors = [1.0 - a for a in curves["accuracy"]]
        summary = {
            "loss_barrier": loss_barrier(curves["loss"]),
            "error_barrier": loss_barrier(errors),
            "max_loss": max(curves["loss"]),
            "min_accuracy": min(curves["accuracy"]),
        }
        details[path_name] = {**curves, **summary}
        for key in ("loss_barrier", "error_barrier"):
            rows.append(
                {
                    "metric": key,
                    "model": label,
                    "split": params.split,
                    "value": summary[key],
                    "path": path_name,
                }
            )
    if kind is not None:
        details["curve_kind"] = kind
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{first}_{second}")
    aligned = _alignment(context.recipe, first, second)
    if aligned:
        details["aligned"] = aligned
    if context.report_dir is None:
        return MetricResult(rows, details)
    title = f"{label}{f', {aligned}' if aligned else ''} ({params.split} split)"
    plot = plot_paths(points, values, title, context.report_dir / f"barrier_{safe}.png")
    return MetricResult(rows, details, [plot])


def _alignment(recipe: Recipe, first: str, second: str) -> str | None:
    """How the pair was aligned before scoring (the plot's title says so), or None."""
    if recipe.align is None:
        return None
    # the reference as merge_cli.align.checks.reference_name picks it (a sibling stage)
    reference = recipe.align.reference or (recipe.fuse.base if recipe.fuse else None)
    reference = reference or next(iter(recipe.models))
    moved = [name for name in (first, second) if name != reference]
    if not moved:
        return None
    return f"{' and '.join(moved)} aligned to {reference} by {recipe.align.method}"


def _check(recipe: Recipe, spec: EvalSpec, params: BarrierParams, where: str) -> list[str]:
    problems = []
    if spec.path not in PATHS:
        problems.append(f"{where}.path: expected one of {', '.join(PATHS)}, got {spec.path!r}")
    if spec.path == "curve" and params.bend is None:
        if recipe.fuse is None or recipe.fuse.method != "curve":
            problems.append(
                f"{where}.params.bend: path: curve needs a bend: name a curve output "
                "(directory or bend file) or add a `fuse.method: curve` stage"
            )
    elif (
        params.bend is not None
        and params.bend not in recipe.models
        and not Path(params.bend).exists()
    ):
        problems.append(f"{where}.params.bend: no model or file named {params.bend!r}")
    return problems


BARRIER = Metric(
    name="barrier",
    summary="Loss and accuracy along a linear path or trained curve between two models, "
    "and the barrier height.",
    reference="Frankle et al. 2020 (ICML); Entezari et al. 2022 (ICLR); Garipov et al. 2018",
    run=run_barrier,
    params=BarrierParams,
    needs_task=True,
    pair=True,
    check=_check,
)
