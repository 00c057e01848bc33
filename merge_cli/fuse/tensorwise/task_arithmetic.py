"""Task arithmetic, and the combination step every task-vector method shares.

Ilharco et al. 2023, "Editing models with task arithmetic" (ICLR): a *task vector* is a
fine-tuned model minus its pre-trained base, tau_i = theta_i - theta_base; adding a scaled sum
of task vectors to the base adds the tasks: theta = theta_base + lambda * sum_i w_i tau_i.
Parameter names follow mergekit's ``task_arithmetic``: per-model ``weight``, method
``normalize`` (divide by the sum of weights; off by default, as in the paper and mergekit)
and ``lambda``.

TIES, DARE, breadcrumbs, DELLA and SCE differ only in how they sparsify each task vector and
whether they elect a sign per entry before summing; :func:`combine_task_vectors` is that
shared last step.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, create_model

from merge_cli.engine.chunks import task_vectors
from merge_cli.engine.method import TensorJob, TensorMethod


class WeightParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    weight: float = Field(1.0, description="this model's task vector weight")


def task_vector_params(
    name: str, normalize: bool, base: type[BaseModel] | None = None, **fields: Any
) -> type[BaseModel]:
    """Method-level schema with ``normalize`` and ``lambda`` (a Python keyword, hence built)."""
    return create_model(
        name,
        __base__=base,
        __config__=None if base else ConfigDict(extra="forbid"),
        normalize=(
            bool,
            Field(normalize, description="divide the sum by the sum of the (agreeing) weights"),
        ),
        **{"lambda": (float, Field(1.0, description="scale of the merged task vector"))},
        **fields,
    )


def elected_sign(deltas: list[torch.Tensor]) -> torch.Tensor:
    """TIES sign election: the sign (+1/-1) of the total mass per entry; +1 on a tie."""
    mass = deltas[0].clone()
    for tensor in deltas[1:]:
        mass += tensor
    # sign(sign(m) + 0.5) maps -1, 0, +1 to -1, +1, +1. Float ops only: on CPU a comparison
    # or torch.where is ten to thirty times slower than an arithmetic pass.
    return mass.sign_().add_(0.5).sign_()


def combine_task_vectors(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    weights: list[float],
    *,
    normalize: bool,
    scale: float,
    elect_sign: bool = False,
) -> torch.Tensor:
    """``base + scale * merged``, where ``merged`` sums the weighted task vectors.

    With ``elect_sign`` (TIES's disjoint merge, Yadav et al. 2023) only the entries whose
    sign agrees with the elected sign are summed, and ``normalize`` divides each entry by the
    sum of the weights of the models that agree there (a disjoint mean). Without it,
    ``normalize`` divides by the sum of all weights. ``deltas`` are overwritten.
    """
    weighted = [
        delta if weight == 1 else delta.mul_(weight)
        for delta, weight in zip(deltas, weights, strict=True)
    ]
    if elect_sign:
        sign = elected_sign(weighted)
        agreeing = torch.zeros_like(base)
        divisor = torch.zeros_like(base) if normalize else None
        for tensor, weight in zip(weighted, weights, strict=True):
            # > 0 exactly where the entry agrees with the sign; then 0 where it does not
            agreement = tensor.mul_(sign).clamp_(min=0)
            agreeing += agreement
            if divisor is not None:
                divisor.add_(agreement.sign_(), alpha=weight)
        merged = agreeing.mul_(sign)
        if divisor is not None:
            # where no model agrees (divisor 0, merged 0) divide by 1: add 1 - sign(|divisor|)
            merged /= divisor.add_(divisor.abs().sign_().neg_().add_(1))
    else:
        merged = weighted[0]
        for tensor in weighted[1:]:
            merged += tensor
        total = sum(weights)
        if normalize and abs(total) >= 1e-8:
            merged /= total
    return (merged if scale == 1 else merged.mul_(scale)).add_(base)


def onto_base(
    job: TensorJob,
    params: Any,
    models: list[Any],
    deltas: list[torch.Tensor],
    *,
    elect_sign: bool = False,
) -> torch.Tensor:
    """:func:`combine_task_vectors` of ``deltas`` with the models' ``weight`` and the method's
    ``normalize`` and ``lambda``: the last step of every task-vector method."""
    assert job.base is not None
    return combine_task_vectors(
        job.base,
        deltas,
        [m.weight for m in models],
        normalize=params.normalize,
        scale=getattr(params, "lambda"),
        elect_sign=elect_sign,
    )


def _merge(job: TensorJob, params: Any, models: list[WeightParams], _stats: Any) -> torch.Tensor:
    return onto_base(job, params, models, task_vectors(job))


TaskArithmeticParams = task_vector_params("TaskArithmeticParams", normalize=False)

METHOD = TensorMethod(
    name="task_arithmetic",
    url="https://arxiv.org/abs/2212.04089",
    family="weight_average",
    summary="Base plus lambda times the weighted sum of task vectors (fine-tuned minus base).",
    reference="Ilharco et al. 2023, Editing models with task arithmetic (ICLR)",
    params=TaskArithmeticParams,
    model_params=WeightParams,
    needs_base=True,
    merge=_merge,
)
