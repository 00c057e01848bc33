"""Curves with one bend between two models: quadratic Bezier and polygonal chain.

Garipov et al. 2018, "Loss surfaces, mode connectivity, and fast ensembling of DNNs"
(NeurIPS), section 3: with endpoints ``w0``, ``w1`` and one bend ``theta``,

* Bezier:  ``phi(t) = (1 - t)^2 w0 + 2 t (1 - t) theta + t^2 w1``
* polygonal chain ("polychain"):  ``w0 -> theta`` for ``t`` in [0, 0.5], ``theta -> w1`` after.

A linear path is the chain whose bend is the midpoint. Tensors the bend does not hold
(BatchNorm running statistics, which are recomputed per point anyway) follow the linear
path; integer tensors are taken from ``w0``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from merge_cli.errors import CheckpointError
from merge_cli.io.checkpoint import TensorInfo
from merge_cli.io.dtypes import is_float
from merge_cli.io.writer import safetensors_header, tensor_bytes

CURVE_KINDS: tuple[str, ...] = ("bezier", "polychain")


def curve_coefficients(kind: str, t: float) -> tuple[float, float, float]:
    """Weights of (start, bend, end) at position ``t`` in [0, 1]."""
    if kind == "bezier":
        return (1.0 - t) ** 2, 2.0 * t * (1.0 - t), t**2
    if kind == "polychain":
        if t <= 0.5:
            return 1.0 - 2.0 * t, 2.0 * t, 0.0
        return 0.0, 2.0 - 2.0 * t, 2.0 * t - 1.0
    raise ValueError(f"unknown curve {kind!r} (have: {', '.join(CURVE_KINDS)})")


def combine(
    tensors: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    coefficients: tuple[float, float, float],
) -> torch.Tensor:
    """``c0 x0 + c1 x1 + c2 x2``; differentiable in every input (used for training)."""
    return sum(c * x for c, x in zip(coefficients, tensors, strict=True))  # type: ignore[return-value]


def curve_point(
    start: dict[str, torch.Tensor],
    bend: dict[str, torch.Tensor],
    end: dict[str, torch.Tensor],
    t: float,
    kind: str,
) -> dict[str, torch.Tensor]:
    """The state dict at ``t`` on the curve through ``bend`` (start's dtypes and names)."""
    coefficients = curve_coefficients(kind, t)
    out = {}
    for name, tensor in start.items():
        if not is_float(tensor.dtype):
            out[name] = tensor
        elif name in bend:
            mixed = combine((tensor.float(), bend[name].float(), end[name].float()), coefficients)
            out[name] = mixed.to(tensor.dtype)
        else:
            out[name] = (
                tensor.float().mul(1.0 - t).add_(end[name].float(), alpha=t).to(tensor.dtype)
            )
    return out


#: Where the ``curve`` method saves the bend, inside its output directory. A sub-directory,
#: so that the output's own top-level ``*.safetensors`` stay the model's weights only.
BEND_FILE = "curve/bend.safetensors"


def bend_bytes(bend: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """A bend as the bytes of a safetensors file (header written in a fixed key order, so
    the same bend always gives the same bytes)."""
    infos = [TensorInfo(name, tuple(tensor.shape), tensor.dtype) for name, tensor in bend.items()]
    return safetensors_header(infos, metadata) + b"".join(
        bytes(tensor_bytes(tensor)) for tensor in bend.values()
    )


def load_bend(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A saved bend and its metadata (``curve``: the kind, ``start`` / ``end``: endpoints).

    ``path`` is the bend file or a ``curve`` method's output directory."""
    if path.is_dir():
        path = path / BEND_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: no saved curve bend (the curve method writes {BEND_FILE})")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{path}: cannot read the curve bend ({error})") from error
    return tensors, metadata
