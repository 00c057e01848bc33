"""``merge_cli.load``: any merge-cli output (or input) as one ``nn.Module``.

An ensemble directory (``ensemble.json``) becomes an
:class:`~merge_cli.task.ensemble.Ensemble`; any other checkpoint is built by a task's model
builder and loaded strictly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from merge_cli.errors import TaskError
from merge_cli.io.resolve import open_checkpoint
from merge_cli.recipe import TaskSpec
from merge_cli.task import Task
from merge_cli.task.ensemble import is_ensemble, load_ensemble


def as_task_spec(task: TaskSpec | dict[str, Any] | str | None) -> TaskSpec | None:
    """A task given as a spec, a mapping, or just the model builder's reference."""
    if task is None or isinstance(task, TaskSpec):
        return task
    if isinstance(task, str):
        return TaskSpec(model=task)
    return TaskSpec.model_validate(task)


def load(
    path: str | Path, task: TaskSpec | dict[str, Any] | str | None = None, device: str = "cpu"
) -> nn.Module:
    """Load ``path`` as a module in eval mode.

    ``task`` says how to build the architecture: ``"module:function"``, ``"file.py:function"``,
    ``"transformers"``, a mapping like a recipe's ``task:`` or a :class:`TaskSpec`. An ensemble
    directory needs none (its members' tasks are recorded in it); a checkpoint directory with
    a config.json defaults to ``"transformers"``.
    """
    spec = as_task_spec(task)
    if is_ensemble(path):
        return load_ensemble(path, spec, device)
    checkpoint = open_checkpoint(str(path))
    if spec is None:
        directory = checkpoint.directory
        if directory is None or not (directory / "config.json").exists():
            raise TaskError(
                f"{path}: say how to build the model: merge_cli.load(path, task='module:function')"
            )
        spec = TaskSpec(model="transformers")
    return Task(spec).load_model(checkpoint, device)
