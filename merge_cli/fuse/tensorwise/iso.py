"""Isotropic merging: ``iso_c`` (common subspace) and ``iso_cts`` (common + task-specific).

Marczak et al. 2025, "No Task Left Behind: Isotropic Model Merging with Common and
Task-Specific Subspaces" (ICML). Task arithmetic's sum Delta_TA = sum_i Delta_i has a
spectrum dominated by a few directions, which serve some tasks and drown others; flattening
the spectrum (making it *isotropic*) raises the alignment of every task with the merge.

* **Iso-C** (Eq. 6-7): with the thin SVD Delta_TA = U S V^T and sigma_bar the mean of its
  r = min(m, n) singular values, the update is sigma_bar U V^T:

      theta = theta_0 + alpha * sigma_bar * U V^T.

* **Iso-CTS** (Sec. 4, Eq. 8-11): keep the top k singular vectors of Delta_TA as the common
  subspace (k from ``common_space_fraction``), and give each task s = (r - k) / T
  directions of its own: the top s singular vectors of the part of its task vector outside
  the common subspace, Delta_i - U_k U_k^T Delta_i. The r columns of U = [U_k, U_1,s ...
  U_T,s] (and the rows of V likewise) are orthogonalised (nearest orthonormal matrix, as in
  TSV) and the spectrum made isotropic with the mean sigma_bar of all r kept singular values:

      theta = theta_0 + alpha * sigma_bar * U_perp V_perp^T.

  k is rounded so that r - k splits evenly among the T tasks, as the authors' code:
  k = r - T * round((r - floor(r * fraction)) / T).

Tensors that are not matrices get alpha times the mean task vector (the authors' code and
FusionBench). ``alpha`` is FusionBench's ``scaling_factor`` (default 1; the paper selects it
on validation data). Per-model ``weight`` scales a task vector before it enters the sum.
Every SVD here is exact (thin, on the compute device): the isotropic spectrum weighs all r
kept directions equally, tail included, so a randomized top-k SVD, accurate only for the
leading directions, does not apply.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_cli.engine.method import TensorJob, TensorMethod
from merge_cli.fuse.tensorwise.spectral import (
    merge_matrices,
    orthogonalize,
    top_singular,
)
from merge_cli.fuse.tensorwise.task_arithmetic import WeightParams


class IsoCParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(1.0, description="scale of the merged task vector (scaling_factor)")


class IsoCtsParams(IsoCParams):
    common_space_fraction: float = Field(
        0.8, ge=0, le=1, description="fraction of the rank given to the common subspace"
    )


def iso_c_merge(deltas: list[torch.Tensor]) -> torch.Tensor:
    """sigma_bar U V^T of the sum of the task vectors."""
    total = deltas[0]
    for delta in deltas[1:]:
        total += delta
    u, s, vh = torch.linalg.svd(total, full_matrices=False)
    return (u * s.mean()) @ vh


def subspace_sizes(rank: int, tasks: int, fraction: float) -> tuple[int, int]:
    """(common k, per-task s) with k + T s = rank, as the authors' code rounds them."""
    specific = round((rank - int(rank * fraction)) / tasks) * tasks
    if specific > rank:
        specific -= tasks
    return rank - specific, specific // tasks


def iso_cts_merge(deltas: list[torch.Tensor], fraction: float) -> torch.Tensor:
    """sigma_bar U_perp V_perp^T of the common and task-specific subspaces."""
    rank = min(deltas[0].shape)
    common, per_task = subspace_sizes(rank, len(deltas), fraction)
    total = deltas[0].clone()
    for delta in deltas[1:]:
        total += delta
    u_c, s_c, vh_c = top_singular(total, common)
    del total
    us, ss, vhs = [u_c], [s_c], [vh_c]
    if per_task:
        for delta in deltas:
            outside = delta - u_c @ (u_c.T @ delta)
            u, s, vh = top_singular(outside, per_task)
            us.append(u)
            ss.append(s)
            vhs.append(vh)
    sigma = torch.cat(ss).mean()
    return (orthogonalize(torch.cat(us, dim=1)) * sigma) @ orthogonalize(torch.cat(vhs))


def _merge_c(
    job: TensorJob, params: IsoCParams, models: list[WeightParams], _stats: Any
) -> torch.Tensor:
    return merge_matrices(job, [m.weight for m in models], params.alpha, iso_c_merge)


def _merge_cts(
    job: TensorJob, params: IsoCtsParams, models: list[WeightParams], _stats: Any
) -> torch.Tensor:
    def merge(deltas: list[torch.Tensor]) -> torch.Tensor:
        return iso_cts_merge(deltas, params.common_space_fraction)

    return merge_matrices(job, [m.weight for m in models], params.alpha, merge)


REFERENCE = (
    "Marczak et al. 2025, No Task Left Behind: Isotropic Model Merging with Common and "
    "Task-Specific Subspaces (ICML)"
)

METHODS = [
    TensorMethod(
        name="iso_c",
        family="weight_average",
        summary="Iso-C: the task-vector sum with a flat (isotropic) spectrum.",
        reference=REFERENCE,
        params=IsoCParams,
        model_params=WeightParams,
        needs_base=True,
        merge=_merge_c,
        chunkable=False,
    ),
    TensorMethod(
        name="iso_cts",
        family="weight_average",
        summary="Iso-CTS: common plus per-task singular subspaces, orthogonalised, isotropic.",
        reference=REFERENCE,
        params=IsoCtsParams,
        model_params=WeightParams,
        needs_base=True,
        merge=_merge_cts,
        chunkable=False,
    ),
]
