"""The merge plan: which output tensor comes from which inputs, and into which shard.

The plan is fixed before any tensor is read — from checkpoint headers alone — so each output
shard is an independent unit of work (the shape a cluster array job or a resumable run
needs), and every missing tensor or shape mismatch is reported before the run starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from merge_cli.engine.heads import head_output_name, is_head
from merge_cli.engine.method import TensorMethod
from merge_cli.engine.vocab import is_vocab_tensor
from merge_cli.errors import PlanError
from merge_cli.io.checkpoint import Checkpoint, TensorInfo
from merge_cli.io.dtypes import RECIPE_DTYPES, is_float

#: Names a tensor source: (model name, tensor name).
Source = tuple[str, str]


@dataclass(frozen=True)
class OutputTensor:
    """One tensor of the output checkpoint and where it comes from."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    #: Same-named tensors of the fused models, in ``fuse.models`` order (empty when copied).
    inputs: tuple[Source, ...] = ()
    base: Source | None = None
    #: Set when the tensor is copied rather than merged (integer tensors, passthrough).
    copy_from: Source | None = None

    @property
    def nbytes(self) -> int:
        return TensorInfo(self.name, self.shape, self.dtype).nbytes

    @property
    def sources(self) -> list[Source]:
        """What is read for this tensor: the copied source or the fused inputs, then the base."""
        read = [self.copy_from] if self.copy_from else list(self.inputs)
        return read + ([self.base] if self.base is not None else [])


@dataclass
class MergePlan:
    """Output tensors in write order, split into shards, plus config changes to apply."""

    tensors: list[OutputTensor]
    shards: list[list[OutputTensor]]
    model_names: list[str]
    base: str | None
    #: Model whose config/tokenizer files are copied to the output.
    config_source: str
    config_updates: dict[str, Any] = field(default_factory=dict)
    #: Lazy inputs the method derives from the models (see ``Method.derived_inputs``).
    derived: dict[str, Checkpoint] = field(default_factory=dict)

    def sources(self, checkpoints: dict[str, Checkpoint]) -> dict[str, Checkpoint]:
        """Every checkpoint the plan reads from: the inputs and the derived ones."""
        return {**checkpoints, **self.derived}

    @property
    def bytes_written(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def shard_file_names(self) -> list[str]:
        if len(self.shards) == 1:
            return ["model.safetensors"]
        n = len(self.shards)
        return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def output_dtype(source: torch.dtype, save_dtype: str) -> torch.dtype:
    """Output dtype of a tensor: integer/bool tensors are never cast."""
    if save_dtype == "keep" or not is_float(source):
        return source
    return RECIPE_DTYPES[save_dtype]


def aligned_tensors(
    checkpoints: dict[str, Checkpoint],
    model_names: list[str],
    base: str | None,
    save_dtype: str,
    heads: str | None = None,
) -> list[OutputTensor]:
    """Default plan: every tensor of the base (or first model), merged across all inputs;
    with ``heads``, the tensors it matches are each fused model's own, copied under
    ``heads.<model>.<tensor>`` (:mod:`merge_cli.engine.heads`).

    Raises :class:`PlanError` listing every tensor missing from a model and every shape
    mismatch, so one run shows all of them.
    """
    reference = base or model_names[0]
    problems: list[str] = []
    tensors = []
    everyone = list(dict.fromkeys([*model_names, *([base] if base else [])]))
    for name in checkpoints[reference].tensor_names():
        if is_head(name, heads):
            continue
        info = checkpoints[reference].info(name)
        ok = True
        for model in everyone:
            other = checkpoints[model]
            if model == reference:
                continue
            if name not in _names(other):
                problems.append(f"tensor {name!r} is missing in model {model!r} ({other.source})")
                ok = False
                continue
            other_info = other.info(name)
            if other_info.shape != info.shape:
                hint = ""
                if is_vocab_tensor(name) and other_info.shape[1:] == info.shape[1:]:
                    hint = (
                        " (the vocabularies differ; set fuse.tokenizer_source: base to keep "
                        f"{reference!r}'s, or union to merge them)"
                    )
                elif heads is None:
                    hint = " (task-specific heads? set fuse.params.heads)"
                problems.append(
                    f"tensor {name!r}: shape {list(other_info.shape)} in model {model!r} "
                    f"differs from {list(info.shape)} in {reference!r}{hint}"
                )
                ok = False
        if not ok:
            continue
        dtype = output_dtype(info.dtype, save_dtype)
        if not is_float(info.dtype):
            tensors.append(OutputTensor(name, info.shape, dtype, copy_from=(reference, name)))
        else:
            tensors.append(
                OutputTensor(
                    name,
                    info.shape,
                    dtype,
                    inputs=tuple((m, name) for m in model_names),
                    base=(base, name) if base else None,
                )
            )
    if heads is not None:
        tensors += _head_tensors(checkpoints, model_names, heads, save_dtype)
    if problems:
        raise PlanError(_problem_report(problems))
    return tensors


def _head_tensors(
    checkpoints: dict[str, Checkpoint], model_names: list[str], heads: str, save_dtype: str
) -> list[OutputTensor]:
    """Each fused model's head tensors, copied under ``heads.<model>.<tensor>``."""
    tensors = []
    for model in model_names:
        for name in checkpoints[model].tensor_names():
            if is_head(name, heads):
                info = checkpoints[model].info(name)
                dtype = output_dtype(info.dtype, save_dtype)
                out_name = head_output_name(model, name)
                tensors.append(OutputTensor(out_name, info.shape, dtype, copy_from=(model, name)))
    if not tensors:
        raise PlanError(
            f"fuse.params.heads: {heads!r} matches no tensor of the fused models "
            f"({', '.join(model_names)})"
        )
    return tensors


def _names(checkpoint: Checkpoint) -> set[str]:
    return set(checkpoint.tensor_names())


def _problem_report(problems: list[str], limit: int = 20) -> str:
    shown = problems[:limit]
    more = len(problems) - len(shown)
    text = "the models cannot be merged:\n  " + "\n  ".join(shown)
    if more:
        text += f"\n  ... and {more} more"
    return text


def split_into_shards(tensors: list[OutputTensor], shard_size: int) -> list[list[OutputTensor]]:
    """Greedy, in order: a new shard starts when the next tensor would exceed ``shard_size``."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for tensor in tensors:
        if shards[-1] and size + tensor.nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(tensor)
        size += tensor.nbytes
    return shards


def build_plan(
    method: TensorMethod,
    params: Any,
    checkpoints: dict[str, Checkpoint],
    model_names: list[str],
    base: str | None,
    save_dtype: str,
    shard_size: int,
    derived: dict[str, Checkpoint] | None = None,
    heads: str | None = None,
) -> MergePlan:
    """The whole plan for a streaming method, from checkpoint headers only."""
    config_updates: dict[str, Any] = {}
    config_source = base or model_names[0]
    derived = derived or {}
    if method.plan_tensors is not None:
        tensors, config_updates, config_source = method.plan_tensors(
            {**checkpoints, **derived}, model_names, base, params, save_dtype
        )
    else:
        tensors = aligned_tensors(checkpoints, model_names, base, save_dtype, heads)
    if not tensors:
        raise PlanError("the plan has no output tensors")
    return MergePlan(
        tensors=tensors,
        shards=split_into_shards(tensors, shard_size),
        model_names=model_names,
        base=base,
        config_source=config_source,
        config_updates=config_updates,
        derived=derived,
    )
