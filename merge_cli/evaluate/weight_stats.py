"""``weight_stats``: weight-space statistics of models, per layer and overall (streaming).

With a base model the statistics are of task vectors ``tau = theta - theta_base`` (Ilharco et
al. 2023, "Editing models with task arithmetic"): their norms, their pairwise cosine
similarity, and the fraction of parameters whose task vectors disagree in sign — the
interference that TIES-merging resolves (Yadav et al. 2023, section 3). Without a base, norms
and cosine similarities are of the weights themselves. Tensors are read in row chunks, so
memory stays bounded whatever the model size; groups are transformer layers / blocks
(``layers.N``) and the remaining tensors' modules.
"""

from __future__ import annotations

from itertools import combinations

import torch
from pydantic import Field

from merge_cli.engine.executor import row_chunks
from merge_cli.engine.params import layer_index
from merge_cli.errors import PlanError
from merge_cli.evaluate.registry import EvalContext, Metric, MetricParams, MetricResult
from merge_cli.io.checkpoint import Checkpoint
from merge_cli.io.dtypes import is_float
from merge_cli.options import DEFAULT_CHUNK_BYTES
from merge_cli.progress import NullProgress, Progress
from merge_cli.recipe import EvalSpec, Recipe


class WeightStatsParams(MetricParams):
    base: str | None = Field(
        None, description="base model for task vectors (default: fuse.base; none: raw weights)"
    )


def tensor_group(name: str) -> str:
    """``layers.N`` for a tensor of layer / block N, else its module's name."""
    index = layer_index(name)
    if index is not None:
        return f"layers.{index}"
    return name.rsplit(".", 1)[0] if "." in name else name


class _Sums:
    """Running sums of one group: squared norms, pairwise dots, sign conflicts."""

    def __init__(self, count: int):
        self.squares = [0.0] * count
        self.dots = {pair: 0.0 for pair in combinations(range(count), 2)}
        self.conflicts = 0
        self.entries = 0

    def add(self, vectors: list[torch.Tensor], with_signs: bool) -> None:
        for i, vector in enumerate(vectors):
            self.squares[i] += float(vector.square().sum())
        for i, j in self.dots:
            self.dots[i, j] += float((vectors[i] * vectors[j]).sum())
        if with_signs:
            stacked = torch.stack(vectors)
            conflict = (stacked > 0).any(0) & (stacked < 0).any(0)
            self.conflicts += int(conflict.sum())
        self.entries += vectors[0].numel()

    def summary(self, names: list[str], with_signs: bool) -> dict:
        norms = [s**0.5 for s in self.squares]
        cosine = {
            f"{names[i]} · {names[j]}": (
                dot / (norms[i] * norms[j]) if norms[i] * norms[j] else 0.0
            )
            for (i, j), dot in self.dots.items()
        }
        out = {"norm": dict(zip(names, norms, strict=True)), "cosine": cosine}
        if with_signs:
            out["sign_conflicts"] = self.conflicts / self.entries if self.entries else 0.0
        return out


def weight_statistics(
    checkpoints: dict[str, Checkpoint],
    base: Checkpoint | None,
    progress: Progress | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> dict:
    """Per-group and overall statistics of ``checkpoints`` (task vectors when ``base``)."""
    progress = progress or NullProgress()
    names = list(checkpoints)
    models = list(checkpoints.values())
    reference = models[0]
    tensors = [n for n in reference.tensor_names() if is_float(reference.info(n).dtype)]
    for name in tensors:
        for checkpoint in [*models[1:], *([base] if base is not None else [])]:
            if checkpoint.info(name).shape != reference.info(name).shape:
                raise PlanError(
                    f"weight_stats: tensor {name!r} has shape {list(checkpoint.info(name).shape)} "
                    f"in {checkpoint.source}, {list(reference.info(name).shape)} in "
                    f"{reference.source}"
                )
    readers = len(models) + (base is not None)
    progress.start("weight statistics", sum(reference.info(n).nbytes for n in tensors) * readers)
    with_signs = base is not None
    total = _Sums(len(models))
    groups: dict[str, _Sums] = {}
    for name in tensors:
        info = reference.info(name)
        group = groups.setdefault(tensor_group(name), _Sums(len(models)))
        for rows in row_chunks(info.shape, chunk_bytes, True):
            rows_arg = None if not info.shape else rows
            vectors = [m.read(name, rows_arg).double() for m in models]
            if base is not None:
                offset = base.read(name, rows_arg).double()
                vectors = [v - offset for v in vectors]
            group.add(vectors, with_signs)
            total.add(vectors, with_signs)
        progress.advance(info.nbytes * readers)
    progress.finish()
    return {
        "of": "task vectors" if with_signs else "weights",
        "overall": total.summary(names, with_signs),
        "layers": {group: sums.summary(names, with_signs) for group, sums in groups.items()},
    }


def run_weight_stats(
    context: EvalContext, spec: EvalSpec, params: WeightStatsParams
) -> MetricResult:
    recipe = context.recipe
    base_name = params.base or (recipe.fuse.base if recipe.fuse else None)
    names = [n for n in spec.models or context.default_models() if n != base_name]
    base = context.checkpoint(base_name) if base_name else None
    stats = weight_statistics({n: context.checkpoint(n) for n in names}, base, context.progress)
    of = stats["of"]
    overall = stats["overall"]
    rows = [{"metric": f"norm ({of})", "model": n, "value": v} for n, v in overall["norm"].items()]
    rows += [
        {"metric": f"cosine ({of})", "model": pair, "value": v}
        for pair, v in overall["cosine"].items()
    ]
    if "sign_conflicts" in overall:
        rows.append(
            {
                "metric": "sign_conflicts",
                "model": ", ".join(names),
                "value": overall["sign_conflicts"],
            }
        )
    return MetricResult(rows, {"base": base_name, **stats})


def _check(recipe: Recipe, spec: EvalSpec, params: WeightStatsParams, where: str) -> list[str]:
    if params.base is not None and params.base not in recipe.models:
        return [f"{where}.params.base: no model named {params.base!r} in models"]
    return []


WEIGHT_STATS = Metric(
    name="weight_stats",
    summary="Per-layer norms, cosine similarity and sign conflicts of task vectors (or weights).",
    reference="Ilharco et al. 2023 (task vectors); Yadav et al. 2023 (TIES sign conflicts)",
    run=run_weight_stats,
    params=WeightStatsParams,
    check=_check,
)
