"""Linear weight averaging (model soups).

Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time" (uniform soup); Izmailov et al. 2018 (SWA).
Parameter names follow mergekit's ``linear``: per-model ``weight``, method ``normalize``.
"""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_cli.engine.method import TensorJob, TensorMethod


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


#: Elements per block of :func:`linear_blocked` (1 MiB of float32: stays in a core's cache).
BLOCK_ELEMENTS = 2**18


def linear_blocked(
    tensors: list[torch.Tensor],
    weights: list[float],
    normalize: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`linear` on inputs in any float dtype, left untouched, returned in ``out_dtype``.

    Each block of elements is accumulated in float32 in a cache-sized scratch buffer and
    rounded into the output, so no float32 copy of an input or of the result is made: on
    CPU this is bit-identical to :func:`linear` on float32 copies, in half the time. Off
    the CPU the whole tensor is one block.
    """
    total = sum(weights)
    if normalize and total == 0:
        raise ValueError("linear: the weights sum to zero, cannot normalize")
    scale = 1.0 / total if normalize else 1.0
    flat = [tensor.reshape(-1) for tensor in tensors]
    numel = flat[0].numel()
    device = flat[0].device
    out = torch.empty(numel, dtype=out_dtype, device=device)
    block = BLOCK_ELEMENTS if device.type == "cpu" else max(1, numel)
    scratch = torch.empty(min(block, numel), dtype=torch.float32, device=device)
    for start in range(0, numel, block):
        stop = min(numel, start + block)
        accumulator = scratch[: stop - start]
        accumulator.copy_(flat[0][start:stop]).mul_(weights[0] * scale)
        for tensor, weight in zip(flat[1:], weights[1:], strict=True):
            accumulator.add_(tensor[start:stop], alpha=weight * scale)
        out[start:stop].copy_(accumulator)
    return out.reshape(tensors[0].shape)


def _merge(
    job: TensorJob, params: LinearParams, models: list[LinearModelParams], _stats
) -> torch.Tensor:
    return linear_blocked(job.models, [m.weight for m in models], params.normalize, job.out_dtype)


METHOD = TensorMethod(
    name="linear",
    url="https://arxiv.org/abs/2203.05482",
    family="weight_average",
    summary="Weighted average of the models' parameters (uniform or weighted model soup).",
    reference="Wortsman et al. 2022, Model soups (ICML)",
    params=LinearParams,
    model_params=LinearModelParams,
    min_models=1,
    merge=_merge,
    stored_dtype_inputs=True,
)
