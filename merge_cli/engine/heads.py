"""Task-specific heads: which tensors are a model's own head, and their names in an output.

In multi-task merging each fine-tuned model carries a head for its own task (a classifier
with its own number of classes), and only the shared trunk is merged: this is how task
arithmetic (Ilharco et al. 2023), TIES (Yadav et al. 2023), RegMean (Jin et al. 2023),
AdaMerging (Yang et al. 2024) and FusionBench (Tang et al. 2024) evaluate merged models.

``fuse.params.heads`` names the head tensors (a glob, or ``re:`` + a regular expression, as
in ``fuse.rules``) for every method that merges weights. Those are never merged: the output
holds the merged trunk under the original tensor names and each fused model's head tensors
under ``heads.<model>.<tensor>`` (the base model's head, if any, is dropped).
"""

from __future__ import annotations

import fnmatch
import re

from pydantic import BaseModel, ConfigDict, Field

HEADS_PREFIX = "heads."


class HeadsParams(BaseModel):
    """The ``heads`` parameter every per-tensor method takes besides its own."""

    model_config = ConfigDict(extra="forbid")

    heads: str | None = Field(
        None,
        description='task-specific head tensors kept per model, not merged: a glob or "re:" + '
        'regex (e.g. "re:^head\\\\."); saved as heads.<model>.<tensor>',
    )


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
