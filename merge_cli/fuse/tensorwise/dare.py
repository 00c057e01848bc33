"""DARE: drop and rescale task vectors at random (``dare_linear``, ``dare_ties``).

Yu et al. 2024, "Language models are Super Mario: Absorbing abilities from homologous models
as a free lunch" (ICML): each entry of a task vector is dropped with probability
p = 1 - ``density`` and the survivors are rescaled by 1 / (1 - p), which keeps the expected
task vector unchanged. The sparsified task vectors are then merged by task arithmetic
(``dare_linear``) or by TIES's sign election and disjoint mean (``dare_ties``).

Drops are drawn from a counter-based hash of (``fuse.seed``, tensor name, model, element
index) (:mod:`merge_cli.fuse.tensorwise.hashing`): the same recipe gives the same mask whether
the tensor
is processed whole or in chunks, on CPU or GPU.

Differences from mergekit, by name:

* ``rescale: true`` (default) divides by the keep probability, as the paper does.
  ``rescale: l1`` reproduces mergekit's ``rescale: true``, which instead scales the kept
  entries so the tensor's L1 norm matches the unpruned task vector's. ``rescale: false``
  does not rescale.
* ``normalize`` defaults to the paper's merge rule: off for ``dare_linear`` (task
  arithmetic), on for ``dare_ties`` (TIES's disjoint mean). mergekit's default for
  ``dare_ties`` is ``normalize: false``; set it explicitly to reproduce mergekit.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from pydantic import Field

from merge_cli.engine.chunks import ChunkPasses, as_rows, row_numel, task_vectors, whole_sums
from merge_cli.engine.method import TensorJob, TensorMethod
from merge_cli.fuse.tensorwise.hashing import uniform_below, uniform_range
from merge_cli.fuse.tensorwise.task_arithmetic import onto_base, task_vector_params
from merge_cli.fuse.tensorwise.ties import DensityParams

Rescale = Literal[True, False, "l1"]

RESCALE_FIELD = (
    Rescale,
    Field(
        True,
        description="true: divide kept entries by their keep probability (paper); "
        "l1: match the L1 norm of the unpruned task vector (mergekit); false: none",
    ),
)


def random_keep(job: TensorJob, model_index: int, keep_probability: Any) -> torch.Tensor:
    """Keep mask (uint8 1/0) of model ``model_index``'s chunk: uniform(seed, model, index) < p.

    ``keep_probability`` is a number or a tensor of the chunk's shape. The mask is uint8, not
    bool: on CPU a float tensor multiplies by it several times faster, nearly as fast as by a
    float mask, and it takes a byte an entry where a statistics pass keeps it.
    """
    chunk = job.models[0]
    start = job.rows[0] * row_numel(job.shape)
    if isinstance(keep_probability, torch.Tensor):
        draws = uniform_range(job.seed, model_index, start, chunk.numel(), chunk.device)
        keep = draws.reshape(chunk.shape) < keep_probability
    else:
        keep = uniform_below(
            job.seed, model_index, start, chunk.numel(), keep_probability, chunk.device
        ).reshape(chunk.shape)
    return keep.view(torch.uint8)


@dataclass
class L1Rescale:
    """mergekit's L1 rescaling of one tensor: a factor per model, and the keep masks drawn
    for it (per model, None where all is kept, by compute-block rows) when they fit the job's
    ``keep_bytes``: drawing them is most of DARE's work."""

    factors: list[float]
    masks: dict[tuple[int, int], list[torch.Tensor | None]]

    def drawn_masks(self, job: TensorJob) -> list[torch.Tensor | None] | None:
        """The masks drawn for ``job``'s block (handed out once), or None."""
        return self.masks.pop(job.rows, None)


def l1_rescale(
    passes: ChunkPasses,
    masked: Callable[[TensorJob], list[tuple[torch.Tensor, torch.Tensor | None]]],
) -> L1Rescale:
    """mergekit's L1 rescaling: ||tau||_1 / ||pruned tau||_1 per model, over the whole tensor.

    ``masked(job)`` gives each model's task vector chunk and its keep mask (:func:`random_keep`;
    None keeps everything); the task vectors may be overwritten. A factor is 1 when either norm
    is below 1e-7, as in mergekit.
    """
    masks: dict[tuple[int, int], list[torch.Tensor | None]] = {}
    keep: bool | None = None  # whether to keep the masks, decided at the first block

    def per_row(job: TensorJob) -> torch.Tensor:
        nonlocal keep
        pairs = masked(job)
        if keep is None:
            drawn = sum(mask is not None for _, mask in pairs)
            keep = math.prod(job.shape) * drawn <= job.keep_bytes
        if keep:
            masks[job.rows] = [mask for _, mask in pairs]
        columns = []
        for delta, mask in pairs:
            magnitude = as_rows(delta).abs_()
            # Each row summed in float32 (a few thousand entries), rows added in float64:
            # three times faster than converting every entry to float64.
            before = magnitude.sum(1).double()
            after = before if mask is None else magnitude.mul_(as_rows(mask)).sum(1).double()
            columns += [before, after]
        return torch.stack(columns, dim=1)

    sums = whole_sums(passes, per_row).tolist()
    factors = []
    for before, after in zip(sums[0::2], sums[1::2], strict=True):
        factors.append(1.0 if before < 1e-7 or after < 1e-7 else before / after)
    return L1Rescale(factors, masks)


def _masks(
    job: TensorJob, models: list[DensityParams], l1: L1Rescale | None = None
) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Each model's task vector and its random keep mask (None at density 1), drawn here or
    taken from the statistics pass."""
    deltas = task_vectors(job)
    drawn = l1.drawn_masks(job) if l1 is not None else None
    if drawn is not None:
        return list(zip(deltas, drawn, strict=True))
    return [
        (delta, None if model.density >= 1 else random_keep(job, i, model.density))
        for i, (delta, model) in enumerate(zip(deltas, models, strict=True))
    ]


def _statistics(passes: ChunkPasses, params: Any, models: list[DensityParams]) -> Any:
    if params.rescale != "l1":
        return None
    return l1_rescale(passes, lambda job: _masks(job, models))


def pruned(
    delta: torch.Tensor,
    mask: torch.Tensor | None,
    rescale: Rescale,
    l1_factor: float | None,
    keep_probability: Any,
) -> torch.Tensor:
    """``delta`` (overwritten) with dropped entries zeroed and the kept ones rescaled: by
    ``l1_factor`` (``rescale: l1``) or divided by ``keep_probability`` (``rescale: true``)."""
    if mask is not None:
        delta *= mask
    if rescale == "l1":
        delta *= l1_factor
    elif rescale and keep_probability is not None:
        delta /= keep_probability
    return delta


def _merge_with(elect_sign: bool):
    def merge(job: TensorJob, params: Any, models: list[DensityParams], stats: Any):
        deltas = [
            pruned(delta, mask, params.rescale, stats and stats.factors[i], model.density)
            for i, ((delta, mask), model) in enumerate(
                zip(_masks(job, models, stats), models, strict=True)
            )
        ]
        return onto_base(job, params, models, deltas, elect_sign=elect_sign)

    return merge


DareLinearParams = task_vector_params("DareLinearParams", normalize=False, rescale=RESCALE_FIELD)
DareTiesParams = task_vector_params("DareTiesParams", normalize=True, rescale=RESCALE_FIELD)

DARE_LINEAR = TensorMethod(
    name="dare_linear",
    url="https://arxiv.org/abs/2311.03099",
    family="weight_average",
    summary="Drop task-vector entries at random (keep `density`), rescale, add to the base.",
    reference="Yu et al. 2024, Language models are Super Mario (DARE), ICML",
    params=DareLinearParams,
    model_params=DensityParams,
    needs_base=True,
    merge=_merge_with(elect_sign=False),
    statistics=_statistics,
)

DARE_TIES = TensorMethod(
    name="dare_ties",
    url="https://arxiv.org/abs/2311.03099",
    family="weight_average",
    summary="DARE's random drop and rescale, then TIES's sign election and disjoint mean.",
    reference="Yu et al. 2024 (DARE), ICML; Yadav et al. 2023 (TIES), NeurIPS",
    params=DareTiesParams,
    model_params=DensityParams,
    needs_base=True,
    merge=_merge_with(elect_sign=True),
    statistics=_statistics,
)

METHODS = [DARE_LINEAR, DARE_TIES]
