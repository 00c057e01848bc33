"""The two kinds of fuse method, as registry entries.

A fuse method is a plain function plus one entry that says what it needs (base model?
data?), which parameters it takes (pydantic models, validated once when the recipe is
loaded) and how it runs. The entry is one of two kinds, each with only its own fields:

* :class:`TensorMethod` (per-tensor, streaming): ``merge`` maps one tensor's inputs (a
  :class:`TensorJob`) to one output tensor. The executor streams these tensor by tensor, in
  row chunks for large tensors. A method that needs a whole-tensor statistic (a magnitude
  threshold, a norm, an angle) also sets ``statistics``, which receives a factory of chunk
  iterators so it can make as many passes as it needs before ``merge`` sees the first chunk.
  ``plan_tensors`` lets a method choose the output tensors itself (passthrough's layer
  stacking); ``derived_inputs`` adds lazy inputs that a method computes from the models
  (MoE router weights): they are built from headers when the plan is made, read like any
  other input during the stream, and so never break the plan-before-read contract.
* :class:`ModelMethod` (whole-model): ``fuse`` receives the recipe, the opened inputs and
  the run's :class:`~merge_cli.options.RunOptions`, and returns a checkpoint (usually an
  :class:`~merge_cli.io.InMemoryCheckpoint`) that the writer saves, a
  :class:`ModelFuseResult` that adds a report (learned coefficients, statistics used), or
  the path of an output it wrote itself (an ensemble directory), staged in a temporary
  sibling directory like every other output. ``cache_bytes`` estimates, from headers alone,
  the disk the method's statistics caches need, for ``merge-cli plan``; ``preflight`` runs
  the method's own recipe checks for ``validate`` and ``plan``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict

from merge_cli.io.checkpoint import Checkpoint
from merge_cli.options import RunOptions
from merge_cli.recipe import FuseSpec, Recipe


class NoParams(BaseModel):
    """Parameter schema of a method without parameters."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class TensorJob:
    """One chunk of one output tensor, with the inputs a per-tensor method needs.

    ``models`` are the fused models' tensors (in ``fuse.models`` order) and ``base`` the base
    model's, all float32 on the compute device, restricted to rows ``rows`` of the full
    tensor of shape ``shape``. The job owns its tensors: a method may modify them in place
    (saving memory traffic) once it no longer needs the original values. A method whose
    entry sets ``stored_dtype_inputs`` gets them in their stored dtype instead, and must
    leave them untouched. ``out_dtype`` is the dtype saved: a method may return it directly.
    ``keep_bytes`` is how much a statistics pass may keep for the tensor's merge (say, the
    random masks it drew), so that memory stays within the executor's budget.
    """

    name: str
    models: list[torch.Tensor]
    base: torch.Tensor | None
    rows: tuple[int, int]
    shape: tuple[int, ...]
    seed: int
    out_dtype: torch.dtype = torch.float32
    keep_bytes: int = 0


#: (job, method params, per-model params, statistics) -> merged chunk
MergeFn = Callable[[TensorJob, Any, list[Any], Any], torch.Tensor]


def copy_first(job: TensorJob, _params: Any, _models: list[Any], _stats: Any) -> torch.Tensor:
    """The first input's chunk unchanged: the merge of a method whose plan only copies."""
    return job.models[0]


@dataclass(frozen=True)
class ChunkPasses:
    """Fresh passes over one tensor's jobs, as the executor hands them to ``statistics``.

    Calling it starts a pass. ``shape`` (the whole tensor's) and ``whole`` (each pass is
    one job holding the whole tensor) are known before any chunk is read, so a statistic
    that depends on them need not start a pass (and read a chunk) to find out.
    """

    shape: tuple[int, ...]
    whole: bool
    start: Callable[[], Iterator[TensorJob]]

    def __call__(self) -> Iterator[TensorJob]:
        return self.start()

    @classmethod
    def over(cls, jobs: list[TensorJob]) -> ChunkPasses:
        """Passes over jobs already in memory: a whole tensor, or its compute blocks."""
        return cls(jobs[0].shape, len(jobs) == 1, lambda: iter(jobs))


#: (passes over the tensor, method params, per-model params) -> statistics for ``merge``
StatisticsFn = Callable[[ChunkPasses, Any, list[Any]], Any]


@dataclass(frozen=True)
class ModelFuseResult:
    """A whole-model method's result: the merged checkpoint and what the run should report."""

    checkpoint: Checkpoint
    report: dict[str, Any]
    #: Extra files saved inside the output directory: relative path -> contents (a curve's
    #: bend).
    files: dict[str, bytes] = field(default_factory=dict)


#: What a whole-model method's ``fuse`` returns: a checkpoint for the writer, a checkpoint
#: with a report, or the path of an output it wrote itself (an ensemble directory).
ModelFuseOutput = Checkpoint | ModelFuseResult | Path


@dataclass(frozen=True, kw_only=True)
class MethodInfo:
    """What every method says of itself: name, paper, parameters and input contract."""

    name: str
    family: Literal["weight_average", "ensemble", "connectivity"]
    summary: str
    reference: str
    #: The paper's address (the model card links it); None where there is no paper.
    url: str | None = None
    params: type[BaseModel] = NoParams
    model_params: type[BaseModel] = NoParams
    needs_base: bool = False
    min_models: int = 1
    max_models: int | None = None
    #: Extra recipe checks ``(fuse spec, fused model names) -> problems`` (e.g. "exactly two
    #: models"), run with the other checks before any tensor is read.
    check: Callable[[FuseSpec, list[str]], list[str]] | None = None


@dataclass(frozen=True, kw_only=True)
class TensorMethod(MethodInfo):
    """A per-tensor method: the executor streams it tensor by tensor, chunk by chunk."""

    merge: MergeFn
    statistics: StatisticsFn | None = None
    #: False when a chunk's result depends on other rows (the executor then never splits).
    chunkable: bool = True
    #: True when ``merge`` takes its inputs in their stored dtype (read-only) and computes
    #: in float32 itself, which spares a float32 copy of every input (see linear).
    stored_dtype_inputs: bool = False
    #: Chooses the output tensors itself (passthrough's layer stacking); by default every
    #: tensor of the first input is merged from the same-named tensor of every input.
    plan_tensors: Callable[..., Any] | None = None
    #: (recipe, checkpoints) -> {source name: lazy Checkpoint} for ``plan_tensors`` to copy from
    derived_inputs: Callable[[Recipe, dict[str, Checkpoint]], dict[str, Checkpoint]] | None = None

    @property
    def streaming(self) -> bool:
        return True


@dataclass(frozen=True, kw_only=True)
class ModelMethod(MethodInfo):
    """A whole-model method: loads the models (and usually the task's data) and returns the
    fused model in one piece."""

    fuse: Callable[[Recipe, dict[str, Checkpoint], RunOptions], ModelFuseOutput]
    needs_task: bool = False
    #: The method's own checks that need only the recipe, raising the typed error ``fuse``
    #: raises for the same problem (``fuse`` runs them first): ``validate`` and ``plan`` run
    #: them too, so they refuse what a run would refuse before any tensor is read.
    preflight: Callable[[Recipe], None] | None = None
    #: (recipe, checkpoints) -> bytes of statistics the method caches on disk.
    cache_bytes: Callable[[Recipe, dict[str, Checkpoint]], int] | None = None

    @property
    def streaming(self) -> bool:
        return False


#: A registry entry of either kind.
Method = TensorMethod | ModelMethod
