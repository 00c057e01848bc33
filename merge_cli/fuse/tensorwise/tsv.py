"""TSV-Merge: task singular vectors, truncated per task, decorrelated, summed.

Gargiulo et al. 2025, "Task Singular Vectors: Reducing Task Interference in Model Merging"
(CVPR). For each weight matrix and each of the T tasks, the task vector's SVD
Delta_i = U_i S_i V_i^T is truncated to its top k = r / T singular triplets (r = min(m, n):
the *low-rank* part carries the task). The truncated bases are concatenated,

    U = [U_1,k ... U_T,k]  (m x Tk),  S = diag(S_1,k ... S_T,k),  V = [V_1,k ... V_T,k],

and, to remove the interference between tasks (the overlap of their singular subspaces,
Eq. 7-8 of the paper), U and V are replaced by their nearest orthonormal matrices
U_perp = P_U Q_U^T and V_perp = P_V Q_V^T (thin SVDs U = P_U S_U Q_U^T, V = P_V S_V Q_V^T,
the orthogonal Procrustes solution). The merged update is U_perp S V_perp^T and

    theta = theta_0 + alpha * U_perp S V_perp^T,

alpha = 1 by default (the paper reports TSV-M needs no tuning of it). Tensors that are not
matrices, and matrices with fewer than T singular values, get alpha times the mean task
vector, as the paper's code. Per-model ``weight`` scales a task vector before its SVD (as
FusionBench's per-task ``alpha`` list). k is r // T; FusionBench's ``int(r * (1 / T))`` is
one less where the float product rounds below an integer (r = 49, T = 49, for instance).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_cli.engine.method import TensorJob, TensorMethod
from merge_cli.fuse.tensorwise.spectral import (
    SvdKind,
    merge_matrices,
    orthogonalize,
    svd_field,
    top_singular,
)
from merge_cli.fuse.tensorwise.task_arithmetic import WeightParams


class TsvParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    alpha: float = Field(1.0, description="scale of the merged task vector")
    svd: SvdKind = svd_field()


def tsv_merge(
    deltas: list[torch.Tensor], *, kind: SvdKind = "exact", seed: int = 0
) -> torch.Tensor:
    """U_perp S V_perp^T of the task vectors' top r/T singular triplets (``len(deltas)`` >= 1,
    every matrix with at least ``len(deltas)`` singular values)."""
    rank = min(deltas[0].shape) // len(deltas)
    parts = [top_singular(delta, rank, kind=kind, seed=seed + i) for i, delta in enumerate(deltas)]
    u = torch.cat([p[0] for p in parts], dim=1)
    s = torch.cat([p[1] for p in parts])
    vh = torch.cat([p[2] for p in parts], dim=0)
    return (orthogonalize(u) * s) @ orthogonalize(vh)


def _merge(
    job: TensorJob, params: TsvParams, models: list[WeightParams], _stats: Any
) -> torch.Tensor:
    def merge(deltas: list[torch.Tensor]) -> torch.Tensor:
        return tsv_merge(deltas, kind=params.svd, seed=job.seed)

    # fewer rows or columns than tasks leave no rank per task: the mean, as for a vector
    applies = min(job.shape, default=0) >= len(models)
    return merge_matrices(job, [m.weight for m in models], params.alpha, merge, applies)


METHOD = TensorMethod(
    name="tsv",
    family="weight_average",
    summary="TSV-Merge: each task vector's top r/T singular vectors, decorrelated, summed.",
    reference=(
        "Gargiulo et al. 2025, Task Singular Vectors: Reducing Task Interference in Model "
        "Merging (CVPR)"
    ),
    params=TsvParams,
    model_params=WeightParams,
    needs_base=True,
    merge=_merge,
    chunkable=False,
)
