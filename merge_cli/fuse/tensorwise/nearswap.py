"""NearSwap: take the fine-tuned model's value only where it is near the base's.

The "NearSwap" merge of alchemonaut's QuartetAnemoi-70B-t0.0001 (model card,
https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001), mergekit's ``nearswap``: with
the base ``a``, the other model ``b`` and a threshold ``t``, each entry is

    w = clamp(t / max(|a - b|, 1e-6), 0, 1),    out = w * b + (1 - w) * a,

so entries that differ by at most ``t`` come from ``b``, and those that differ more move
toward ``b`` by ``t / |a - b|``. Exactly one model besides the base. Elementwise: chunking
and streaming do not change the result.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from merge_cli.engine.method import TensorJob, TensorMethod

#: mergekit's floor on |a - b| (no division by zero where the models agree).
MIN_DIFFERENCE = 1e-6


class NearSwapParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    t: float = Field(
        ge=0, description="distance up to which the other model's value is taken whole"
    )


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    """``w * other + (1 - w) * base`` with ``w = clamp(t / |base - other|, 0, 1)``."""
    weight = (t / (base - other).abs().clamp(min=MIN_DIFFERENCE)).clamp(min=0, max=1)
    return weight * other + (1 - weight) * base


def _merge(job: TensorJob, params: NearSwapParams, _models: Any, _stats: Any) -> torch.Tensor:
    assert job.base is not None
    return nearswap(job.base, job.models[0], params.t)


METHOD = TensorMethod(
    name="nearswap",
    url="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    family="weight_average",
    summary="Take the other model's entries near the base's, interpolate toward the rest.",
    reference="alchemonaut 2024, QuartetAnemoi-70B-t0.0001 (NearSwap); mergekit nearswap",
    params=NearSwapParams,
    needs_base=True,
    min_models=1,
    max_models=1,
    merge=_merge,
)
