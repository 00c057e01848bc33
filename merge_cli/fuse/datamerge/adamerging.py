"""AdaMerging: task-arithmetic coefficients learned by entropy minimisation.

Yang et al. 2024, "AdaMerging: Adaptive Model Merging for Multi-Task Learning" (ICLR).
The merged model is task arithmetic with learned coefficients,
``theta = theta_0 + sum_k lambda_k tau_k`` with task vectors ``tau_k = theta_k - theta_0``:
one ``lambda_k`` per task (``granularity: task``) or one per task and tensor ("layer-wise",
``granularity: layer``, the paper's better variant). Starting from ``init`` (0.3, the
paper's task-arithmetic value), the coefficients minimise the summed Shannon entropy of each
task's predictions on that task's *unlabelled* inputs (the test split by default, as the
paper's test-time adaptation; targets are never read), with Adam, and are clipped to
[0, 1] after each step as in the paper's code. Each task's predictions go through its own
head when ``heads`` is set.

It holds the base and every task vector in memory (``K + 1`` float32 copies of the trunk)
and caches nothing. The learned coefficients go to the run report (``merge_report.json``
beside the output), and ``coefficients: path/to/merge_report.json`` replays them without
reading any data.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch.func import functional_call

from merge_cli.engine.method import ModelFuseResult, ModelMethod
from merge_cli.errors import PlanError
from merge_cli.fuse.datamerge.heads import is_head, shared_trunk, with_heads
from merge_cli.fuse.datamerge.model_data import DataParams, fused_names, method_params, task_of
from merge_cli.io.checkpoint import Checkpoint, InMemoryCheckpoint
from merge_cli.io.dtypes import is_float
from merge_cli.options import RunOptions
from merge_cli.recipe import Recipe
from merge_cli.task import logits_of


class AdaMergingParams(DataParams):
    granularity: Literal["task", "layer"] = Field(
        "layer", description="one coefficient per task, or per task and tensor (layer-wise)"
    )
    init: float = Field(0.3, ge=0, le=1, description="initial coefficient (task arithmetic)")
    steps: int = Field(500, ge=0, description="Adam steps on the entropy objective")
    lr: float = Field(1e-3, gt=0, description="Adam learning rate")
    batch_size: int = Field(16, ge=1, description="unlabelled inputs per task and step")
    split: str = Field("test", description="split whose inputs (never targets) are used")
    coefficients: str | None = Field(
        None, description="merge_report.json of an earlier run: reuse its coefficients, no data"
    )


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of the softmax of ``logits`` over the last axis."""
    log_p = torch.log_softmax(logits.float(), dim=-1)
    return -(log_p.exp() * log_p).sum(-1).mean()


def task_arithmetic(
    base: dict[str, torch.Tensor],
    task_vectors: list[dict[str, torch.Tensor]],
    coefficients: torch.Tensor,
    names: list[str],
) -> dict[str, torch.Tensor]:
    """``base + sum_k lambda_k tau_k``; ``coefficients`` is [K] or [K, len(names)]."""
    merged = {}
    for index, name in enumerate(names):
        value = base[name]
        for k, vector in enumerate(task_vectors):
            weight = coefficients[k] if coefficients.dim() == 1 else coefficients[k, index]
            value = value + weight * vector[name]
        merged[name] = value
    return merged


def _inputs(recipe: Recipe, name: str, split: str) -> torch.Tensor:
    task = task_of(recipe, name, "adamerging")
    batches = [inputs for inputs, _ in task.data(split)]
    if not batches:
        raise PlanError(f"models.{name}: task data split {split!r} is empty")
    return torch.cat(batches)


def learn_coefficients(
    recipe: Recipe,
    checkpoints: dict[str, Checkpoint],
    names: list[str],
    base: dict[str, torch.Tensor],
    task_vectors: list[dict[str, torch.Tensor]],
    merge_names: list[str],
    fixed: dict[str, dict[str, torch.Tensor]],
    params: AdaMergingParams,
    device: str,
) -> tuple[torch.Tensor, list[float]]:
    """Adam on the summed prediction entropy; returns the coefficients and the objective
    before and after (on the first ``16 * batch_size`` inputs of every task)."""
    seed = recipe.fuse.seed if recipe.fuse else 0
    generator = torch.Generator().manual_seed(seed)
    shape = (len(names),) if params.granularity == "task" else (len(names), len(merge_names))
    coefficients = torch.full(shape, params.init, device=device, requires_grad=True)
    models = {
        name: task_of(recipe, name, "adamerging").build_model(checkpoints[name]).to(device).eval()
        for name in names
    }
    for name, model in models.items():
        uncovered = sorted(set(model.state_dict()) - set(fixed[name]) - set(merge_names))
        if uncovered:
            raise PlanError(
                f"models.{name}: task model tensors {uncovered[:5]} are neither in the merged "
                f"trunk nor in the model's heads (fuse.params.heads: {params.heads!r})"
            )
    inputs = {name: _inputs(recipe, name, params.split) for name in names}
    optimizer = torch.optim.Adam([coefficients], lr=params.lr)

    def objective(batch_of) -> torch.Tensor:
        merged = task_arithmetic(base, task_vectors, coefficients, merge_names)
        total = torch.zeros((), device=device)
        for name in names:
            outputs = functional_call(models[name], {**fixed[name], **merged}, (batch_of(name),))
            total = total + entropy(logits_of(outputs))
        return total

    def full(name: str) -> torch.Tensor:
        return inputs[name][: 16 * params.batch_size].to(device)

    with torch.no_grad():
        history = [float(objective(full))]
    for _ in range(params.steps):

        def sample(name: str) -> torch.Tensor:
            data = inputs[name]
            index = torch.randint(len(data), (params.batch_size,), generator=generator)
            return data[index].to(device)

        optimizer.zero_grad()
        objective(sample).backward()
        optimizer.step()
        with torch.no_grad():
            coefficients.clamp_(0.0, 1.0)
    with torch.no_grad():
        history.append(float(objective(full)))
    return coefficients.detach().cpu(), history


def coefficients_report(
    coefficients: torch.Tensor, names: list[str], merge_names: list[str]
) -> dict[str, Any]:
    if coefficients.dim() == 1:
        return {name: float(c) for name, c in zip(names, coefficients, strict=True)}
    return {
        name: {t: float(c) for t, c in zip(merge_names, row, strict=True)}
        for name, row in zip(names, coefficients, strict=True)
    }


def read_coefficients(path: str, names: list[str], merge_names: list[str]) -> torch.Tensor:
    """Coefficients from an earlier run's ``merge_report.json``."""
    try:
        report = json.loads(Path(path).read_text())
        stored = report["coefficients"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise PlanError(f"fuse.params.coefficients: cannot read {path}: {error!r}") from None
    missing = [name for name in names if name not in stored]
    if missing:
        raise PlanError(f"fuse.params.coefficients: {path} has no coefficients for {missing}")
    if all(isinstance(stored[name], int | float) for name in names):
        return torch.tensor([float(stored[name]) for name in names])
    try:
        return torch.tensor([[float(stored[n][t]) for t in merge_names] for n in names])
    except (KeyError, TypeError) as error:
        raise PlanError(
            f"fuse.params.coefficients: {path} does not match these models' tensors ({error!r})"
        ) from None


def fuse_adamerging(recipe: Recipe, checkpoints: dict[str, Checkpoint], options: RunOptions):
    assert recipe.fuse is not None and recipe.fuse.base is not None
    params, _ = method_params(recipe, METHOD)
    names = fused_names(recipe)
    base_name = recipe.fuse.base
    trunk = shared_trunk(checkpoints, names, base_name, params.heads)
    device = options.device
    merge_names = [t for t in trunk.names if is_float(checkpoints[base_name].info(t).dtype)]
    base = {t: checkpoints[base_name].read(t).float().to(device) for t in merge_names}
    task_vectors = [
        {t: checkpoints[name].read(t).float().to(device) - base[t] for t in merge_names}
        for name in names
    ]
    constant = {t: checkpoints[base_name].read(t).to(device) for t in trunk.names if t not in base}
    if params.coefficients is not None:
        coefficients = read_coefficients(params.coefficients, names, merge_names)
        history: list[float] = []
    else:
        fixed = {
            name: {
                **constant,
                **{
                    t: checkpoints[name].read(t).to(device)
                    for t in checkpoints[name].tensor_names()
                    if is_head(t, params.heads)
                },
            }
            for name in names
        }
        coefficients, history = learn_coefficients(
            recipe, checkpoints, names, base, task_vectors, merge_names, fixed, params, device
        )
    with torch.no_grad():
        merged = task_arithmetic(base, task_vectors, coefficients.to(device), merge_names)
    output = {
        t: merged[t].cpu().to(checkpoints[base_name].info(t).dtype)
        if t in merged
        else constant[t].cpu()
        for t in trunk.names
    }
    report = {
        "method": "adamerging",
        "granularity": "task" if coefficients.dim() == 1 else "layer",
        "base": base_name,
        "coefficients": coefficients_report(coefficients, names, merge_names),
        "entropy": {"initial": history[0], "final": history[-1]} if history else None,
    }
    if report["entropy"] and not all(map(math.isfinite, history)):
        raise PlanError("adamerging: the entropy objective is not finite; lower fuse.params.lr")
    output = with_heads(output, checkpoints, names, params.heads)
    return ModelFuseResult(InMemoryCheckpoint(output, source="<adamerging>"), report)


METHOD = ModelMethod(
    name="adamerging",
    url="https://arxiv.org/abs/2310.02575",
    family="weight_average",
    summary="Task arithmetic with task- or layer-wise coefficients learned by minimising "
    "prediction entropy on unlabelled inputs.",
    reference="Yang et al. 2024, AdaMerging: Adaptive Model Merging for Multi-Task Learning (ICLR)",
    params=AdaMergingParams,
    needs_base=True,
    min_models=1,
    fuse=fuse_adamerging,
    needs_task=True,
    cache_bytes=lambda recipe, checkpoints: 0,
)
