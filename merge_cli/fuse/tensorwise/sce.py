"""SCE: select, calculate, erase — FuseChat's merge of task vectors.

Wan et al. 2024, "FuseChat: Knowledge fusion of chat models" (SCE merging), as mergekit's
``sce``, per tensor:

1. **select** the entries where the task vectors vary most across models: the top
   ``select_topk`` fraction of the entries with non-zero variance (1: keep all);
2. **calculate** one weight per model, proportional to the mean square of its selected task
   vector (uniform when they are all zero);
3. **erase** the entries whose sign disagrees with the sign of the summed selected task
   vectors, and take the weighted mean of the remaining ones (per entry).

The variance threshold is an exact whole-tensor order statistic
(:mod:`merge_cli.fuse.tensorwise.selection`) and the weights whole-tensor sums; both are exact under
chunking.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_cli.engine.chunks import ChunkPasses, as_rows, task_vectors, whole_sums
from merge_cli.engine.method import TensorJob, TensorMethod
from merge_cli.fuse.tensorwise.selection import TopK, magnitude_keys, select_top_k
from merge_cli.fuse.tensorwise.task_arithmetic import elected_sign


class SceParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    select_topk: float = Field(
        1.0, gt=0, le=1, description="fraction of the varying entries to keep"
    )


def _variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Per-entry population variance across the models (elementwise: no strided reduction)."""
    mean = deltas[0].clone()
    for delta in deltas[1:]:
        mean += delta
    mean /= len(deltas)
    variance = torch.zeros_like(mean)
    for delta in deltas:
        variance += (delta - mean).square_()
    return variance.div_(len(deltas))


def _selected(job: TensorJob, top: TopK | None) -> list[torch.Tensor]:
    deltas = task_vectors(job)
    if top is None:
        return deltas
    mask = top.mask(magnitude_keys(_variance(deltas)), job.rows[0]).reshape(deltas[0].shape)
    return [delta.mul_(mask) for delta in deltas]


def _statistics(passes: ChunkPasses, params: SceParams, _models: Any) -> Any:
    top = None
    if params.select_topk < 1:
        varying = int(
            whole_sums(
                passes,
                lambda job: as_rows(_variance(task_vectors(job)) != 0).sum(1, dtype=torch.float64),
            )
        )

        def keys():
            for job in passes():
                yield job.rows[0], [magnitude_keys(_variance(task_vectors(job)))]

        (top,) = select_top_k(keys, [(0, lambda _size: int(params.select_topk * varying))])

    def squares_and_counts(job: TensorJob) -> torch.Tensor:
        rows = [as_rows(d) for d in _selected(job, top)]
        columns = [r.pow(2).sum(1, dtype=torch.float64) for r in rows]
        columns.append(torch.full_like(columns[0], rows[0].shape[1]))
        return torch.stack(columns, dim=1)

    sums = whole_sums(passes, squares_and_counts)
    energy = (sums[:-1] / sums[-1]).tolist()
    total = sum(energy)
    weights = [1 / len(energy)] * len(energy) if total == 0 else [e / total for e in energy]
    return top, weights


def _merge(job: TensorJob, _params: SceParams, _models: Any, stats: Any) -> torch.Tensor:
    assert job.base is not None
    top, weights = stats
    deltas = _selected(job, top)
    sign = elected_sign(deltas)
    merged = torch.zeros_like(job.base)
    divisor = torch.zeros_like(job.base)
    for delta, weight in zip(deltas, weights, strict=True):
        agrees = torch.sign(delta) == sign
        merged += torch.where(agrees, delta * weight, 0.0)
        divisor += agrees * weight
    return merged.div_(torch.where(divisor == 0, 1.0, divisor)).add_(job.base)


METHOD = TensorMethod(
    name="sce",
    url="https://arxiv.org/abs/2408.07990",
    family="weight_average",
    summary="Select high-variance entries, weight models by energy, erase minority signs.",
    reference="Wan et al. 2024, FuseChat: Knowledge fusion of chat models (SCE)",
    params=SceParams,
    needs_base=True,
    merge=_merge,
    statistics=_statistics,
)
