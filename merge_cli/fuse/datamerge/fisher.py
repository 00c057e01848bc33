"""Fisher merging: a Fisher-weighted average of the models' parameters.

Matena & Raffel 2022, "Merging Models with Fisher-Weighted Averaging" (NeurIPS). Each
model's posterior is approximated by a Gaussian whose precision is the diagonal of its
Fisher information, ``F_i = E_x E_{y ~ p_i(y|x)} [(d log p_i(y|x) / d theta)^2]``; the
merge maximises the joint posterior, elementwise::

    theta = sum_i w_i F_i theta_i / sum_i w_i F_i,      F_i floored at epsilon

so each model dominates the parameters it is most sensitive to. The expectation over
``y`` is computed exactly over the classes by default, as the paper's reference code does
(``labels: expected``); ``sampled`` draws one label per example from the model's
predictive distribution (the Monte-Carlo "true" Fisher) and ``empirical`` uses the data's
labels with the task's loss (the empirical Fisher, for outputs that are not a class
distribution). Each model's Fisher comes from its own task's data and is cached beside the
model (:mod:`merge_cli.fuse.datamerge.stats_cache`). Tensors that are not parameters of the task
model (buffers such as BatchNorm statistics) are averaged with the models' weights.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.func import functional_call, grad, jacrev, vmap

from merge_cli.engine.method import ModelFuseResult, ModelMethod
from merge_cli.errors import TaskError
from merge_cli.fuse.datamerge.heads import shared_trunk, with_heads
from merge_cli.fuse.datamerge.model_data import (
    DataParams,
    NumExamples,
    WeightParams,
    float_bytes,
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
from merge_cli.task import Batch, LossFn, logits_of

#: Examples per vectorised per-example-gradient call (bounds memory to this many gradients).
MICRO_BATCH = 16


class FisherParams(DataParams):
    num_examples: NumExamples = Field(
        256, description="examples of each model's data to use (a number, or all)"
    )
    labels: Literal["expected", "sampled", "empirical"] = Field(
        "expected",
        description="expected: exact expectation over the model's predicted classes (the "
        "paper's); sampled: one label drawn from the model per example; empirical: data labels",
    )
    epsilon: float = Field(1e-6, gt=0, description="floor on every Fisher value")
    normalize: bool = Field(
        False, description="divide each model's weight by the L2 norm of its Fisher"
    )
    split: str = Field("train", description="data split the Fisher is estimated on")
    cache: bool = Field(
        True,
        description="reuse and store Fisher estimates beside each model (false: no files)",
    )


def diagonal_fisher(
    model: torch.nn.Module,
    batches: list[Batch],
    labels: str = "expected",
    loss: LossFn = F.cross_entropy,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """The diagonal Fisher of every parameter of ``model``, averaged over the examples."""
    params = {name: p.detach() for name, p in model.named_parameters()}
    buffers = {name: b.detach() for name, b in model.named_buffers()}
    generator = torch.Generator().manual_seed(seed)

    def log_probs(theta: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        outputs = logits_of(functional_call(model, (theta, buffers), (x.unsqueeze(0),)))[0]
        if outputs.dim() != 1:
            raise TaskError(
                f"fisher: labels {labels!r} needs one class distribution per example, got "
                f"outputs of shape {list(outputs.shape)}; use labels: empirical"
            )
        return F.log_softmax(outputs, dim=-1)

    def log_likelihood(theta: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor):
        if labels == "empirical":
            outputs = logits_of(functional_call(model, (theta, buffers), (x.unsqueeze(0),)))
            return -loss(outputs, y.unsqueeze(0))
        return log_probs(theta, x).gather(0, y.reshape(1)).squeeze(0)

    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    count = 0
    for inputs, targets in batches:
        for start in range(0, len(inputs), MICRO_BATCH):
            x = inputs[start : start + MICRO_BATCH].to(next(iter(params.values())).device)
            y = targets[start : start + MICRO_BATCH].to(x.device)
            if labels == "expected":
                jacobians = vmap(jacrev(log_probs), in_dims=(None, 0))(params, x)
                probs = vmap(log_probs, in_dims=(None, 0))(params, x).exp()  # [B, C]
                for name, jac in jacobians.items():  # jac: [B, C, *shape]
                    weights = probs.reshape(*probs.shape, *([1] * (jac.dim() - 2)))
                    fisher[name] += (weights * jac.square()).sum(dim=(0, 1)).float()
            else:
                if labels == "sampled":
                    with torch.no_grad():
                        probs = vmap(log_probs, in_dims=(None, 0))(params, x).exp()
                    y = torch.multinomial(probs.cpu(), 1, generator=generator)[:, 0].to(x.device)
                grads = vmap(grad(log_likelihood), in_dims=(None, 0, 0))(params, x, y)
                for name, g in grads.items():
                    fisher[name] += g.square().sum(dim=0).float()
            count += len(x)
    return {name: value / count for name, value in fisher.items()}


def fisher_average(
    tensors: list[torch.Tensor],
    fishers: list[torch.Tensor] | None,
    weights: list[float],
    epsilon: float,
) -> torch.Tensor:
    """``sum_i w_i max(F_i, eps) theta_i / sum_i w_i max(F_i, eps)``; a weighted mean
    when ``fishers`` is None (tensors that are not parameters)."""
    if fishers is None:
        return sum(w * t for w, t in zip(weights, tensors, strict=True)) / sum(weights)
    numerator = torch.zeros_like(tensors[0])
    denominator = torch.zeros_like(tensors[0])
    for tensor, fisher, weight in zip(tensors, fishers, weights, strict=True):
        precision = weight * fisher.clamp_min(epsilon)
        numerator += precision * tensor
        denominator += precision
    return numerator / denominator


def _fisher_file(
    recipe: Recipe,
    checkpoints: dict[str, Checkpoint],
    name: str,
    params: FisherParams,
    device: str,
) -> CachedStatistics:
    """Model ``name``'s Fisher on its own task's data, from the cache or computed."""
    task = task_of(recipe, name, "fisher")
    batches = take_examples(task.data(params.split), params.num_examples)
    seed = recipe.fuse.seed if recipe.fuse else 0
    key = fingerprint(
        checkpoint_fingerprint(checkpoints[name]),
        batches,
        params.labels,
        params.num_examples,
        seed,
        task.spec.loss if params.labels == "empirical" else None,
    )

    def compute() -> dict[str, torch.Tensor]:
        model = task.load_model(checkpoints[name], device)
        return diagonal_fisher(model, batches, params.labels, task.loss, seed)

    metadata = {"labels": params.labels, "examples": sum(len(y) for _, y in batches)}
    return cached_statistics(checkpoints[name], "fisher", key, compute, metadata, params.cache)


def fuse_fisher(recipe: Recipe, checkpoints: dict[str, Checkpoint], options: RunOptions):
    params, per_model = method_params(recipe, METHOD)
    names = fused_names(recipe)
    trunk = shared_trunk(checkpoints, names, None, params.heads)
    files = {n: _fisher_file(recipe, checkpoints, n, params, options.device) for n in names}
    weights = [per_model[name].weight for name in names]
    stored = {name: set(files[name].names()) for name in names}
    if params.normalize:
        norms = []
        for name in names:
            squares = sum(
                float(files[name].read(t).double().square().sum())
                for t in trunk.names
                if t in stored[name]
            )
            norms.append(max(squares**0.5, 1e-30))
        weights = [w / n for w, n in zip(weights, norms, strict=True)]
    merged = {}
    for tensor in trunk.names:
        reference = checkpoints[trunk.reference].read(tensor)
        if not is_float(reference.dtype):
            merged[tensor] = reference
            continue
        inputs = [checkpoints[name].read(tensor).float() for name in names]
        has_fisher = all(tensor in stored[name] for name in names)
        fishers = [files[name].read(tensor) for name in names] if has_fisher else None
        merged[tensor] = fisher_average(inputs, fishers, weights, params.epsilon).to(
            reference.dtype
        )
    report = {
        "method": "fisher",
        "statistics": {
            name: {
                "file": str(files[name].path) if files[name].path else None,
                "cached": files[name].hit,
            }
            for name in names
        },
    }
    output = with_heads(merged, checkpoints, names, params.heads)
    return ModelFuseResult(InMemoryCheckpoint(output, source="<fisher>"), report)


def _cache_bytes(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> int:
    if recipe.fuse is not None and recipe.fuse.params.get("cache") is False:
        return 0
    return sum(
        float_bytes(checkpoints[name], checkpoints[name].tensor_names())
        for name in fused_names(recipe)
    )


METHOD = ModelMethod(
    name="fisher",
    url="https://arxiv.org/abs/2111.09832",
    family="weight_average",
    summary="Fisher-weighted average: each parameter weighted by each model's diagonal "
    "Fisher information from its own task's data.",
    reference="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging (NeurIPS)",
    params=FisherParams,
    model_params=WeightParams,
    min_models=1,
    fuse=fuse_fisher,
    needs_task=True,
    cache_bytes=_cache_bytes,
)
