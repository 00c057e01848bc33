"""RegMean: merge linear layers by regression on their inputs.

Jin et al. 2023, "Dataless Knowledge Fusion by Merging Weights of Language Models" (ICLR).
For a linear layer ``y = x W^T`` the merged ``W`` minimises ``sum_i ||X_i W^T - X_i W_i^T||^2``
over the layer's inputs ``X_i`` on each model's own data, which has the closed form::

    W^T = (sum_i G_i)^-1 sum_i G_i W_i^T,        G_i = X_i^T X_i / n_i  (the Gram matrix)

The paper scales the Gram matrices' off-diagonal entries by ``alpha`` (``G_i <- alpha G_i +
(1 - alpha) diag(G_i)``), which interpolates between this regression (``alpha = 1``) and a
per-input-feature weighted average, and regularises towards the simple average. Every other
tensor (biases, norms, embeddings) is averaged. Only the Gram matrices are kept per model
(``in_features^2`` each, accumulated layer by layer through forward hooks, never the
activations) and cached beside the model (:mod:`merge_cli.fuse.datamerge.stats_cache`).

A per-model ``weight`` scales that model's Gram matrices and its share of the average. A
ridge of ``1e-8 * mean(diag)`` towards the simple average keeps the solve defined for input
features that are zero on every model's data (the regression leaves them undetermined).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field
from torch import nn

from merge_cli.engine.method import ModelFuseResult, ModelMethod
from merge_cli.fuse.datamerge.heads import shared_trunk, with_heads
from merge_cli.fuse.datamerge.model_data import (
    DataParams,
    NumExamples,
    WeightParams,
    fused_names,
    method_params,
    take_examples,
    task_of,
)
from merge_cli.fuse.datamerge.stats_cache import (
    CachedStatistics,
    cached_statistics,
    checkpoint_fingerprint,
    fingerprint,
)
from merge_cli.io.checkpoint import Checkpoint, InMemoryCheckpoint
from merge_cli.io.dtypes import is_float
from merge_cli.options import RunOptions
from merge_cli.recipe import Recipe
from merge_cli.task import Batch

RIDGE = 1e-8


class RegMeanParams(DataParams):
    alpha: float = Field(
        0.9,
        ge=0,
        le=1,
        description="scale of the Gram matrices' off-diagonal entries (1: exact regression)",
    )
    num_examples: NumExamples = Field(
        256, description="examples of each model's data to use (a number, or all)"
    )
    split: str = Field("train", description="data split the Gram matrices are computed on")
    cache: bool = Field(
        True, description="reuse and store Gram matrices beside each model (false: no files)"
    )


@torch.no_grad()
def gram_matrices(model: nn.Module, batches: list[Batch]) -> dict[str, torch.Tensor]:
    """``X^T X / n`` of the inputs of every ``nn.Linear`` of ``model``, keyed by its weight."""
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name: str):
        def accumulate(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            rows[name] = rows.get(name, 0) + x.shape[0]

        return accumulate

    handles = [
        module.register_forward_pre_hook(hook(f"{name}.weight" if name else "weight"))
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear)
    ]
    device = next(model.parameters()).device
    try:
        for inputs, _ in batches:
            model(inputs.to(device))
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / rows[name]).float() for name in sums}


def regmean_weight(
    weights: list[torch.Tensor],
    grams: list[torch.Tensor],
    alpha: float,
    coefficients: list[float] | None = None,
) -> torch.Tensor:
    """The RegMean merge of one linear layer's weights (``[out, in]``) given input Grams."""
    coefficients = coefficients or [1.0] * len(weights)
    total = torch.zeros_like(grams[0], dtype=torch.float64)
    target = torch.zeros(weights[0].shape[1], weights[0].shape[0], dtype=torch.float64)
    for weight, gram, c in zip(weights, grams, coefficients, strict=True):
        gram = gram.double()
        scaled = c * (alpha * gram + (1 - alpha) * torch.diag(torch.diagonal(gram)))
        total += scaled
        target += scaled @ weight.double().T
    ridge = RIDGE * max(float(torch.diagonal(total).mean()), 1e-12)
    average = sum(c * w.double() for c, w in zip(coefficients, weights, strict=True)) / sum(
        coefficients
    )
    total += ridge * torch.eye(total.shape[0], dtype=torch.float64)
    target += ridge * average.T
    return torch.linalg.solve(total, target).T.float()


def _gram_file(
    recipe: Recipe,
    checkpoints: dict[str, Checkpoint],
    name: str,
    params: RegMeanParams,
    device: str,
) -> CachedStatistics:
    """Model ``name``'s Gram matrices on its own task's data, from the cache or computed."""
    task = task_of(recipe, name, "regmean")
    batches = take_examples(task.data(params.split), params.num_examples)
    key = fingerprint(
        checkpoint_fingerprint(checkpoints[name]),
        batches,
        params.num_examples,
    )

    def compute() -> dict[str, torch.Tensor]:
        return gram_matrices(task.load_model(checkpoints[name], device), batches)

    metadata = {"examples": sum(len(y) for _, y in batches)}
    return cached_statistics(checkpoints[name], "gram", key, compute, metadata, params.cache)


def fuse_regmean(recipe: Recipe, checkpoints: dict[str, Checkpoint], options: RunOptions):
    params, per_model = method_params(recipe, METHOD)
    names = fused_names(recipe)
    trunk = shared_trunk(checkpoints, names, None, params.heads)
    files = {name: _gram_file(recipe, checkpoints, name, params, options.device) for name in names}
    stored = {name: set(files[name].names()) for name in names}
    coefficients = [per_model[name].weight for name in names]
    merged = {}
    regressed = []
    for tensor in trunk.names:
        reference = checkpoints[trunk.reference].read(tensor)
        if not is_float(reference.dtype):
            merged[tensor] = reference
            continue
        inputs = [checkpoints[name].read(tensor).float() for name in names]
        if all(tensor in stored[name] for name in names):
            grams = [files[name].read(tensor) for name in names]
            result = regmean_weight(inputs, grams, params.alpha, coefficients)
            regressed.append(tensor)
        else:
            result = sum(c * t for c, t in zip(coefficients, inputs, strict=True)) / sum(
                coefficients
            )
        merged[tensor] = result.to(reference.dtype)
    report = {
        "method": "regmean",
        "regressed_tensors": regressed,
        "statistics": {
            name: {
                "file": str(files[name].path) if files[name].path else None,
                "cached": files[name].hit,
            }
            for name in names
        },
    }
    output = with_heads(merged, checkpoints, names, params.heads)
    return ModelFuseResult(InMemoryCheckpoint(output, source="<regmean>"), report)


def _cache_bytes(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> int:
    """An upper bound: every 2-D ``*.weight`` is taken for a linear layer (in^2 float32)."""
    if recipe.fuse is not None and recipe.fuse.params.get("cache") is False:
        return 0
    total = 0
    for name in fused_names(recipe):
        for tensor in checkpoints[name].tensor_names():
            info = checkpoints[name].info(tensor)
            if tensor.endswith("weight") and len(info.shape) == 2:
                total += info.shape[1] ** 2 * 4
    return total


METHOD = ModelMethod(
    name="regmean",
    url="https://arxiv.org/abs/2212.09849",
    family="weight_average",
    summary="Regression mean: linear layers merged in closed form from each model's input "
    "Gram matrices on its own data; other tensors averaged.",
    reference="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language "
    "Models (ICLR)",
    params=RegMeanParams,
    model_params=WeightParams,
    min_models=1,
    fuse=fuse_regmean,
    needs_task=True,
    cache_bytes=_cache_bytes,
)
