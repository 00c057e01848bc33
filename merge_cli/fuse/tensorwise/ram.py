"""RAM and RAM+ (tensor-local): average each entry over the models that changed it.

Reinforced Agent Merging (arXiv 2601.13572), mergekit's ``ram`` and ``ramplus_tl``. With task
vectors tau_i = w_i - w_0 and, per entry, the models whose |tau_i| exceeds ``epsilon``:

* ``ram``: an entry changed by one model takes that model's change, one changed by several
  the mean of their changes, one changed by none stays the base's:
  w = w_0 + sum_i tau_i [|tau_i| > eps] / max(count, 1).
* ``ramplus_tl``: as ``ram``, but the changes only one model made are scaled, per model and
  tensor, by lambda_i = 1 + r * clamp(shared_i / max(unique_i, eps), 0, alpha), where shared_i
  and unique_i count model i's changed entries that other models changed too, or not. The
  counts are over the whole tensor: a first pass counts them, exactly, chunk by chunk.

Entry for entry the arithmetic is mergekit 0.1.5's (same operations in float32).
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_cli.engine.chunks import ChunkPasses, as_rows, stacked_task_vectors, whole_sums
from merge_cli.engine.method import TensorJob, TensorMethod


class RamParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epsilon: float = Field(
        1e-5, ge=0, description="a task-vector entry counts as a change above this magnitude"
    )


class RamPlusParams(RamParams):
    r: float = Field(0.1, description="strength of the boost of a model's unique changes")
    alpha: float = Field(0.2, ge=0, description="upper bound of the shared/unique ratio used")


def _changes(job: TensorJob, epsilon: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Task vectors zeroed where unchanged ``[n, ...]``, which are changed, and the count of
    models that changed each entry ``[...]``."""
    deltas = stacked_task_vectors(job)
    changed = deltas.abs() > epsilon
    return deltas.mul_(changed), changed, changed.sum(0)


def _ram(job: TensorJob, params: RamParams, _models: Any, _stats: Any) -> torch.Tensor:
    assert job.base is not None
    deltas, _changed, counts = _changes(job, params.epsilon)
    return job.base + deltas.div_(counts.clamp(min=1)).sum(0)


def _ramplus_statistics(passes: ChunkPasses, params: RamPlusParams, _models: Any) -> list:
    """lambda_i from each model's shared and unique change counts over the whole tensor."""

    def counts(job: TensorJob) -> torch.Tensor:
        _deltas, changed, count = _changes(job, params.epsilon)
        rows = as_rows(count).shape[0]
        columns = []
        for mask in (changed & (count > 1), changed & (count == 1)):  # shared, unique
            per_row = mask.reshape(len(job.models), rows, -1).sum(2, dtype=torch.float64)
            columns += list(per_row)  # one [rows] column per model
        return torch.stack(columns, dim=1)

    sums = whole_sums(passes, counts)
    n = sums.numel() // 2
    shared, unique = sums[:n].float(), sums[n:].float()
    rho = shared / unique.clamp(min=params.epsilon)
    return (1 + params.r * rho.clamp(min=0, max=params.alpha)).tolist()


def _ramplus(job: TensorJob, params: RamPlusParams, _models: Any, boost: list) -> torch.Tensor:
    assert job.base is not None
    deltas, _changed, counts = _changes(job, params.epsilon)
    unique = counts == 1
    shape = (-1,) + (1,) * (deltas.dim() - 1)
    scale = torch.tensor(boost, dtype=deltas.dtype, device=deltas.device).reshape(shape)
    merged = (deltas * unique * scale) + (deltas * (counts > 1) / counts.clamp(min=1))
    return job.base + merged.sum(0)


RAM = TensorMethod(
    name="ram",
    url="https://arxiv.org/abs/2601.13572",
    family="weight_average",
    summary="Each entry: the mean change of the models that changed it (unique changes kept).",
    reference="Reinforced Agent Merging (RAM), arXiv 2601.13572; mergekit ram",
    params=RamParams,
    needs_base=True,
    merge=_ram,
)

RAMPLUS_TL = TensorMethod(
    name="ramplus_tl",
    url="https://arxiv.org/abs/2601.13572",
    family="weight_average",
    summary="RAM with each model's unique changes boosted by its shared/unique ratio.",
    reference="Reinforced Agent Merging (RAM+, tensor-local), arXiv 2601.13572; mergekit",
    params=RamPlusParams,
    needs_base=True,
    merge=_ramplus,
    statistics=_ramplus_statistics,
)

METHODS = (RAM, RAMPLUS_TL)
