"""Spherical means of n models: ``multislerp`` and ``karcher``.

Both read each tensor of each model as one vector, average the *directions* on the unit
sphere, and scale the result by the weighted mean of the norms. Every quantity they need from
the whole tensor is an inner product of two inputs, so each mean is computed on the n x n Gram
matrix (:func:`merge_cli.engine.chunks.gram_matrix`, exact under chunking) as coefficients of a
linear combination of the inputs; the tensor itself is then streamed once more.

* ``multislerp`` (Goddard 2025, "Multi-SLERP", as in mergekit): project the unit vectors on
  the tangent space at their normalized weighted mean, average there, and map back with the
  exponential map. For two models it equals SLERP. Per-model ``weight``; ``normalize_weights``.
* ``karcher``: the weighted Karcher (Frechet) mean on the sphere (Karcher 1977, "Riemannian
  center of mass and mollifier smoothing"), by fixed-point iteration of the Riemannian
  gradient step (``max_iter``, ``tol``), as mergekit's ``karcher``.

With ``fuse.base`` both average the task vectors (model minus base) and add the base back.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_cli.engine.chunks import ChunkPasses, gram_matrix
from merge_cli.engine.method import TensorJob, TensorMethod
from merge_cli.fuse.tensorwise.task_arithmetic import WeightParams


def _vectors(job: TensorJob) -> list[torch.Tensor]:
    if job.base is None:
        return list(job.models)
    return [model - job.base for model in job.models]


def _combine(job: TensorJob, coefficients: list[float]) -> torch.Tensor:
    vectors = _vectors(job)
    merged = torch.zeros_like(vectors[0])
    for vector, coefficient in zip(vectors, coefficients, strict=True):
        merged.add_(vector, alpha=coefficient)
    return merged if job.base is None else merged.add_(job.base)


def _quadratic(gram: torch.Tensor, c: torch.Tensor) -> float:
    return float(c @ gram @ c)


def multislerp_coefficients(
    gram: torch.Tensor, weights: list[float], normalize_weights: bool = True, eps: float = 1e-8
) -> list[float]:
    """Coefficients of the inputs whose combination is their multi-SLERP (float64 algebra)."""
    n = len(weights)
    if n == 1:
        return [1.0]
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize_weights:
        w = w / w.sum()
    norms = gram.diagonal().clamp(min=0).sqrt()
    scale = norms + eps
    unit_gram = gram / scale[:, None] / scale[None, :]
    mean_norm = math.sqrt(max(_quadratic(unit_gram, w), 0.0))
    if mean_norm < eps:
        if n == 2:
            return w.tolist()
        raise ValueError(
            "multislerp: the weighted mean of the directions is zero (antipodal models with "
            "balancing weights); change the weights"
        )
    mean = w / mean_norm
    dots = unit_gram @ mean
    tangent = w - float(w @ dots) * mean
    tangent_norm = math.sqrt(max(_quadratic(unit_gram, tangent), 0.0)) + eps
    direction = mean * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
    average_norm = float(norms @ w)
    return (direction * average_norm / scale).tolist()


def karcher_coefficients(
    gram: torch.Tensor, weights: list[float], max_iter: int = 10, tol: float = 1e-5
) -> list[float]:
    """Coefficients of the inputs whose combination is their weighted Karcher mean."""
    n = len(weights)
    if n == 1:
        return [1.0]
    alphas = torch.tensor(weights, dtype=torch.float64)
    alphas = alphas / alphas.sum()
    norms = gram.diagonal().clamp(min=0).sqrt()
    valid = norms > tol
    if not bool(valid.any()):
        return [0.0] * n
    safe = torch.where(valid, norms, 1.0)
    unit_gram = gram / safe[:, None] / safe[None, :]
    unit_gram[~valid] = 0
    unit_gram[:, ~valid] = 0
    weight = torch.where(valid, alphas, 0.0)
    weight = weight / weight.sum()

    def norm_of(c: torch.Tensor) -> float:
        return math.sqrt(max(_quadratic(unit_gram, c), 0.0))

    mean = weight.clone()
    mean_norm = norm_of(mean)
    if mean_norm < tol:
        mean = torch.zeros(n, dtype=torch.float64)
        mean[int(valid.nonzero()[0])] = 1.0
    else:
        mean = mean / mean_norm
    identity = torch.eye(n, dtype=torch.float64)
    for _ in range(max_iter):
        dots = (unit_gram @ mean).clamp(-1, 1)
        tangent = torch.zeros(n, dtype=torch.float64)
        for i in range(n):
            theta = math.acos(float(dots[i]))
            if not valid[i] or theta < tol:
                continue
            tangent += weight[i] * (theta / math.sin(theta)) * (identity[i] - dots[i] * mean)
        tangent_norm = norm_of(tangent)
        if tangent_norm < tol:
            break
        mean = math.cos(tangent_norm) * mean + math.sin(tangent_norm) * tangent / tangent_norm
        mean_norm = norm_of(mean)
        if mean_norm > tol:
            mean = mean / mean_norm
    scale = float(alphas @ norms)
    return (torch.where(valid, mean * scale / safe, 0.0)).tolist()


def _statistics(passes: ChunkPasses, _params: Any, _models: Any) -> Any:
    return gram_matrix(passes, _vectors)


class MultiSlerpParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normalize_weights: bool = Field(True, description="divide the weights by their sum")
    eps: float = Field(1e-8, gt=0, description="numerical floor for norms")


def _multislerp(job: TensorJob, params: MultiSlerpParams, models: list[WeightParams], gram: Any):
    weights = [m.weight for m in models]
    return _combine(
        job, multislerp_coefficients(gram, weights, params.normalize_weights, params.eps)
    )


MULTISLERP = TensorMethod(
    name="multislerp",
    family="weight_average",
    summary="Weighted spherical mean of n models (tangent-space average at the mean direction).",
    reference="Goddard 2025, Multi-SLERP (mergekit multislerp)",
    params=MultiSlerpParams,
    model_params=WeightParams,
    min_models=1,
    merge=_multislerp,
    statistics=_statistics,
)


class KarcherParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_iter: int = Field(10, ge=1, description="fixed-point iterations at most")
    tol: float = Field(1e-5, gt=0, description="stop when the tangent step is below this")


def _karcher(job: TensorJob, params: KarcherParams, models: list[WeightParams], gram: Any):
    weights = [m.weight for m in models]
    return _combine(job, karcher_coefficients(gram, weights, params.max_iter, params.tol))


KARCHER = TensorMethod(
    name="karcher",
    family="weight_average",
    summary="Weighted Karcher (Riemannian) mean of n models' directions, scaled by mean norm.",
    reference="Karcher 1977, Riemannian center of mass; mergekit karcher",
    params=KarcherParams,
    model_params=WeightParams,
    min_models=1,
    merge=_karcher,
    statistics=_statistics,
)

METHODS = [MULTISLERP, KARCHER]
