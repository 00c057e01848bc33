"""Helpers for per-tensor methods that see a tensor one row chunk at a time.

A chunk holds whole rows (slices along dim 0) of the full tensor. Whole-tensor sums are
accumulated *per row* and added up once at the end, in the same order whether or not the
tensor was split: a statistic computed over chunks is then bit-identical to the one computed
over the whole tensor (a plain running sum over chunks would round differently).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from merge_cli.engine.method import ChunkPasses, TensorJob


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """View a chunk as a 2-D [rows, row elements] matrix (a scalar is one row of one)."""
    if tensor.dim() == 0:
        return tensor.reshape(1, 1)
    return tensor.reshape(tensor.shape[0], -1)


def row_numel(shape: tuple[int, ...]) -> int:
    """Number of elements in one row (slice along dim 0) of a tensor of ``shape``."""
    return math.prod(shape[1:]) if shape else 1


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def task_vectors(job: TensorJob) -> list[torch.Tensor]:
    """Each fused model's chunk minus the base model's (Ilharco et al. 2023)."""
    assert job.base is not None, "the method needs a base model"
    return [model - job.base for model in job.models]


def stacked_task_vectors(job: TensorJob) -> torch.Tensor:
    """The task vectors of :func:`task_vectors` as one ``[n, *chunk shape]`` tensor, written
    in place (what :func:`gram_per_row` takes without another copy)."""
    assert job.base is not None, "the method needs a base model"
    stacked = job.base.new_empty((len(job.models), *job.base.shape))
    for i, model in enumerate(job.models):
        torch.sub(model, job.base, out=stacked[i])
    return stacked


def whole_sums(passes: ChunkPasses, per_row: Callable[[TensorJob], torch.Tensor]) -> torch.Tensor:
    """Whole-tensor sums of per-row quantities, identical however the tensor is chunked.

    ``per_row(job)`` returns a float64 tensor ``[rows in chunk, ...]`` (one entry per row of
    the chunk); the result is its sum over all rows of the tensor, shape ``[...]``.
    """
    parts = [per_row(job) for job in passes()]
    return torch.cat(parts).sum(0)


def gram_per_row(vectors: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """Per-row Gram matrices ``[rows, n, n]`` (float64) of n same-shaped chunks, given as a
    list or stacked ``[n, *chunk shape]``.

    Each row's dot products are one small matrix product in float32 (a row is a few thousand
    entries: relative error around 1e-6, ample for norms and angles), batched over the rows,
    and the rows are then added in float64 by the caller. A batched product reads each vector
    once; the n(n+1)/2 separate products and sums it replaced took eight times as long.
    """
    stacked = torch.stack(vectors) if isinstance(vectors, list) else vectors
    count = stacked.shape[0]
    rows = stacked.shape[1] if stacked.dim() > 1 else 1
    per_row = stacked.reshape(count, rows, -1).transpose(0, 1)  # [rows, n, row entries]
    return torch.bmm(per_row, per_row.transpose(1, 2)).double()


def gram_matrix(
    passes: ChunkPasses, vectors: Callable[[TensorJob], list[torch.Tensor]]
) -> torch.Tensor:
    """Gram matrix ``G[i, j] = <v_i, v_j>`` (float64, on the CPU) of n vectors over the whole
    tensor.

    Norms, angles and every linear combination's norm follow from it, which is all SLERP,
    multi-SLERP, the Karcher mean and model stock need from the whole tensor. It is returned on
    the CPU whatever the compute device: the methods do scalar algebra on it there.
    """
    return whole_sums(passes, lambda job: gram_per_row(vectors(job))).cpu()
