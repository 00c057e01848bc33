"""TIES-merging: trim, elect sign, disjoint merge.

Yadav et al. 2023, "TIES-Merging: Resolving interference when merging models" (NeurIPS):

1. **trim** each task vector to its ``density`` fraction of largest-magnitude entries
   (k = floor(density * numel), over the whole tensor);
2. **elect** a sign per entry: the sign of the total mass of the trimmed (weighted) task
   vectors;
3. **disjoint merge**: average, per entry, only the task vectors whose sign agrees with the
   elected one (``normalize``), and add ``lambda`` times the result to the base.

Parameter names follow mergekit's ``ties`` (per-model ``weight`` and ``density``, method
``normalize`` and ``lambda``). The magnitude threshold is the exact whole-tensor k-th largest,
found by radix selection over the chunks (:mod:`merge_cli.fuse.tensorwise.selection`) rather than by
sorting; entries tied with the threshold are kept in flat-index order. mergekit keeps an
arbitrary subset of such ties (its sort is not stable), the only place outputs can differ.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from pydantic import Field

from merge_cli.engine.chunks import ChunkPasses, task_vectors
from merge_cli.engine.method import TensorJob, TensorMethod
from merge_cli.fuse.tensorwise.selection import TopK, magnitude_keys, select_top_k
from merge_cli.fuse.tensorwise.task_arithmetic import WeightParams, onto_base, task_vector_params


class DensityParams(WeightParams):
    density: float = Field(
        1.0, gt=0, le=1, description="fraction of the task vector's entries to keep"
    )


def magnitude_top_k(
    passes: ChunkPasses, queries: list[tuple[int, Callable[[int], int]]]
) -> list[TopK]:
    """Exact top-k magnitude selections of task vectors over the whole tensor.

    One per query ``(model index, k_of_size)``, where ``k_of_size(numel)`` is how many
    entries to keep.
    """
    models = sorted({model for model, _ in queries})
    series = {model: s for s, model in enumerate(models)}

    whole: list[tuple[int, list[torch.Tensor]]] = []

    def keys():
        if whole:  # a tensor in one chunk: reuse its keys in every pass
            yield whole[0]
            return
        for job in passes():
            deltas = task_vectors(job)
            chunk = job.rows[0], [magnitude_keys(deltas[model]) for model in models]
            if job.rows == (0, job.shape[0] if job.shape else 0):
                whole.append(chunk)
            yield chunk

    return select_top_k(keys, [(series[model], k) for model, k in queries])


def keep_top(delta: torch.Tensor, top: TopK | None, first_row: int) -> torch.Tensor:
    """Zero every entry of ``delta`` outside the top-k (in place)."""
    if top is None:
        return delta
    mask = top.mask(magnitude_keys(delta), first_row).reshape(delta.shape)
    return delta.mul_(mask)


def _statistics(passes: ChunkPasses, _params: Any, models: list[DensityParams]) -> Any:
    # k = floor(density * numel), as mergekit; density 1 keeps everything (no selection).
    trimmed = [i for i, m in enumerate(models) if m.density < 1]
    queries = [(i, lambda size, d=models[i].density: int(d * size)) for i in trimmed]
    found = dict(zip(trimmed, magnitude_top_k(passes, queries), strict=True))
    return [found.get(i) for i in range(len(models))]


def _merge(job: TensorJob, params: Any, models: list[DensityParams], stats: Any) -> torch.Tensor:
    deltas = [
        keep_top(delta, top, job.rows[0])
        for delta, top in zip(task_vectors(job), stats, strict=True)
    ]
    return onto_base(job, params, models, deltas, elect_sign=True)


TiesParams = task_vector_params("TiesParams", normalize=True)

METHOD = TensorMethod(
    name="ties",
    url="https://arxiv.org/abs/2306.01708",
    family="weight_average",
    summary="Trim task vectors to the largest magnitudes, elect signs, average the agreeing.",
    reference="Yadav et al. 2023, TIES-Merging: Resolving interference when merging models",
    params=TiesParams,
    model_params=DensityParams,
    needs_base=True,
    merge=_merge,
    statistics=_statistics,
)
