"""Recompute BatchNorm running statistics for a model whose weights were mixed.

Averaged or interpolated weights do not match their averaged running statistics, so every
point on a path is evaluated after one pass over training data in train mode with a
cumulative average (Garipov et al. 2018, section 4; Izmailov et al. 2018, SWA's ``bn_update``).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from merge_cli.task import model_outputs


def batchnorm_layers(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorm_layers(model))


@torch.no_grad()
def recompute_batchnorm(model: nn.Module, batches: Iterable[tuple[Any, Any]], device: str) -> None:
    """Reset every BatchNorm layer's running statistics and re-estimate them on ``batches``
    (an exact average over the batches: momentum ``None``). The model is left in eval mode."""
    layers = batchnorm_layers(model)
    if not layers:
        return
    momenta = [layer.momentum for layer in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None
    model.train()
    for inputs, _ in batches:
        model_outputs(model, inputs, device)
    for layer, momentum in zip(layers, momenta, strict=True):
        layer.momentum = momentum
    model.eval()
