"""What the data-aware (whole-model) fuse methods share: per-model tasks, examples, params.

Each fused model may carry its own ``task`` (``models.NAME.task``: its architecture with its
own head, its fine-tuning data and loss), so everything here goes through
``recipe.task_for(name)``: Fisher merging, RegMean and AdaMerging read each model's
statistics from that model's own data.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_cli.engine.method import ModelMethod
from merge_cli.errors import PlanError, TaskError
from merge_cli.io.checkpoint import Checkpoint
from merge_cli.recipe import Recipe
from merge_cli.task import Batch, Task


class DataParams(BaseModel):
    """Parameters every data-aware method takes."""

    model_config = ConfigDict(extra="forbid")
    heads: str | None = Field(
        None,
        description="task-specific head tensors, kept per model instead of merged: a glob or "
        '"re:" + regex (e.g. "re:^head\\\\."); saved as heads.<model>.<tensor>',
    )


class WeightParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, ge=0, description="this model's weight in the average")


def fused_names(recipe: Recipe) -> list[str]:
    assert recipe.fuse is not None
    return recipe.fuse.model_names(list(recipe.models))


def method_params(recipe: Recipe, method: ModelMethod) -> tuple[Any, dict[str, Any]]:
    """The method's parameters and each fused model's (whole-model methods: no rules)."""
    spec = recipe.fuse
    assert spec is not None
    if spec.rules:
        raise PlanError(
            f"fuse.rules: {method.name} is a whole-model method; per-tensor rules do not apply"
        )
    names = fused_names(recipe)
    values = [spec.params, *(spec.model_values(name) for name in names)]
    for value in values:
        for key, item in value.items():
            if isinstance(item, list):
                raise PlanError(
                    f"fuse: {method.name} is a whole-model method; {key} cannot be a gradient"
                )
    params = method.params.model_validate(
        {k: v for k, v in spec.params.items() if k in method.params.model_fields}
    )
    fields = method.model_params.model_fields
    per_model = {
        name: method.model_params.model_validate(
            {k: v for k, v in {**spec.params, **spec.model_values(name)}.items() if k in fields}
        )
        for name in names
    }
    return params, per_model


def task_of(recipe: Recipe, name: str, method: str) -> Task:
    """Model ``name``'s task (its own, else the recipe's)."""
    spec = recipe.task_for(name)
    if spec is None:
        raise TaskError(f"models.{name}: {method} needs a task (set task: or models.{name}.task)")
    return Task(spec)


#: How many examples of a model's data a statistic uses: a count, or ``all`` of the split.
NumExamples = Annotated[int, Field(ge=1)] | Literal["all"]


def take_examples(batches: Iterable[Batch], limit: int | Literal["all"] | None) -> list[Batch]:
    """The first ``limit`` examples of ``batches`` (all when ``"all"`` or None), as batches."""
    if limit == "all":
        limit = None
    taken: list[Batch] = []
    count = 0
    for inputs, targets in batches:
        if not isinstance(inputs, torch.Tensor):
            raise TaskError("task.data: data-aware merging needs tensor inputs per batch")
        if limit is not None and count + len(inputs) > limit:
            keep = limit - count
            inputs, targets = inputs[:keep], targets[:keep]
        if len(inputs):
            taken.append((inputs, targets))
            count += len(inputs)
        if limit is not None and count >= limit:
            break
    if not taken:
        raise TaskError("task.data: returned no examples")
    return taken


def float_bytes(checkpoint: Checkpoint, names: Iterable[str], per_element: int = 4) -> int:
    """Bytes of float32 statistics the size of ``names``'s floating-point tensors."""
    total = 0
    for name in names:
        info = checkpoint.info(name)
        if info.dtype.is_floating_point:
            total += info.numel * per_element
    return total
