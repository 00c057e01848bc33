"""Task-specific heads in data-aware methods: merge the shared trunk, keep every task's head.

The naming (``heads`` patterns, ``heads.<model>.<tensor>`` outputs) is the engine's
(:mod:`merge_cli.engine.heads`), shared with the per-tensor methods. Here: the trunk a
whole-model method merges, its output with the heads added back, and
:func:`task_state_dict`, which turns such an output back into one task model's state dict.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from merge_cli.engine.heads import HEADS_PREFIX, head_output_name, is_head
from merge_cli.errors import PlanError
from merge_cli.io.checkpoint import Checkpoint

__all__ = [
    "HEADS_PREFIX",
    "Trunk",
    "head_output_name",
    "is_head",
    "shared_trunk",
    "task_state_dict",
    "with_heads",
]


def task_state_dict(merged: Mapping[str, torch.Tensor], model: str) -> dict[str, torch.Tensor]:
    """The state dict of ``model``'s task network: the merged trunk plus its own head."""
    prefix = head_output_name(model, "")
    state = {name: t for name, t in merged.items() if not name.startswith(HEADS_PREFIX)}
    state.update({name[len(prefix) :]: t for name, t in merged.items() if name.startswith(prefix)})
    return state


@dataclass(frozen=True)
class Trunk:
    """The tensors to merge: ``names`` (in ``reference``'s order) are shared by every model."""

    reference: str
    names: list[str]


def shared_trunk(
    checkpoints: dict[str, Checkpoint],
    model_names: list[str],
    base: str | None,
    heads: str | None,
) -> Trunk:
    """The trunk tensors; raise :class:`PlanError` naming every missing or mismatched one."""
    reference = base or model_names[0]
    everyone = list(dict.fromkeys([reference, *model_names]))
    problems = []
    names = []
    for name in checkpoints[reference].tensor_names():
        if is_head(name, heads):
            continue
        shape = checkpoints[reference].info(name).shape
        ok = True
        for model in everyone[1:]:
            if name not in checkpoints[model].tensor_names():
                problems.append(f"tensor {name!r} is missing in model {model!r}")
                ok = False
            elif checkpoints[model].info(name).shape != shape:
                problems.append(
                    f"tensor {name!r}: shape {list(checkpoints[model].info(name).shape)} in "
                    f"model {model!r} differs from {list(shape)} in {reference!r}"
                    + ("" if heads else " (task-specific heads? set the method's `heads`)")
                )
                ok = False
        if ok:
            names.append(name)
    if problems:
        raise PlanError("the models cannot be merged:\n  " + "\n  ".join(problems[:20]))
    return Trunk(reference, names)


def with_heads(
    trunk: dict[str, torch.Tensor],
    checkpoints: dict[str, Checkpoint],
    model_names: list[str],
    heads: str | None,
) -> dict[str, torch.Tensor]:
    """The merged trunk plus every fused model's head tensors under ``heads.<model>.``."""
    output = dict(trunk)
    if heads is None:
        return output
    for model in model_names:
        for name in checkpoints[model].tensor_names():
            if is_head(name, heads):
                output[head_output_name(model, name)] = checkpoints[model].read(name)
    return output
