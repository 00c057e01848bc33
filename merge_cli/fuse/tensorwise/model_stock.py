"""Model stock: interpolate toward the fine-tuned average by a ratio set by their angle.

Jang, Yun & Han 2024, "Model Stock: All we need is just a few fine-tuned models" (ECCV): with
N fine-tuned models w_i of a pre-trained w_0 and theta the angle between their task vectors
(w_i - w_0), the merged weights are

    w_H = t * mean_i(w_i) + (1 - t) * w_0,    t = N cos(theta) / (1 + (N - 1) cos(theta)).

For N > 2 the cosine is the mean over pairs of task vectors (mergekit's reading of the
paper). The angle is taken per tensor over the whole tensor, from the Gram matrix of the task
vectors (exact under chunking), or with ``filter_wise: true`` per vector along the last
dimension, as mergekit's ``model_stock`` takes it (its cosine is a reduction over ``dim=-1``):
per row of a matrix, per kernel row ``[out, in, kh, :]`` of a 4-D convolution, and a 1-D
tensor is one vector.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_cli.engine.chunks import ChunkPasses, gram_per_row, stacked_task_vectors
from merge_cli.engine.method import TensorJob, TensorMethod


class ModelStockParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filter_wise: bool = Field(
        False, description="one ratio per vector along the last dimension, not per tensor"
    )


def interpolation_ratio(gram: torch.Tensor) -> torch.Tensor:
    """t = N cos / (1 + (N - 1) cos) from task-vector Gram matrices ``[..., N, N]``."""
    n = gram.shape[-1]
    norms = gram.diagonal(dim1=-2, dim2=-1).clamp(min=0).sqrt()
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            product = (norms[..., i] * norms[..., j]).clamp(min=1e-6)
            cosines.append((gram[..., i, j] / product).clamp(-1, 1))
    cos = torch.stack(cosines).mean(0)
    return n * cos / (1 + (n - 1) * cos)


def _per_row(job: TensorJob) -> bool:
    return len(job.shape) >= 2


def _statistics(passes: ChunkPasses, params: ModelStockParams, _models: Any) -> Any:
    per_row = []
    for job in passes():
        if params.filter_wise and _per_row(job):
            return None  # one ratio per row: the merge computes it from the row itself
        per_row.append(gram_per_row(stacked_task_vectors(job)))
    return interpolation_ratio(torch.cat(per_row).sum(0))


def _merge(job: TensorJob, params: ModelStockParams, _models: Any, ratio: Any) -> torch.Tensor:
    assert job.base is not None
    if ratio is None:
        deltas = stacked_task_vectors(job)
        # vectors along the last dimension: [n, vectors, last]; a chunk holds whole ones
        vectors = deltas.reshape(len(job.models), -1, deltas.shape[-1])
        t = interpolation_ratio(gram_per_row(vectors)).to(job.base.dtype)
        mean = vectors.mean(0)
        return (mean * t[:, None]).reshape(job.base.shape).add_(job.base)
    # base + t (mean(models) - base) = t/N sum(models) + (1 - t) base: four passes fewer.
    t = float(ratio)
    merged = job.models[0]
    for model in job.models[1:]:
        merged += model
    return merged.mul_(t / len(job.models)).add_(job.base, alpha=1 - t)


METHOD = TensorMethod(
    name="model_stock",
    url="https://arxiv.org/abs/2403.19522",
    family="weight_average",
    summary="Move from the base toward the fine-tuned mean by a ratio set by their angle.",
    reference="Jang et al. 2024, Model Stock: All we need is just a few fine-tuned models",
    params=ModelStockParams,
    needs_base=True,
    min_models=2,
    merge=_merge,
    statistics=_statistics,
)
