"""Linear paths between two models and the loss barrier along a path.

The barrier follows Entezari et al. 2022, "The role of permutation invariance in linear mode
connectivity of neural networks" (ICLR): the largest rise of a metric above the straight line
between its values at the two endpoints,

    B = max_t [ f(theta(t)) - ((1 - t) f(theta_0) + t f(theta_1)) ],

the loss form of Frankle et al. 2020's error barrier ("Linear mode connectivity and the
lottery ticket hypothesis", ICML). It is 0 at the endpoints, so never negative.
"""

from __future__ import annotations

import torch

from merge_cli.io.dtypes import is_float


def interpolate_state_dicts(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], t: float
) -> dict[str, torch.Tensor]:
    """``(1 - t) a + t b`` for every floating tensor (computed in float32, cast back to
    ``a``'s dtype); integer and boolean tensors (step counters, masks) are taken from ``a``."""
    out = {}
    for name, tensor in a.items():
        if is_float(tensor.dtype):
            mixed = tensor.float().mul(1.0 - t).add_(b[name].float(), alpha=t)
            out[name] = mixed.to(tensor.dtype)
        else:
            out[name] = tensor
    return out


def path_points(points: int) -> list[float]:
    """``points`` evenly spaced positions ``t`` from 0 to 1, both ends included."""
    return [i / (points - 1) for i in range(points)]


def loss_barrier(values: list[float]) -> float:
    """Barrier of ``values`` measured at evenly spaced ``t`` from 0 to 1 (both ends included):
    the largest excess over the linear interpolation of the two end values."""
    if len(values) < 2:
        raise ValueError("loss_barrier: needs the values at two or more points")
    first, last = values[0], values[-1]
    return max(
        value - ((1.0 - t) * first + t * last)
        for value, t in zip(values, path_points(len(values)), strict=True)
    )
