"""Curve finding: train the bend of a low-loss curve between two fixed models.

Garipov et al. 2018, "Loss surfaces, mode connectivity, and fast ensembling of DNNs"
(NeurIPS), section 3.2: the endpoints stay fixed and the bend ``theta`` of a quadratic Bezier
curve or polygonal chain (:mod:`merge_cli.connect.path`) minimises the expected loss
``E_{t ~ U(0, 1)} L(phi_theta(t))`` on the task's training data, one uniformly drawn ``t``
per batch. The bend starts at the midpoint of the endpoints (the linear path). BatchNorm
layers train on batch statistics; the saved model gets its running statistics recomputed
on the training data. The ``curve`` fuse method (:mod:`merge_cli.fuse.datamerge.curve`) runs
this and
saves the model at ``t`` and the bend.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from merge_cli.connect.path import combine, curve_coefficients
from merge_cli.progress import NullProgress, Progress
from merge_cli.task import LossFn, logits_of, to_device


def _outputs(model: nn.Module, params: dict[str, torch.Tensor], inputs: Any) -> torch.Tensor:
    if isinstance(inputs, dict):
        outputs = functional_call(model, params, args=(), kwargs=inputs)
    else:
        outputs = functional_call(model, params, (inputs,))
    return logits_of(outputs)


def train_bend(
    model: nn.Module,
    start: dict[str, torch.Tensor],
    end: dict[str, torch.Tensor],
    batches: list[tuple[Any, torch.Tensor]],
    loss_fn: LossFn,
    kind: str = "bezier",
    epochs: int = 30,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str = "cpu",
    progress: Progress | None = None,
) -> tuple[dict[str, torch.Tensor], list[float]]:
    """The trained bend (the model's parameters only) and the mean loss of every epoch."""
    progress = progress or NullProgress()
    names = [name for name, _ in model.named_parameters()]
    first = {n: start[n].float().to(device) for n in names}
    last = {n: end[n].float().to(device) for n in names}
    bend = {n: ((first[n] + last[n]) / 2).requires_grad_() for n in names}
    optimizer = torch.optim.Adam(bend.values(), lr=lr, weight_decay=weight_decay)
    generator = torch.Generator().manual_seed(seed)
    epoch_losses = []
    model.to(device).train()
    progress.start("training curve", epochs * len(batches), unit="steps")
    accelerator = torch.device(device)
    devices = [accelerator.index or 0] if accelerator.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # dropout draws stay seeded and local
        torch.manual_seed(seed)
        for _ in range(epochs):
            total = 0.0
            for index in torch.randperm(len(batches), generator=generator).tolist():
                inputs, targets = batches[index]
                t = float(torch.rand((), generator=generator))
                coefficients = curve_coefficients(kind, t)
                params = {n: combine((first[n], bend[n], last[n]), coefficients) for n in names}
                loss = loss_fn(
                    _outputs(model, params, to_device(inputs, device)), targets.to(device)
                )
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
                progress.advance(1)
            epoch_losses.append(total / len(batches))
    progress.finish()
    model.eval()
    return {n: value.detach().cpu() for n, value in bend.items()}, epoch_losses
