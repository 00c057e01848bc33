"""Real-data task for recipes and tests: scikit-learn's handwritten digits (ships offline).

``task.model: recipes/tasks/digits.py:build_mlp`` (or ``build_cnn``, a BatchNorm CNN) and
``task.data: recipes/tasks/digits.py:data`` in a recipe. ``task.params`` are passed to both
(e.g. ``{hidden: 256, depth: 3, task: parity}``).

Splits are fixed (seeded): 60 % train, 20 % val, 20 % test of the 1,797 images.
Tasks (``task`` parameter) relabel the same images, for multi-task merging experiments:
``digits`` (10 classes), ``parity`` (even/odd), ``ge5`` (digit >= 5), ``mod3``
(digit mod 3), ``small`` (digit in 0..4 vs. the rest is ``ge5``'s complement, so not offered).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

TASK_CLASSES = {"digits": 10, "parity": 2, "ge5": 2, "mod3": 3}


@lru_cache(maxsize=1)
def _arrays() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = torch.tensor(bunch.data, dtype=torch.float32) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return images[order], labels[order]


def relabel(labels: torch.Tensor, task: str) -> torch.Tensor:
    if task == "digits":
        return labels
    if task == "parity":
        return labels % 2
    if task == "ge5":
        return (labels >= 5).long()
    if task == "mod3":
        return labels % 3
    raise ValueError(f"unknown digits task {task!r} (have: {', '.join(TASK_CLASSES)})")


def split_arrays(split: str, task: str = "digits") -> tuple[torch.Tensor, torch.Tensor]:
    """All examples of ``split`` ("train", "val" or "test") as two tensors."""
    images, labels = _arrays()
    n = len(labels)
    bounds = {
        "train": (0, int(0.6 * n)),
        "val": (int(0.6 * n), int(0.8 * n)),
        "test": (int(0.8 * n), n),
    }
    if split not in bounds:
        raise ValueError(f"unknown split {split!r}")
    start, stop = bounds[split]
    return images[start:stop], relabel(labels[start:stop], task)


def data(
    split: str, task: str = "digits", batch_size: int = 128
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of (images [B, 64], labels [B]) for ``split``."""
    images, labels = split_arrays(split, task)
    return [
        (images[i : i + batch_size], labels[i : i + batch_size])
        for i in range(0, len(labels), batch_size)
    ]


def build_mlp(
    hidden: int = 256, depth: int = 3, task: str = "digits", batchnorm: bool = False
) -> nn.Sequential:
    """An MLP 64 -> hidden (x depth, ReLU) -> classes; names ``layers.{i}.weight``."""
    layers: list[nn.Module] = []
    width = 64
    for _ in range(depth):
        layers.append(nn.Linear(width, hidden))
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers.append(nn.ReLU())
        width = hidden
    layers.append(nn.Linear(width, TASK_CLASSES[task]))
    model = nn.Sequential()
    model.add_module("layers", nn.Sequential(*layers))
    return model


def build_cnn(width: int = 32, task: str = "digits") -> nn.Sequential:
    """A BatchNorm CNN on the 8x8 images: conv 1 -> width -> 2 width (3x3, BatchNorm, ReLU),
    global average pooling, linear -> classes. Takes the flat [B, 64] images of :func:`data`;
    names ``layers.{i}.weight`` (the built-in ``cnn`` spec)."""
    model = nn.Sequential()
    model.add_module(
        "layers",
        nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * width, TASK_CLASSES[task]),
        ),
    )
    return model


def train(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    epochs: int = 30,
    lr: float = 1e-3,
    seed: int = 0,
) -> nn.Module:
    """Plain Adam training with seeded shuffling of the batches' examples."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.cat([x for x, _ in batches])
    labels = torch.cat([y for _, y in batches])
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for i in range(0, len(labels), 64):
            index = order[i : i + 64]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(images[index]), labels[index])
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in batches)
    return correct / sum(len(y) for _, y in batches)
