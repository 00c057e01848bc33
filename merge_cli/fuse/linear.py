"""Linear weight averaging (model soups).

Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time" (uniform soup); Izmailov et al. 2018 (SWA).
Parameter names follow mergekit's ``linear``: per-model ``weight``, method ``normalize``.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_cli.fuse.registry import Method, TensorJob


class LinearParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    normalize: bool = Field(True, description="divide by the sum of the weights")


class LinearModelParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, description="this model's weight in the average")


def linear(
    tensors: list[torch.Tensor],
    weights: list[float],
    normalize: bool = True,
    in_place: bool = False,
) -> torch.Tensor:
    """Weighted sum of ``tensors``; divided by the sum of weights when ``normalize``.

    With ``in_place`` the first tensor is overwritten with the result (no allocation).
    """
    total = sum(weights)
    if normalize and total == 0:
        raise ValueError("linear: the weights sum to zero, cannot normalize")
    scale = 1.0 / total if normalize else 1.0
    first = tensors[0] if in_place else tensors[0].clone()
    merged = first.mul_(weights[0] * scale)
    for tensor, weight in zip(tensors[1:], weights[1:], strict=True):
        merged.add_(tensor, alpha=weight * scale)
    return merged


def _merge(
    job: TensorJob, params: LinearParams, models: list[LinearModelParams], _stats
) -> torch.Tensor:
    return linear(job.models, [m.weight for m in models], params.normalize, in_place=True)


METHOD = Method(
    name="linear",
    family="weight_average",
    summary="Weighted average of the models' parameters (uniform or weighted model soup).",
    reference="Wortsman et al. 2022, Model soups (ICML)",
    params=LinearParams,
    model_params=LinearModelParams,
    min_models=1,
    merge=_merge,
)
