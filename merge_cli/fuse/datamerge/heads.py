"""Task-specific heads: merge the shared trunk, keep every task's own head.

In multi-task merging each fine-tuned model carries a head for its own task (a classifier
with its own number of classes), and only the shared trunk is merged: this is how task
arithmetic (Ilharco et al. 2023), RegMean (Jin et al. 2023), AdaMerging (Yang et al. 2024)
and FusionBench (Tang et al. 2024) evaluate merged models.

A data-aware method's ``heads`` parameter names the head tensors (a glob, or ``re:`` + a
regular expression, as in ``fuse.rules``). Those are never merged. The output holds the
merged trunk under the original tensor names and each fused model's head tensors under
``heads.<model>.<tensor>`` (the base model's head, if any, is dropped).
:func:`task_state_dict` turns such an output back into the state dict of one task's model.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from merge_cli.errors import PlanError
from merge_cli.io.checkpoint import Checkpoint

HEADS_PREFIX = "heads."


def is_head(name: str, pattern: str | None) -> bool:
    """Whether tensor ``name`` belongs to a task-specific head."""
    if pattern is None:
        return False
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def head_output_name(model: str, tensor: str) -> str:
    """Name of model ``model``'s head tensor ``tensor`` in a merged output."""
    return f"{HEADS_PREFIX}{model}.{tensor}"


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
