"""REPAIR (Jordan, Sedghi, Saukh, Entezari & Neyshabur 2023, "REPAIR: REnormalizing
Permuted Activations for Interpolation Repair", ICLR).

Averaging two aligned networks shrinks the variance of their hidden units ("variance
collapse"), which alone causes much of the loss barrier. REPAIR measures, on training data,
each unit's mean and standard deviation in the endpoint networks and rescales the fused
network's unit so that its statistics are the interpolation of the endpoints':
``mu* = sum_m w_m mu_m``, ``sigma* = sum_m w_m sigma_m``. For a unit produced by a layer
``z = W x + b`` that is an affine correction folded into the layer,
``W <- W sigma*/sigma``, ``b <- (b - mu) sigma*/sigma + mu*``, applied layer after layer in
forward order. Where a BatchNorm normalises the units, resetting its running statistics on
the fused network's own activations is the same correction (the paper's "reset BN" case).

It runs after the fuse step, on the fused checkpoint: :func:`repair_state_dict` returns the
corrected tensors, and the pipeline saves them in place of the uncorrected output.
"""

from __future__ import annotations

from dataclasses import replace
from itertools import islice

import torch

from merge_cli.align.activations import Moments, feature_moments
from merge_cli.align.spec import PermutationSpec
from merge_cli.connect.batchnorm import recompute_batchnorm
from merge_cli.io.checkpoint import Checkpoint
from merge_cli.task import Task


@torch.no_grad()
def repair_state_dict(
    task: Task,
    spec: PermutationSpec,
    merged: dict[str, torch.Tensor],
    endpoints: list[Checkpoint],
    weights: list[float],
    max_batches: int | None = None,
) -> dict[str, torch.Tensor]:
    """The fused state dict with REPAIR's statistics correction applied."""
    model = task.build_model()
    model.load_state_dict(merged)
    model.eval()
    recompute_batchnorm(model, islice(task.data("train"), max_batches), "cpu")
    groups = [replace(g, sites=(g.producer,)) for g in spec.groups if g.producer is not None]
    if groups:
        ends = [task.load_model(checkpoint) for checkpoint in endpoints]
        total = sum(weights)
        target = {}
        stats = [
            feature_moments([end], groups, task.data("train"), max_batches, outer=False)
            for end in ends
        ]
        for group in groups:
            means = [s[group.name].mean for s in stats]
            stds = [_std(s[group.name]) for s in stats]
            target[group.name] = (
                sum(w * m for w, m in zip(weights, means, strict=True)) / total,
                sum(w * s for w, s in zip(weights, stds, strict=True)) / total,
            )
        for group in groups:
            (current,) = feature_moments(
                [model], [group], task.data("train"), max_batches, outer=False
            ).values()
            mean, std = current.mean, _std(current)
            target_mean, target_std = target[group.name]
            scale = (target_std / std.clamp(min=1e-8)).float()
            layer = model.get_submodule(group.producer)
            layer.weight.mul_(scale.reshape(-1, *[1] * (layer.weight.dim() - 1)))
            if layer.bias is not None:
                layer.bias.copy_((layer.bias - mean.float()) * scale + target_mean.float())
    state = model.state_dict()
    return {name: state[name].to(tensor.dtype) for name, tensor in merged.items()}


def _std(moments: Moments) -> torch.Tensor:
    """Per-unit standard deviation from first and (diagonal) second moments."""
    return moments.variance().clamp(min=0).sqrt()
