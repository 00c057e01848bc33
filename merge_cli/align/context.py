"""What an aligner gets besides the checkpoints: the task (for data) and a note sink."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from merge_cli.task import Task


@dataclass(frozen=True)
class AlignContext:
    """``task`` is None when the recipe has none (weight-only methods do not need it)."""

    task: Task | None
    note: Callable[[str], None]
    device: str = "cpu"
