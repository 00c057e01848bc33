"""Loading a checkpoint into a task's model and scoring it on the task's data.

Shared by the metrics, the barrier, greedy soups and curve training. Weights are copied into
the model tensor by tensor (with progress), so loading a multi-GB checkpoint needs the model's
memory plus one tensor, not two copies of the model.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from merge_cli.errors import TaskError
from merge_cli.io.checkpoint import Checkpoint
from merge_cli.progress import NullProgress, Progress
from merge_cli.task import LossFn, model_outputs


@dataclass(frozen=True)
class Scores:
    """Mean loss and accuracy of one model on one split (``examples`` examples)."""

    loss: float
    accuracy: float
    examples: int


def load_weights(
    model: nn.Module,
    checkpoint: Checkpoint,
    progress: Progress | None = None,
    label: str | None = None,
) -> nn.Module:
    """Copy ``checkpoint``'s tensors into ``model`` (names and shapes must match exactly;
    a tied parameter may be absent when the tensor it shares storage with is present)."""
    progress = progress or NullProgress()
    expected = model.state_dict(keep_vars=True)
    names = checkpoint.tensor_names()
    present = set(names)
    loaded_storage = {expected[n].data_ptr() for n in names if n in expected}
    missing = [
        n for n in expected if n not in present and expected[n].data_ptr() not in loaded_storage
    ]
    unexpected = [n for n in names if n not in expected]
    if missing or unexpected:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} tensor(s), e.g. {missing[0]!r}")
        if unexpected:
            detail.append(f"{len(unexpected)} unexpected tensor(s), e.g. {unexpected[0]!r}")
        raise TaskError(f"{checkpoint.source}: does not fit the task's model: {'; '.join(detail)}")
    progress.start(
        f"loading {label or checkpoint.source}", sum(checkpoint.info(n).nbytes for n in names)
    )
    with torch.no_grad():
        for name in names:
            target = expected[name]
            value = checkpoint.read(name)
            if tuple(value.shape) != tuple(target.shape):
                progress.finish()
                raise TaskError(
                    f"{checkpoint.source}: tensor {name!r} has shape {list(value.shape)}, "
                    f"the task's model expects {list(target.shape)}"
                )
            target.data.copy_(value)
            progress.advance(checkpoint.info(name).nbytes)
    progress.finish()
    return model


def read_weights(
    checkpoint: Checkpoint, progress: Progress | None = None, label: str | None = None
) -> dict[str, torch.Tensor]:
    """Every tensor of ``checkpoint`` in memory, reporting progress in bytes."""
    progress = progress or NullProgress()
    names = checkpoint.tensor_names()
    progress.start(
        f"reading {label or checkpoint.source}", sum(checkpoint.info(n).nbytes for n in names)
    )
    state = {}
    for name in names:
        state[name] = checkpoint.read(name)
        progress.advance(checkpoint.info(name).nbytes)
    progress.finish()
    return state


def batch_accuracy(logits: torch.Tensor, targets: torch.Tensor, causal: bool) -> tuple[int, int]:
    """(correct, counted) predictions of one batch; for a causal LM, of the next token."""
    if causal:
        logits, targets = logits[..., :-1, :], targets[..., 1:]
    if logits.shape[:-1] != targets.shape:
        raise TaskError(
            f"accuracy: the model's outputs {list(logits.shape)} are not class scores for "
            f"targets of shape {list(targets.shape)}"
        )
    valid = targets != -100
    correct = (logits.argmax(-1) == targets) & valid
    return int(correct.sum()), int(valid.sum())


@torch.no_grad()
def score(
    model: nn.Module,
    batches: Iterable[tuple[Any, torch.Tensor]],
    loss_fn: LossFn,
    device: str = "cpu",
    causal: bool = False,
    progress: Progress | None = None,
    label: str = "evaluating",
) -> Scores:
    """Mean loss (weighted by batch size) and accuracy of ``model`` over ``batches``."""
    progress = progress or NullProgress()
    batches = list(batches)
    if not batches:
        raise TaskError("task.data: the split holds no batches")
    progress.start(label, len(batches), unit="batches")
    model.eval()
    loss_sum = 0.0
    examples = correct = counted = 0
    for inputs, targets in batches:
        targets = targets.to(device)
        logits = model_outputs(model, inputs, device)
        size = len(targets)
        loss_sum += float(loss_fn(logits.float(), targets)) * size
        examples += size
        if logits.dim() >= 2 and not targets.is_floating_point():  # class targets
            hits, total = batch_accuracy(logits, targets, causal)
            correct += hits
            counted += total
        progress.advance(1)
    progress.finish()
    accuracy = correct / counted if counted else float("nan")
    return Scores(loss_sum / examples, accuracy, examples)
