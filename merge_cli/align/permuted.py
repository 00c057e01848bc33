"""A lazy aligned view of a checkpoint: tensors are permuted (or soft-mapped) when read.

Alignment produces one :class:`UnitMap` per spec group. :class:`PermutedCheckpoint` wraps
the model's checkpoint and applies the maps in :meth:`~PermutedCheckpoint.read`, so the fuse
step streams aligned tensors exactly as it streams plain ones; nothing is materialised.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from merge_cli.align.spec import AxisRef, Group, PermutationSpec, expand
from merge_cli.io.checkpoint import Checkpoint, TensorInfo

#: Below this many contiguous source runs, a permuted row read reads only those runs.
MAX_RUNS = 32


@dataclass(frozen=True)
class UnitMap:
    """How one group's units map into the reference basis.

    Either a hard ``permutation`` (new unit ``i`` is the model's unit ``permutation[i]``),
    or soft matrices (rows: reference units, columns: the model's units): ``out_matrix`` is
    applied on axes that produce the units, ``in_matrix`` on axes that consume them
    (``W @ in_matrix.T`` for the next layer's columns). A permutation ``P`` is the special
    case ``out_matrix = in_matrix = P``.
    """

    permutation: torch.Tensor | None = None
    out_matrix: torch.Tensor | None = None
    in_matrix: torch.Tensor | None = None

    def matrix(self, role: str) -> torch.Tensor:
        chosen = self.out_matrix if role == "out" else self.in_matrix
        assert chosen is not None
        return chosen

    @property
    def is_identity(self) -> bool:
        p = self.permutation
        return p is not None and bool(torch.equal(p, torch.arange(len(p))))


def apply_map(tensor: torch.Tensor, axis: AxisRef, unit_map: UnitMap) -> torch.Tensor:
    """Map ``tensor`` along ``axis`` (a whole axis; no row restriction)."""
    if unit_map.permutation is not None:
        return tensor.index_select(axis.axis, expand(unit_map.permutation, axis.block))
    matrix = unit_map.matrix(axis.role).to(torch.float32)
    if axis.block > 1:
        matrix = torch.kron(matrix, torch.eye(axis.block))
    moved = tensor.to(torch.float32).movedim(axis.axis, 0)
    mapped = torch.tensordot(matrix, moved, dims=([1], [0]))
    return mapped.movedim(0, axis.axis).to(tensor.dtype)


def apply_maps(
    name: str,
    tensor: torch.Tensor,
    axes: list[tuple[AxisRef, Group]],
    maps: dict[str, UnitMap],
    skip_axis: int | None = None,
) -> torch.Tensor:
    """Apply every group's map on ``tensor``'s axes (except ``skip_axis``)."""
    for axis, group in axes:
        if axis.axis != skip_axis and group.name in maps:
            tensor = apply_map(tensor, axis, maps[group.name])
    return tensor


class PermutedCheckpoint:
    """``checkpoint`` seen in the reference basis: a Checkpoint whose reads apply ``maps``.

    Row reads (``rows=(a, b)``) of a tensor permuted along its first axis read only the
    source rows they need (in contiguous runs) when those are few; soft maps along the first
    axis read the whole tensor, since every output row mixes every input row.
    """

    def __init__(self, checkpoint: Checkpoint, spec: PermutationSpec, maps: dict[str, UnitMap]):
        self.checkpoint = checkpoint
        self.spec = spec
        self.maps = {k: v for k, v in maps.items() if not v.is_identity}
        self.source = f"{checkpoint.source} (aligned)"
        self.directory = checkpoint.directory
        self._axes = {
            name: [(a, g) for a, g in entries if g.name in self.maps]
            for name, entries in spec.axes_of().items()
        }

    def tensor_names(self) -> list[str]:
        return self.checkpoint.tensor_names()

    def info(self, name: str) -> TensorInfo:
        return self.checkpoint.info(name)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        axes = self._axes.get(name)
        if not axes:
            return self.checkpoint.read(name, rows)
        first = next(((a, g) for a, g in axes if a.axis == 0), None)
        if rows is None or first is None:
            tensor = apply_maps(name, self.checkpoint.read(name), axes, self.maps)
            return tensor if rows is None else tensor[rows[0] : rows[1]]
        axis, group = first
        unit_map = self.maps[group.name]
        if unit_map.permutation is None:
            return apply_maps(name, self.checkpoint.read(name), axes, self.maps)[rows[0] : rows[1]]
        source_rows = expand(unit_map.permutation, axis.block)[rows[0] : rows[1]]
        tensor = self._read_rows(name, source_rows)
        return apply_maps(name, tensor, axes, self.maps, skip_axis=0)

    def _read_rows(self, name: str, source_rows: torch.Tensor) -> torch.Tensor:
        """Rows ``source_rows`` of ``name`` in that order, reading as little as reasonable."""
        breaks = torch.nonzero(source_rows[1:] != source_rows[:-1] + 1).flatten() + 1
        starts = [0, *breaks.tolist()]
        if len(starts) <= MAX_RUNS:
            stops = [*breaks.tolist(), len(source_rows)]
            parts = [
                self.checkpoint.read(name, (int(source_rows[a]), int(source_rows[b - 1]) + 1))
                for a, b in zip(starts, stops, strict=True)
            ]
            return torch.cat(parts) if len(parts) > 1 else parts[0]
        low, high = int(source_rows.min()), int(source_rows.max()) + 1
        return self.checkpoint.read(name, (low, high))[source_rows - low]
