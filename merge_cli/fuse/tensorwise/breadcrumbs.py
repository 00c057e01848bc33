"""Model breadcrumbs: drop the largest outliers and the smallest entries of task vectors.

Davari & Belilovsky 2024, "Model Breadcrumbs: Scaling multi-task model merging with sparse
masks" (ECCV): per tensor, mask out the ``gamma`` fraction of task-vector entries with the
largest magnitude (outliers) and the smallest ones, so that a ``density`` fraction remains;
then add the weighted sum of masked task vectors to the base (``breadcrumbs``), or merge them
with TIES's sign election and disjoint mean (``breadcrumbs_ties``, mergekit's combination).

With n entries, floor(gamma * n) are dropped from the top and floor(density * n) kept below
them (fewer outliers are dropped when the two exceed n). Both cut-offs are exact
whole-tensor order statistics (:mod:`merge_cli.fuse.tensorwise.selection`).

Differences from mergekit, by name:

* mergekit keeps *nothing* of a task vector when floor(gamma * n) is 0 (small tensors such as
  norms and biases: its slice ``[n_bottom:-0]`` is empty). Here nothing is dropped from the
  top then, which is what the paper describes; ``empty_without_outliers: true`` reproduces
  mergekit's outputs.
* ``normalize`` defaults to off for ``breadcrumbs`` (task arithmetic, as the paper and
  mergekit) and on for ``breadcrumbs_ties`` (TIES's disjoint mean; mergekit's default is
  off: set it explicitly to reproduce mergekit).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from pydantic import Field

from merge_cli.engine.chunks import ChunkPasses, task_vectors
from merge_cli.engine.method import TensorJob, TensorMethod
from merge_cli.fuse.tensorwise.selection import TopK, magnitude_keys
from merge_cli.fuse.tensorwise.task_arithmetic import onto_base, task_vector_params
from merge_cli.fuse.tensorwise.ties import DensityParams, magnitude_top_k


class BreadcrumbsModelParams(DensityParams):
    gamma: float = Field(
        0.01, ge=0, lt=1, description="fraction of largest-magnitude entries to drop"
    )


def outlier_counts(size: int, density: float, gamma: float) -> tuple[int, int]:
    """(entries dropped from the top, entries kept below them) of a tensor of ``size``."""
    kept = int(density * size)
    top = int(gamma * size)
    return min(top, size - kept), kept


def _statistics(passes: ChunkPasses, _params: Any, models: list[BreadcrumbsModelParams]) -> Any:
    """Per model, the (outliers, outliers + kept) top-k selections, or None when dense."""
    sparse = [i for i, m in enumerate(models) if m.density < 1]
    queries = []
    for i in sparse:
        counts = functools.partial(outlier_counts, density=models[i].density, gamma=models[i].gamma)
        queries.append((i, lambda size, counts=counts: counts(size)[0]))
        queries.append((i, lambda size, counts=counts: sum(counts(size))))
    found = magnitude_top_k(passes, queries)
    pairs = dict(zip(sparse, zip(found[0::2], found[1::2], strict=True), strict=True))
    return [pairs.get(i) for i in range(len(models))]


def _keep(delta: torch.Tensor, pair: tuple[TopK, TopK] | None, first_row: int):
    if pair is None:
        return delta
    outliers, upper = pair
    keys = magnitude_keys(delta)
    keep = upper.mask(keys, first_row) & ~outliers.mask(keys, first_row)
    return delta.mul_(keep.reshape(delta.shape))


def _merge_with(elect_sign: bool):
    def merge(job: TensorJob, params: Any, models: list[BreadcrumbsModelParams], stats: Any):
        deltas = []
        for delta, pair in zip(task_vectors(job), stats, strict=True):
            if params.empty_without_outliers and pair is not None and pair[0].k == 0:
                deltas.append(delta.zero_())
            else:
                deltas.append(_keep(delta, pair, job.rows[0]))
        return onto_base(job, params, models, deltas, elect_sign=elect_sign)

    return merge


_QUIRK = (
    bool,
    Field(
        False,
        description="reproduce mergekit: keep nothing of a tensor's task vector when "
        "floor(gamma * numel) is 0",
    ),
)
BreadcrumbsParams = task_vector_params(
    "BreadcrumbsParams", normalize=False, empty_without_outliers=_QUIRK
)
BreadcrumbsTiesParams = task_vector_params(
    "BreadcrumbsTiesParams", normalize=True, empty_without_outliers=_QUIRK
)

BREADCRUMBS = TensorMethod(
    name="breadcrumbs",
    url="https://arxiv.org/abs/2312.06795",
    family="weight_average",
    summary="Drop the largest (gamma) and smallest task-vector entries, add the rest to the base.",
    reference="Davari & Belilovsky 2024, Model Breadcrumbs (ECCV)",
    params=BreadcrumbsParams,
    model_params=BreadcrumbsModelParams,
    needs_base=True,
    merge=_merge_with(elect_sign=False),
    statistics=_statistics,
)

BREADCRUMBS_TIES = TensorMethod(
    name="breadcrumbs_ties",
    url="https://arxiv.org/abs/2312.06795",
    family="weight_average",
    summary="Breadcrumbs' outlier and small-entry masks, then TIES's sign election and mean.",
    reference="Davari & Belilovsky 2024 (ECCV); Yadav et al. 2023 (TIES), NeurIPS",
    params=BreadcrumbsTiesParams,
    model_params=BreadcrumbsModelParams,
    needs_base=True,
    merge=_merge_with(elect_sign=True),
    statistics=_statistics,
)

METHODS = [BREADCRUMBS, BREADCRUMBS_TIES]
