"""The metric registry's entry type and what a metric receives when it runs.

A metric is a plain function ``run(context, spec, params) -> MetricResult`` plus one
:class:`Metric` entry saying which parameters it takes (validated when the recipe is loaded),
whether it needs the recipe's task, and whether it scores ``models`` or a pair ``between``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError
from torch import nn

from merge_cli.errors import TaskError
from merge_cli.io.checkpoint import Checkpoint
from merge_cli.progress import Progress
from merge_cli.recipe import EvalSpec, Recipe, TaskSpec
from merge_cli.task import Task
from merge_cli.task.ensemble import load_ensemble
from merge_cli.task.scoring import Scores, load_weights, score

#: The name under which ``evaluate[].models`` refers to the fused result.
MERGED = "merged"


class MetricParams(BaseModel):
    """Base of metric parameter schemas: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class MetricResult:
    """Rows for the terminal table, details for the JSON report, and plots written."""

    rows: list[dict[str, Any]]
    details: dict[str, Any] = field(default_factory=dict)
    plots: list[Path] = field(default_factory=list)


def task_spec_for(recipe: Recipe, name: str) -> TaskSpec | None:
    """The task a model is scored on: its own, else the recipe's; for ``merged``, the recipe's
    task or else the base's or the first fused model's."""
    if name != MERGED:
        return recipe.task_for(name)
    if recipe.task is not None:
        return recipe.task
    candidates = list(recipe.models)
    if recipe.fuse is not None:
        candidates = [recipe.fuse.base, *recipe.fuse.model_names(candidates)]
    return next((recipe.task_for(n) for n in candidates if n and recipe.task_for(n)), None)


@dataclass
class EvalContext:
    """What every metric sees: the recipe, the opened models (``merged`` included when there
    is one), where to write plots (``None``: nowhere was asked, plot nothing), and a cache of
    scores shared by ``loss`` and ``accuracy``."""

    recipe: Recipe
    checkpoints: dict[str, Checkpoint]
    report_dir: Path | None
    device: str
    progress: Progress
    #: Models that are ensemble directories (``merged`` of an ``ensemble`` fuse): scored as
    #: one module, but they have no single checkpoint for weight-space metrics.
    ensembles: dict[str, Path] = field(default_factory=dict)
    _scores: dict[tuple[str, str, str], Scores] = field(default_factory=dict)

    def default_models(self) -> list[str]:
        return [n for n in self.checkpoints if n != MERGED] + (
            [MERGED] if MERGED in self.checkpoints or MERGED in self.ensembles else []
        )

    def checkpoint(self, name: str) -> Checkpoint:
        if name in self.ensembles:
            raise TaskError(
                f"evaluate: {name!r} is an ensemble directory ({self.ensembles[name]}); "
                "weight-space metrics and paths need a single checkpoint"
            )
        if name not in self.checkpoints:
            raise TaskError(
                f"evaluate: no {name!r} model to evaluate"
                + (
                    " (the recipe has no fuse stage: pass --merged PATH or point save.path at "
                    "an existing checkpoint)"
                    if name == MERGED
                    else ""
                )
            )
        return self.checkpoints[name]

    def task(self, name: str) -> Task:
        spec = task_spec_for(self.recipe, name)
        if spec is None:
            raise TaskError(f"evaluate: no task for model {name!r}")
        return Task(spec)

    def load(self, name: str, task: Task, dtype: torch.dtype | None = None) -> nn.Module:
        """``name``'s weights in ``task``'s model (cast to ``dtype`` when given, before the
        weights are copied in), on the evaluation device."""
        if name in self.ensembles:
            ensemble = load_ensemble(self.ensembles[name], device=self.device)
            return (ensemble if dtype is None else ensemble.to(dtype)).eval()
        checkpoint = self.checkpoint(name)
        model = task.build_model(checkpoint)
        if dtype is not None:
            model.to(dtype)
        load_weights(model, checkpoint, self.progress, name)
        return model.to(self.device).eval()

    def scores(self, name: str, split: str, task_of: str | None) -> Scores:
        """Loss and accuracy of model ``name`` (built by its own task) on ``split`` of its
        task's data, or of ``task_of``'s data and loss."""
        key = (name, task_of or name, split)
        if key not in self._scores:
            task = self.task(task_of or name)
            model = self.load(name, self.task(name))
            self._scores[key] = score(
                model,
                task.data(split),
                task.loss,
                self.device,
                causal=task.spec.loss == "causal_lm",
                progress=self.progress,
                label=f"scoring {name} ({split})",
            )
        return self._scores[key]


RunFn = Callable[[EvalContext, EvalSpec, Any], MetricResult]
CheckFn = Callable[[Recipe, EvalSpec, Any, str], list[str]]


@dataclass(frozen=True)
class Metric:
    """A registry entry: one metric and how to run it."""

    name: str
    summary: str
    reference: str
    run: RunFn
    params: type[BaseModel] = MetricParams
    needs_task: bool = False
    #: True when the metric takes a pair of models in ``between`` (paths), not ``models``.
    pair: bool = False
    #: Extra recipe checks of the metric's own (``path`` values, required files, ...).
    check: CheckFn | None = None


def check_eval_spec(recipe: Recipe, index: int, spec: EvalSpec, metric: Metric) -> list[str]:
    """Problems with one ``evaluate`` entry, for the recipe's error report."""
    where = f"evaluate[{index}]"
    problems = []
    try:
        params = metric.params.model_validate(spec.params)
    except ValidationError as error:
        params = None
        for item in error.errors():
            key = ".".join(str(p) for p in item["loc"])
            if item["type"] == "extra_forbidden":
                allowed = ", ".join(metric.params.model_fields) or "none"
                problems.append(
                    f"{where}.params.{key}: unknown parameter (metric {metric.name!r} takes: "
                    f"{allowed})"
                )
            elif item["type"] == "missing":
                problems.append(f"{where}.params.{key}: required by metric {metric.name!r}")
            else:
                problems.append(f"{where}.params.{key}: {item['msg']}, got {item.get('input')!r}")
    if metric.pair:
        if spec.between is None or len(spec.between) != 2:
            problems.append(f"{where}.between: metric {metric.name!r} needs two model names")
        if spec.models is not None:
            problems.append(f"{where}.models: metric {metric.name!r} takes `between`, not models")
    elif spec.between is not None:
        problems.append(f"{where}.between: only path metrics (barrier) take `between`")
    if metric.needs_task:
        problems += _check_tasks(recipe, spec, metric, getattr(params, "task_of", None), where)
    if (task_of := getattr(params, "task_of", None)) and task_of not in recipe.models:
        problems.append(f"{where}.params.task_of: no model named {task_of!r} in models")
    if metric.check is not None and params is not None:
        problems += metric.check(recipe, spec, params, where)
    return problems


def _check_tasks(
    recipe: Recipe, spec: EvalSpec, metric: Metric, task_of: str | None, where: str
) -> list[str]:
    """Each scored model needs a model builder (its own task's) and data (its own task's, or
    ``task_of``'s)."""
    names = spec.between if metric.pair else spec.models
    if names is None:
        names = list(recipe.models) + ([MERGED] if recipe.fuse is not None else [])
    problems = []
    for name in names:
        own = task_spec_for(recipe, name)
        data = task_spec_for(recipe, task_of) if task_of else own
        if own is None or own.model is None or data is None or data.data is None:
            problems.append(
                f"{where}: metric {metric.name!r} needs a task with `model` and `data` "
                f"for model {name!r} (set the recipe's task: or models.{name}.task)"
            )
    return problems
