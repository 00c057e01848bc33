"""Shared steps of the spectral (SVD-based) task-vector merges: TSV-M, Iso-C, Iso-CTS, WUDI.

These methods act on each 2-D weight as a matrix: a row of the result depends on every row
of every task vector, so their entries set ``chunkable=False`` and ``merge`` sees the whole
tensor at once, on the compute device (``--device``), where every SVD here runs. Tensors
that are not matrices (biases, norms, scalars) fall back to the mean of the task vectors,
scaled by the method's ``alpha``, as the papers' code and FusionBench do.

Two SVDs are used:

* :func:`top_singular` keeps the leading ``k`` singular triplets. With ``svd: lowrank`` it
  calls the randomized range finder ``torch.svd_lowrank`` (Halko, Martinsson & Tropp 2011)
  with ``k + LOWRANK_OVERSAMPLE`` columns and ``LOWRANK_NITER`` power iterations, drawing its
  Gaussian test matrix from the tensor's seed inside :func:`torch.random.fork_rng` (the
  global generator is restored afterwards, so the result is deterministic and nothing else
  is disturbed); ``svd: exact`` (the default, what the papers and FusionBench compute) is
  the full thin SVD, truncated.
* :func:`orthogonalize` replaces a concatenation of singular bases by the nearest matrix
  with orthonormal columns, U V^T from its thin SVD U S V^T (the orthogonal Procrustes
  solution, Schönemann 1966): TSV-M's and Iso-CTS's whitening of the stacked subspaces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
from pydantic import Field

from merge_cli.engine.chunks import task_vectors
from merge_cli.engine.method import TensorJob

#: Extra columns of the randomized range finder beyond the ``k`` kept (Halko et al. 2011).
LOWRANK_OVERSAMPLE = 10
#: Power iterations of the randomized range finder: enough for the slowly decaying spectra
#: of task vectors to give the leading subspace to float32 accuracy on well-separated gaps.
LOWRANK_NITER = 4

SvdKind = Literal["exact", "lowrank"]


def svd_field() -> Any:
    return Field(
        "exact",
        description=(
            "exact: full thin SVD, truncated (as the paper); lowrank: torch.svd_lowrank "
            "for the top-k components (faster on large matrices, approximate)"
        ),
    )


def is_matrix(job: TensorJob) -> bool:
    """Whether the spectral merge applies: a 2-D weight (others fall back to the mean)."""
    return len(job.shape) == 2


def weighted_task_vectors(job: TensorJob, weights: list[float]) -> list[torch.Tensor]:
    """w_i (theta_i - theta_0) for every fused model, in float32 on the compute device."""
    deltas = task_vectors(job)
    return [d if w == 1 else d.mul_(w) for d, w in zip(deltas, weights, strict=True)]


def mean_fallback(job: TensorJob, deltas: list[torch.Tensor], alpha: float) -> torch.Tensor:
    """theta_0 + alpha * mean_i(tau_i): what the spectral methods do with a non-matrix."""
    assert job.base is not None
    merged = deltas[0]
    for delta in deltas[1:]:
        merged += delta
    return merged.mul_(alpha / len(deltas)).add_(job.base)


def merge_matrices(
    job: TensorJob,
    weights: list[float],
    alpha: float,
    merge: Callable[[list[torch.Tensor]], torch.Tensor],
    applies: bool = True,
) -> torch.Tensor:
    """theta_0 + alpha * merge(tau_1, ..., tau_T) for a 2-D weight (``applies`` and
    :func:`is_matrix`), else :func:`mean_fallback`: the shape of every spectral method."""
    assert job.base is not None
    deltas = weighted_task_vectors(job, weights)
    if not is_matrix(job) or not applies:
        return mean_fallback(job, deltas, alpha)
    return merge(deltas).mul_(alpha).add_(job.base)


def top_singular(
    matrix: torch.Tensor, k: int, *, kind: SvdKind = "exact", seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The leading ``k`` singular triplets (U_k [m, k], S_k [k], V_k^T [k, n]) of ``matrix``."""
    if kind == "lowrank" and k + LOWRANK_OVERSAMPLE < min(matrix.shape):
        devices = [matrix.device] if matrix.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            u, s, v = torch.svd_lowrank(matrix, q=k + LOWRANK_OVERSAMPLE, niter=LOWRANK_NITER)
        return u[:, :k], s[:k], v[:, :k].T
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :k], s[:k], vh[:k]


def orthogonalize(basis: torch.Tensor) -> torch.Tensor:
    """The orthonormal matrix nearest to ``basis`` in Frobenius norm: P Q^T of its thin SVD
    P S Q^T (columns orthonormal when it is tall, rows when it is wide)."""
    p, _, qh = torch.linalg.svd(basis, full_matrices=False)
    return p @ qh
