"""Consensus merging: task arithmetic or TIES restricted to the weights several tasks need.

Wang et al. 2024, "Localizing Task Information for Improved Model Merging and Compression"
(ICML). With tau_t the task vectors and tau_MTL the merged multi-task vector (task
arithmetic's sum, or TIES's disjoint merge of the trimmed task vectors), task t's *TALL
mask* (Eq. 3) keeps the entries where the task's own update dominates what the merge adds
for the other tasks:

    m_t = 1{ |tau_t| > lambda_t * |tau_MTL - tau_t| }.

An entry selected by no task is *catastrophic* (it only carries interference) and one
selected by a single task is *selfish* (it helps only that task and hurts the others); the
*consensus mask* keeps the entries at least k tasks select (Eq. 5),

    m_cons = 1{ sum_t m_t >= k },    theta = theta_0 + lambda * (m_cons * tau_MTL).

k = 2 (the paper's default) removes both kinds. ``tall_mask_lambda`` is lambda_t, per model
(0.6 by default, FusionBench's; the paper picks it per task from 0.2-0.6 on validation data).
The masks compare each weighted task vector w_t tau_t (the original, untrimmed one) with
tau_MTL. Every operation is per entry (TIES's trimming threshold aside, which is the
whole-tensor statistic of :mod:`merge_cli.fuse.tensorwise.ties`), so the methods stream in
row chunks like the methods they extend.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from merge_cli.engine.chunks import task_vectors
from merge_cli.engine.method import TensorJob, TensorMethod
from merge_cli.fuse.tensorwise.task_arithmetic import (
    WeightParams,
    combine_task_vectors,
    task_vector_params,
)
from merge_cli.fuse.tensorwise.ties import DensityParams, keep_top, magnitude_top_k


def _lambda_field() -> Any:
    return Field(
        0.6,
        ge=0,
        description="TALL mask lambda_t: keep entries where |tau_t| > lambda_t |tau_MTL - tau_t|",
    )


class ConsensusModelParams(WeightParams):
    tall_mask_lambda: float = _lambda_field()


class ConsensusTiesModelParams(DensityParams):
    tall_mask_lambda: float = _lambda_field()


def _k_field() -> Any:
    return Field(2, ge=0, description="keep the entries that at least k tasks' TALL masks select")


ConsensusTaskArithmeticParams = task_vector_params(
    "ConsensusTaskArithmeticParams", normalize=False, k=(int, _k_field())
)
ConsensusTiesParams = task_vector_params("ConsensusTiesParams", normalize=True, k=(int, _k_field()))


def consensus_mask(
    deltas: list[torch.Tensor], merged: torch.Tensor, lambdas: list[float], k: int
) -> torch.Tensor:
    """1 where at least ``k`` TALL masks 1{|tau_t| > lambda_t |tau_MTL - tau_t|} hold, else 0."""
    count = torch.zeros_like(merged)
    for delta, lam in zip(deltas, lambdas, strict=True):
        count += (delta.abs() > (merged - delta).abs_().mul_(lam)).to(merged.dtype)
    return (count >= k).to(merged.dtype)


def _weighted(deltas: list[torch.Tensor], weights: list[float]) -> list[torch.Tensor]:
    return [d if w == 1 else d.mul_(w) for d, w in zip(deltas, weights, strict=True)]


def _merge_ta(
    job: TensorJob, params: Any, models: list[ConsensusModelParams], _stats: Any
) -> torch.Tensor:
    assert job.base is not None
    weights = [m.weight for m in models]
    deltas = _weighted(task_vectors(job), weights)
    merged = deltas[0].clone()
    for delta in deltas[1:]:
        merged += delta
    if params.normalize and abs(sum(weights)) >= 1e-8:
        merged /= sum(weights)
    mask = consensus_mask(deltas, merged, [m.tall_mask_lambda for m in models], params.k)
    return merged.mul_(mask).mul_(getattr(params, "lambda")).add_(job.base)


def _statistics(passes: Any, _params: Any, models: list[ConsensusTiesModelParams]) -> Any:
    """TIES's exact whole-tensor top-k magnitude selections (k = floor(density * numel))."""
    trimmed = [i for i, m in enumerate(models) if m.density < 1]
    queries = [(i, lambda size, d=models[i].density: int(d * size)) for i in trimmed]
    found = dict(zip(trimmed, magnitude_top_k(passes, queries), strict=True))
    return [found.get(i) for i in range(len(models))]


def _merge_ties(
    job: TensorJob, params: Any, models: list[ConsensusTiesModelParams], stats: Any
) -> torch.Tensor:
    assert job.base is not None
    weights = [m.weight for m in models]
    deltas = task_vectors(job)
    originals = [d * w for d, w in zip(deltas, weights, strict=True)]
    trimmed = [keep_top(delta, top, job.rows[0]) for delta, top in zip(deltas, stats, strict=True)]
    merged = combine_task_vectors(
        torch.zeros_like(job.base),
        trimmed,
        weights,
        normalize=params.normalize,
        scale=1.0,
        elect_sign=True,
    )
    mask = consensus_mask(originals, merged, [m.tall_mask_lambda for m in models], params.k)
    return merged.mul_(mask).mul_(getattr(params, "lambda")).add_(job.base)


REFERENCE = (
    "Wang et al. 2024, Localizing Task Information for Improved Model Merging and "
    "Compression (ICML)"
)

METHODS = [
    TensorMethod(
        name="consensus_task_arithmetic",
        family="weight_average",
        summary="Task arithmetic keeping only entries that at least k tasks' TALL masks select.",
        reference=REFERENCE,
        params=ConsensusTaskArithmeticParams,
        model_params=ConsensusModelParams,
        needs_base=True,
        merge=_merge_ta,
    ),
    TensorMethod(
        name="consensus_ties",
        family="weight_average",
        summary="TIES keeping only entries that at least k tasks' TALL masks select.",
        reference=REFERENCE,
        params=ConsensusTiesParams,
        model_params=ConsensusTiesModelParams,
        needs_base=True,
        merge=_merge_ties,
        statistics=_statistics,
    ),
]
