"""``loss`` and ``accuracy``: each model scored on a split of its task's data.

Both come from one pass over the data (the context caches it), so asking for both costs one
evaluation per model. ``task_of`` scores every listed model on another model's task: the
usual multi-task view of a merge (the merged model on each fine-tune's data).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from merge_cli.evaluate.registry import EvalContext, Metric, MetricParams, MetricResult
from merge_cli.recipe import EvalSpec


class TaskMetricParams(MetricParams):
    split: Literal["train", "val", "test"] = Field("test", description="data split to score on")
    task_of: str | None = Field(
        None, description="score on this model's task instead of each model's own"
    )


def _rows(context: EvalContext, spec: EvalSpec, params: TaskMetricParams, key: str) -> MetricResult:
    rows = []
    for name in spec.models or context.default_models():
        scores = context.scores(name, params.split, params.task_of)
        row = {"metric": key, "model": name, "split": params.split, "value": getattr(scores, key)}
        if params.task_of:
            row["task"] = params.task_of
        rows.append(row)
    return MetricResult(rows)


def run_loss(context: EvalContext, spec: EvalSpec, params: TaskMetricParams) -> MetricResult:
    """Mean task loss per example."""
    return _rows(context, spec, params, "loss")


def run_accuracy(context: EvalContext, spec: EvalSpec, params: TaskMetricParams) -> MetricResult:
    """Fraction of correct argmax predictions (next-token accuracy for a causal LM)."""
    return _rows(context, spec, params, "accuracy")


LOSS = Metric(
    name="loss",
    summary="Mean task loss of each model on a split of the task's data.",
    reference="the task's loss function (task.loss)",
    run=run_loss,
    params=TaskMetricParams,
    needs_task=True,
)

ACCURACY = Metric(
    name="accuracy",
    summary="Top-1 accuracy of each model on a split of the task's data.",
    reference="argmax of the model's outputs against the targets",
    run=run_accuracy,
    params=TaskMetricParams,
    needs_task=True,
)
