"""Lazy checkpoints: names, shapes and dtypes up front, tensor data only on demand.

Every input the pipeline touches is a :class:`Checkpoint`. Implementations here cover
safetensors files (one file or a sharded directory) and in-memory state dicts; ``.bin``/``.pt``
state dicts live in :mod:`merge_cli.io.torch_format`. Later stages wrap checkpoints in views
(e.g. alignment's permuted view) that implement the same protocol.

Safetensors headers are validated and listed with ``safe_open``. Tensor data is then read
with positioned reads (``os.preadv``) of exactly the requested bytes into a fresh tensor,
rather than through ``safe_open``'s memory map: pages of a mapped file count in the process's
resident set and are read lazily by page faults wherever the data is first touched, whereas
explicit reads keep peak RSS bounded by the tensors in flight and let the executor's
read-ahead thread do the I/O while the main thread computes. Each file stays open from its
first read on, marked for sequential access, so that the kernel's read-ahead follows the
chunks as they are read (a file opened per read starts its read-ahead afresh every time).
"""

from __future__ import annotations

import json
import os
import stat
import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from math import prod
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
from safetensors import SafetensorError, safe_open

from merge_cli.errors import CheckpointError
from merge_cli.io.dtypes import SAFETENSORS_TO_TORCH


@dataclass(frozen=True)
class TensorInfo:
    """What is known about a tensor before reading it."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@runtime_checkable
class Checkpoint(Protocol):
    """A lazily read set of named tensors."""

    #: Human-readable origin (a path or URL), used in error messages.
    source: str
    #: Directory that holds config/tokenizer files, if any.
    directory: Path | None

    def tensor_names(self) -> list[str]:
        """Tensor names in storage order."""
        ...

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype of ``name``; raises :class:`CheckpointError` if absent."""
        ...

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Read ``name`` (or only rows ``[start, stop)`` of its first axis) as a CPU tensor."""
        ...


@dataclass(frozen=True)
class FileRange:
    """Tensor bytes stored in a file: ``shape`` and ``dtype`` from byte ``offset`` on."""

    path: Path
    offset: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * self.dtype.itemsize


def require_regular_file(path: Path) -> None:
    """Refuse anything but a regular file (after symlinks): a FIFO or a device named
    ``model.safetensors`` would block a read forever or never end."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        raise CheckpointError(f"{path}: cannot open ({error.strerror or error})") from error
    if not stat.S_ISREG(mode):
        raise CheckpointError(f"{path}: not a regular file (a FIFO, device or directory)")


def index_shard_files(index_path: Path) -> list[Path]:
    """The shard files a ``*.index.json`` names, each confined to the index's directory.

    A shard name must be a plain relative path inside that directory: an index naming
    ``../other/secret.safetensors`` or an absolute path would otherwise pull another file's
    tensors into the merge (a hostile Hub repository could name any guessable local file).
    Symlinks inside the directory are followed as usual (the Hub cache is made of them).
    """
    require_regular_file(index_path)
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{index_path}: not a valid shard index ({error})") from error
    if not isinstance(weight_map, dict) or not all(
        isinstance(name, str) for name in weight_map.values()
    ):
        raise CheckpointError(
            f"{index_path}: not a valid shard index (weight_map must map tensor names to "
            "shard file names)"
        )
    files = []
    for name in dict.fromkeys(weight_map.values()):
        relative = Path(name)
        if not name or relative.is_absolute() or ".." in relative.parts or "\0" in name:
            raise CheckpointError(
                f"{index_path}: names shard {name[:80]!r}, outside the model's directory; "
                "refusing to read it"
            )
        file = index_path.parent / relative
        if not file.exists():
            raise CheckpointError(f"{index_path}: names shard {name[:80]}, which does not exist")
        require_regular_file(file)
        files.append(file)
    return files


def missing_tensor(source: str, name: str) -> CheckpointError:
    return CheckpointError(f"{source}: has no tensor named {name!r}")


def info_of(infos: Mapping[str, TensorInfo], source: str, name: str) -> TensorInfo:
    """``infos[name]``, or the :class:`CheckpointError` saying ``source`` lacks it."""
    try:
        return infos[name]
    except KeyError:
        raise missing_tensor(source, name) from None


class SafetensorsCheckpoint:
    """One or more safetensors files viewed as one checkpoint."""

    def __init__(self, files: list[Path], source: str, directory: Path | None):
        self.source = source
        self.directory = directory
        self._infos: dict[str, TensorInfo] = {}
        self._file_of: dict[str, Path] = {}
        self._offset: dict[str, int] = {}  # absolute byte offset of each tensor's data
        for file in files:
            for info, offset in _read_safetensors_header(file):
                if info.name in self._infos:
                    raise CheckpointError(
                        f"{source}: tensor {info.name!r} appears in both "
                        f"{self._file_of[info.name].name} and {file.name}"
                    )
                self._infos[info.name] = info
                self._file_of[info.name] = file
                self._offset[info.name] = offset
        self._descriptors: dict[Path, int] = {}  # files opened for reading, closed with self
        weakref.finalize(self, _close_all, self._descriptors)

    def tensor_names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return info_of(self._infos, self.source, name)

    def file_of(self, name: str) -> Path:
        self.info(name)
        return self._file_of[name]

    def byte_range(self, name: str, rows: tuple[int, int] | None = None) -> FileRange:
        """Where the bytes of ``name`` (or of its rows ``[start, stop)``) lie on disk."""
        info = self.info(name)
        shape = list(info.shape)
        offset = self._offset[name]
        if rows is not None and shape:
            start, stop = max(0, rows[0]), min(shape[0], rows[1])
            row_bytes = info.nbytes // shape[0] if shape[0] else 0
            offset += start * row_bytes
            shape[0] = max(0, stop - start)
        return FileRange(self._file_of[name], offset, tuple(shape), info.dtype)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        located = self.byte_range(name, rows)
        path, offset, shape = located.path, located.offset, located.shape
        tensor = torch.empty(shape, dtype=located.dtype)
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        try:
            descriptor = self._descriptor(path)
            done = 0
            while done < buffer.nbytes:
                count = os.preadv(descriptor, [buffer[done:]], offset + done)
                if count == 0:
                    raise OSError(f"unexpected end of file at byte {offset + done}")
                done += count
        except OSError as error:
            raise CheckpointError(f"{path}: cannot read tensor {name!r}: {error}") from error
        return tensor

    def _descriptor(self, path: Path) -> int:
        """``path`` opened for reading (once; positioned reads from any thread share it)."""
        descriptor = self._descriptors.get(path)
        if descriptor is None:
            descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            if self._descriptors.setdefault(path, descriptor) != descriptor:
                os.close(descriptor)  # another thread opened it first
                descriptor = self._descriptors[path]
        return descriptor


def _close_all(descriptors: dict[Path, int]) -> None:
    for descriptor in descriptors.values():
        os.close(descriptor)
    descriptors.clear()


def _read_safetensors_header(path: Path) -> list[tuple[TensorInfo, int]]:
    """Validate a safetensors file (header and length); list its tensors and data offsets."""
    require_regular_file(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            infos = []
            for name in handle.keys():  # noqa: SIM118 - safe_open is not a dict
                tensor_slice = handle.get_slice(name)
                code = tensor_slice.get_dtype()
                if code not in SAFETENSORS_TO_TORCH:
                    raise CheckpointError(f"{path}: tensor {name!r} has unsupported dtype {code}")
                infos.append(
                    TensorInfo(name, tuple(tensor_slice.get_shape()), SAFETENSORS_TO_TORCH[code])
                )
    except SafetensorError as error:
        raise CheckpointError(
            f"{path}: not a valid safetensors file ({error}); the file may be truncated or "
            "corrupt — download or copy it again"
        ) from error
    except OSError as error:
        raise CheckpointError(f"{path}: cannot open ({error.strerror or error})") from error
    return _with_offsets(path, infos)


def _with_offsets(path: Path, infos: list[TensorInfo]) -> list[tuple[TensorInfo, int]]:
    """Each tensor with the absolute offset of its data, in file order (reads walk forwards).

    The header was validated by ``safe_open`` above; this reads the same JSON for offsets.
    """
    with open(path, "rb") as handle:
        header_len = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(header_len))
    data_start = 8 + header_len
    located = [(info, data_start + header[info.name]["data_offsets"][0]) for info in infos]
    return sorted(located, key=lambda item: item[1])


class InMemoryCheckpoint:
    """A state dict held in memory, seen through the Checkpoint protocol.

    Whole-model methods (Fisher, RegMean, curve training, ...) return one of these so the
    streaming writer saves their result like any other merge.
    """

    def __init__(
        self,
        tensors: Mapping[str, torch.Tensor],
        source: str = "<memory>",
        directory: Path | None = None,
    ):
        self._tensors = dict(tensors)
        self.source = source
        self.directory = directory

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            tensor = self._tensors[name]
        except KeyError:
            raise missing_tensor(self.source, name) from None
        return TensorInfo(name, tuple(tensor.shape), tensor.dtype)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        self.info(name)
        tensor = self._tensors[name]
        return tensor if rows is None else tensor[rows[0] : rows[1]]


class ComputedCheckpoint:
    """Tensors cut from one value that is computed on the first read: a statistic a method
    derives from all its inputs (MoE routers, global thresholds), offered as a lazy input
    (``TensorMethod.derived_inputs``) so the plan is still made from headers alone.

    The value is computed once, under a lock (the executor's reader and statistics threads
    may ask at the same time). ``select(value, name, start, stop)`` gives rows
    ``[start, stop)`` of tensor ``name``.
    """

    def __init__(
        self,
        source: str,
        infos: list[TensorInfo],
        compute: Callable[[], torch.Tensor],
        select: Callable[[torch.Tensor, str, int, int], torch.Tensor],
    ):
        self.source = source
        self.directory: Path | None = None
        self._infos = {info.name: info for info in infos}
        self._compute = compute
        self._select = select
        self._value: torch.Tensor | None = None
        self._lock = threading.Lock()

    def tensor_names(self) -> list[str]:
        return list(self._infos)

    def info(self, name: str) -> TensorInfo:
        return info_of(self._infos, self.source, name)

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        shape = self.info(name).shape
        start, stop = rows if rows is not None else (0, shape[0])
        with self._lock:
            if self._value is None:
                self._value = self._compute()
        return self._select(self._value, name, start, stop)


def read_state_dict(checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """Read a whole checkpoint into memory (for small models and data-aware methods)."""
    return {name: checkpoint.read(name) for name in checkpoint.tensor_names()}
