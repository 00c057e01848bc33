"""Multi-task merging on bundled scikit-learn data: one shared trunk, one head per task.

``task.model: recipes/tasks/multitask.py:build_model`` and
``task.data: recipes/tasks/multitask.py:data`` with ``task.params: {task: NAME}``.

Tasks (``task`` parameter):

* ``digits``, ``parity``, ``ge5``, ``mod3``: the 8x8 handwritten digits and their relabelings
  (see ``digits.py``), pixels scaled to [0, 1];
* ``breast_cancer`` (malignant vs. benign, 30 features) and ``wine`` (3 cultivars, 13
  features): tabular data, standardised with the training split's mean and deviation and
  zero-padded to the same 64-d input as the digits.

Splits are fixed (seeded): 60 % train, 20 % val, 20 % test. The model is a trunk of
``depth`` Linear+ReLU layers (``trunk.{2i}.weight``) and a task head ``head`` (Linear to
the task's classes), so ``heads: "re:^head\\."`` keeps each fine-tune's head in a merge.
"""

from __future__ import annotations

from collections import OrderedDict
from functools import cache
from pathlib import Path

import torch
from torch import nn

from merge_cli.task import load_callable

INPUT_DIM = 64
DIGITS_TASKS = {"digits": 10, "parity": 2, "ge5": 2, "mod3": 3}
TABULAR_TASKS = {"breast_cancer": 2, "wine": 3}
TASK_CLASSES = {**DIGITS_TASKS, **TABULAR_TASKS}
_DIGITS = str(Path(__file__).with_name("digits.py"))


def _bounds(n: int, split: str) -> tuple[int, int]:
    bounds = {
        "train": (0, int(0.6 * n)),
        "val": (int(0.6 * n), int(0.8 * n)),
        "test": (int(0.8 * n), n),
    }
    if split not in bounds:
        raise ValueError(f"unknown split {split!r}")
    return bounds[split]


@cache
def _tabular(task: str) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn import datasets

    bunch = {"breast_cancer": datasets.load_breast_cancer, "wine": datasets.load_wine}[task]()
    features = torch.tensor(bunch.data, dtype=torch.float32)
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    features, labels = features[order], labels[order]
    start, stop = _bounds(len(labels), "train")
    mean = features[start:stop].mean(0)
    std = features[start:stop].std(0).clamp_min(1e-6)
    padded = torch.zeros(len(labels), INPUT_DIM)
    padded[:, : features.shape[1]] = (features - mean) / std
    return padded, labels


def split_arrays(split: str, task: str = "digits") -> tuple[torch.Tensor, torch.Tensor]:
    """All examples of ``split`` for ``task`` as two tensors (inputs [N, 64], labels [N])."""
    if task in DIGITS_TASKS:
        return load_callable(f"{_DIGITS}:split_arrays", "digits")(split, task)
    if task not in TABULAR_TASKS:
        raise ValueError(f"unknown task {task!r} (have: {', '.join(TASK_CLASSES)})")
    features, labels = _tabular(task)
    start, stop = _bounds(len(labels), split)
    return features[start:stop], labels[start:stop]


def data(
    split: str, task: str = "digits", batch_size: int = 128
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (inputs [B, 64], labels [B]) of ``split`` for ``task``."""
    inputs, labels = split_arrays(split, task)
    return [
        (inputs[i : i + batch_size], labels[i : i + batch_size])
        for i in range(0, len(labels), batch_size)
    ]


def build_model(task: str = "digits", hidden: int = 64, depth: int = 2) -> nn.Sequential:
    """Trunk (``depth`` x Linear+ReLU, ``trunk.*``) and a head for ``task`` (``head.*``)."""
    layers: list[nn.Module] = []
    width = INPUT_DIM
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    return nn.Sequential(
        OrderedDict(trunk=nn.Sequential(*layers), head=nn.Linear(width, TASK_CLASSES[task]))
    )
