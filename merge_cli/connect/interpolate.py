"""Linear paths between two models and the loss barrier along them.

Frankle et al. 2020 ("Linear mode connectivity and the lottery ticket hypothesis") and
Entezari et al. 2022 define the barrier of a path ``theta(t) = (1 - t) theta_a + t theta_b``
as the largest rise of the loss above the straight line between the endpoints' losses:
``max_t [L(theta(t)) - ((1 - t) L(theta_a) + t L(theta_b))]``. Shared by the alignment
tests and the ``barrier`` metric.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def interpolate_state_dicts(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], t: float
) -> dict[str, torch.Tensor]:
    """``(1 - t) a + t b`` for floating tensors; integer tensors (counters) are taken from a."""
    return {
        name: torch.lerp(tensor, b[name].to(tensor.dtype), t)
        if tensor.is_floating_point()
        else tensor.clone()
        for name, tensor in a.items()
    }


def loss_barrier(values: Sequence[float]) -> float:
    """Barrier of losses measured at evenly spaced points ``t = 0, ..., 1`` along a path."""
    count = len(values)
    if count < 2:
        raise ValueError("loss_barrier needs the values at two or more points")
    first, last = values[0], values[-1]
    return max(
        value - ((1 - i / (count - 1)) * first + i / (count - 1) * last)
        for i, value in enumerate(values)
    )
