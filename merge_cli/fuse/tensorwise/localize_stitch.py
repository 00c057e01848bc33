"""Dataless Localize-and-Stitch: each task keeps its globally largest updates; overlaps average.

He et al. 2025, "Localize-and-Stitch: Efficient Model Merging via Sparse Task Arithmetic"
(TMLR). *Localize*: task t's mask gamma_t keeps the ``sparsity`` fraction of its task vector
tau_t with the largest magnitudes, over the *whole model* (one threshold per task, not one
per tensor: the paper's dataless variant of its mask search). *Stitch*: where several masks
overlap, the tasks share the entry equally,

    theta = theta_0 + lambda * sum_t (gamma_t / max(1, sum_s gamma_s)) * tau_t,

and an entry no mask keeps stays at the pre-trained value (lambda = 1 in the paper). A
per-model ``weight`` w_t scales tau_t after localization (1 by default, the paper's).

The global threshold is a whole-model statistic, and the engine streams tensor by tensor,
so it comes from a first streaming pass: the plan adds one derived input per merged tensor
(:func:`_stitch_thresholds`, built from headers when the plan is made) that holds, for each
row of the tensor, the T tasks' global thresholds. Its first read runs the pass: every
float tensor of the base and the models is read once more in row chunks (at most
``PASS_CHUNK_BYTES`` of float32 per input at a time) and the exact k-th largest |tau_t| over
the model is found by radix selection on the float32 bit patterns (as in
:mod:`merge_cli.fuse.tensorwise.selection`, without its per-chunk tie bookkeeping): two
passes over the chunks that keep only a histogram of 2**15 + 2**16 counts per task, so
memory stays flat in the model size, at the price of reading the inputs three times in
all. Entries equal to a task's threshold are all kept (a tie at the exact float32 threshold
is rare; TIES breaks such ties by position). k = floor(sparsity * number of entries).
Tensors with no dimension (scalars) are left out of the masks and get the mean task vector.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from pydantic import ConfigDict, Field, create_model

from merge_cli.engine.chunks import row_numel
from merge_cli.engine.method import TensorJob, TensorMethod
from merge_cli.engine.plan import OutputTensor, aligned_tensors
from merge_cli.fuse.tensorwise.selection import HIGH_BINS, LOW_BINS, magnitude_keys
from merge_cli.fuse.tensorwise.task_arithmetic import WeightParams
from merge_cli.io.checkpoint import Checkpoint, ComputedCheckpoint, TensorInfo
from merge_cli.io.dtypes import is_float
from merge_cli.recipe import FuseSpec, Recipe

#: Name of the derived source holding the thresholds.
STITCH_SOURCE = "<localize_stitch thresholds>"
#: Float32 bytes per input read at a time by the threshold pass.
PASS_CHUNK_BYTES = 8 * 2**20


LocalizeStitchParams = create_model(
    "LocalizeStitchParams",
    __config__=ConfigDict(extra="forbid"),
    sparsity=(
        float,
        Field(0.1, gt=0, le=1, description="fraction of each task vector kept, over the model"),
    ),
    **{"lambda": (float, Field(1.0, description="scale of the stitched task vector"))},
)


def _row_ranges(shape: tuple[int, ...]) -> Iterator[tuple[int, int]]:
    rows = shape[0]
    step = max(1, PASS_CHUNK_BYTES // (4 * max(1, row_numel(shape))))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _top_bin(histogram: torch.Tensor, k: int) -> tuple[int, int]:
    """(bin holding the k-th largest key, how many keys lie in the bins above it)."""
    above_or_in = histogram.flip(0).cumsum(0)
    position = int(torch.searchsorted(above_or_in, k))  # first count from the top >= k
    index = histogram.numel() - 1 - position
    return index, int(above_or_in[position - 1]) if position else 0


def global_thresholds(
    base: Checkpoint, models: list[Checkpoint], names: list[str], sparsity: float
) -> torch.Tensor:
    """Each task's k-th largest |tau_t| over ``names`` (float32 [T]; 0 keeps everything,
    +inf nothing), k = floor(sparsity * entries), by radix selection on the float32 bit
    patterns: a pass histograms the high 16 bits, a second the low 16 bits of the keys in
    the threshold's high bin. Only the histograms are kept between chunks."""

    def chunks() -> Iterator[list[torch.Tensor]]:
        for name in names:
            for rows in _row_ranges(base.info(name).shape):
                reference = base.read(name, rows).float()
                yield [magnitude_keys(m.read(name, rows).float() - reference) for m in models]

    tasks = len(models)
    high = torch.zeros(tasks, HIGH_BINS, dtype=torch.int64)
    for keys in chunks():
        for t, key in enumerate(keys):
            high[t] += torch.bincount(key >> 16, minlength=HIGH_BINS)
    total = int(high[0].sum())
    k = int(sparsity * total)
    if k <= 0 or k >= total:
        return torch.full((tasks,), float("inf") if k <= 0 else 0.0)
    bins = [_top_bin(high[t], k) for t in range(tasks)]
    low = torch.zeros(tasks, LOW_BINS, dtype=torch.int64)
    for keys in chunks():
        for t, key in enumerate(keys):
            in_bin = key[(key >> 16) == bins[t][0]] & 0xFFFF
            low[t] += torch.bincount(in_bin, minlength=LOW_BINS)
    thresholds = []
    for t, (high_index, above) in enumerate(bins):
        low_index, _ = _top_bin(low[t], k - above)
        key = torch.tensor((high_index << 16) | low_index, dtype=torch.int32)
        thresholds.append(float(key.view(torch.float32)))
    return torch.tensor(thresholds, dtype=torch.float32)


def _stitch_thresholds(
    shapes: dict[str, tuple[int, ...]], compute: Callable[[], torch.Tensor]
) -> ComputedCheckpoint:
    """A derived checkpoint: for every merged tensor, a ``[rows, T]`` tensor whose rows all
    hold the T global thresholds; the whole-model pass runs once, on the first read."""

    def select(values: torch.Tensor, _name: str, start: int, stop: int) -> torch.Tensor:
        return values.expand(stop - start, -1).clone()

    infos = [TensorInfo(name, shape, torch.float32) for name, shape in shapes.items()]
    return ComputedCheckpoint(STITCH_SOURCE, infos, compute, select)


def _masked_names(checkpoint: Checkpoint) -> list[str]:
    """Tensors that enter the masks: every float tensor with at least one dimension."""
    names = []
    for name in checkpoint.tensor_names():
        info = checkpoint.info(name)
        if is_float(info.dtype) and len(info.shape) >= 1:
            names.append(name)
    return names


def derived_thresholds(recipe: Recipe, checkpoints: dict[str, Checkpoint]) -> dict[str, Checkpoint]:
    spec = recipe.fuse
    assert spec is not None and spec.base is not None
    params = LocalizeStitchParams.model_validate(
        {k: v for k, v in spec.params.items() if k in {"sparsity", "lambda"}}
    )
    base = checkpoints[spec.base]
    models = [checkpoints[n] for n in spec.model_names(list(recipe.models))]
    names = _masked_names(base)
    tasks = len(models)
    shapes = {n: (base.info(n).shape[0], tasks) for n in names}
    return {
        STITCH_SOURCE: _stitch_thresholds(
            shapes, lambda: global_thresholds(base, models, names, params.sparsity)
        )
    }


def _plan_tensors(
    checkpoints: dict[str, Checkpoint],
    model_names: list[str],
    base: str | None,
    _params: Any,
    save_dtype: str,
) -> tuple[list[OutputTensor], dict[str, Any], str]:
    """The default plan, with the thresholds added as a last input of every masked tensor."""
    sources = {k: v for k, v in checkpoints.items() if k != STITCH_SOURCE}
    tensors = aligned_tensors(sources, model_names, base, save_dtype)
    masked = set(checkpoints[STITCH_SOURCE].tensor_names())
    planned = [
        OutputTensor(
            t.name, t.shape, t.dtype, (*t.inputs, (STITCH_SOURCE, t.name)), t.base, t.copy_from
        )
        if t.name in masked and t.copy_from is None
        else t
        for t in tensors
    ]
    assert base is not None
    return planned, {}, base


def stitch(
    base: torch.Tensor,
    deltas: list[torch.Tensor],
    thresholds: list[float],
    scale: float,
    weights: list[float] | None = None,
) -> torch.Tensor:
    """theta_0 + scale * sum_t gamma_t w_t tau_t / max(1, sum_s gamma_s), where
    gamma_t = 1{|tau_t| >= c_t} (``deltas`` are overwritten)."""
    merged = torch.zeros_like(base)
    count = torch.zeros_like(base)
    for t, delta in enumerate(deltas):
        mask = (delta.abs() >= thresholds[t]).to(base.dtype)
        if weights is not None and weights[t] != 1:
            delta.mul_(weights[t])
        merged += delta.mul_(mask)
        count += mask
    return merged.div_(count.clamp_(min=1)).mul_(scale).add_(base)


def _merge(job: TensorJob, params: Any, models: list[WeightParams], _stats: Any) -> torch.Tensor:
    assert job.base is not None
    tasks = len(models)
    weights = [m.weight for m in models]
    deltas = [m - job.base for m in job.models[:tasks]]
    scale = getattr(params, "lambda")
    if len(job.models) == tasks:  # a scalar: not in the masks, the weighted mean task vector
        merged = deltas[0].mul_(weights[0])
        for delta, weight in zip(deltas[1:], weights[1:], strict=True):
            merged.add_(delta, alpha=weight)
        return merged.mul_(scale / tasks).add_(job.base)
    thresholds = job.models[tasks].reshape(-1, tasks)[0].tolist()
    return stitch(job.base, deltas, thresholds, scale, weights)


def _check(spec: FuseSpec, _fused: list[str]) -> list[str]:
    """sparsity is one fraction of the whole model: no per-tensor rule or gradient may set it."""
    problems = []
    if isinstance(spec.params.get("sparsity"), list):
        problems.append("fuse.params.sparsity: a whole-model fraction; it cannot be a gradient")
    for i, rule in enumerate(spec.rules):
        if "sparsity" in rule.params:
            problems.append(
                f"fuse.rules[{i}].params.sparsity: a whole-model fraction; rules cannot set it"
            )
    return problems


METHOD = TensorMethod(
    name="localize_stitch",
    family="weight_average",
    summary="Dataless Localize-and-Stitch: each task's global top-k% entries, overlaps averaged.",
    reference=(
        "He et al. 2025, Localize-and-Stitch: Efficient Model Merging via Sparse Task "
        "Arithmetic (TMLR)"
    ),
    params=LocalizeStitchParams,
    model_params=WeightParams,
    needs_base=True,
    merge=_merge,
    plan_tensors=_plan_tensors,
    derived_inputs=derived_thresholds,
    check=_check,
)
