"""Streaming writer for Hugging Face–style sharded safetensors checkpoints.

Because the merge plan fixes every output tensor's name, shape and dtype before any data is
read, each shard's safetensors header is written first and tensor bytes are then appended
as they are computed — chunk by chunk for large tensors. Memory never holds more than the
chunk being written, whatever ``shard_size`` is.

Everything is written into a temporary sibling directory that is renamed into place only
when complete, so an interrupted or failed run never leaves a half-written checkpoint at the
target path; the target is locked while it is written, and what dead runs left behind is
cleaned up first (:mod:`merge_cli.io.staging`).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

import torch

from merge_cli.errors import OutputError
from merge_cli.io.checkpoint import FileRange, TensorInfo
from merge_cli.io.direct import BUFFER_BYTES, AppendFile, aligned_buffer
from merge_cli.io.dtypes import TORCH_TO_SAFETENSORS
from merge_cli.io.staging import TargetLock, move_into_place, recover_stale, staging_path

SAFETENSORS_INDEX = "model.safetensors.index.json"


def safetensors_header(tensors: list[TensorInfo], metadata: dict[str, str] | None = None) -> bytes:
    """The 8-byte length + JSON header of a safetensors file holding ``tensors`` in order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    for info in tensors:
        header[info.name] = {
            "dtype": TORCH_TO_SAFETENSORS[info.dtype],
            "shape": list(info.shape),
            "data_offsets": [offset, offset + info.nbytes],
        }
        offset += info.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # align the data section to 8 bytes, as safetensors does
    return len(text).to_bytes(8, "little") + text


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a CPU tensor, without a copy when it is contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def preallocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes of disk for the file open at ``fd`` (Linux ``fallocate``).

    Two reasons: a disk without room fails here, before a shard's first byte, and on ext4
    writes into reserved blocks skip delayed allocation (docs/performance-notes.md).
    Filesystems that cannot reserve space are left as they are; glibc's ``posix_fallocate``
    would instead emulate it by writing every block.
    """
    if size <= 0 or not sys.platform.startswith("linux"):
        return
    try:
        fallocate = ctypes.CDLL(None, use_errno=True).fallocate64
    except (OSError, AttributeError):
        return
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if fallocate(fd, 0, 0, size) != 0:
        code = ctypes.get_errno()
        if code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise OSError(code, os.strerror(code))


def check_target(target: Path, overwrite: bool) -> None:
    """Refuse a ``target`` that exists (unless ``overwrite``) or is not a directory."""
    if os.path.lexists(target) and not overwrite:
        raise OutputError(
            f"{target}: output already exists; pass --overwrite to replace it, "
            "or choose another --out"
        )
    if os.path.lexists(target) and not target.is_dir():
        raise OutputError(f"{target}: exists and is not a directory")


def begin_staging(target: Path, overwrite: bool) -> tuple[TargetLock, Path]:
    """Lock ``target``, clean up after dead runs on it, and create this run's staging
    directory; the lock is released again if any of it fails."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(f"{target.parent}: cannot create ({error.strerror or error})") from error
    lock = TargetLock(target)
    lock.acquire()
    temp = staging_path(target)
    try:
        recover_stale(target)
        check_target(target, overwrite)
        if temp.exists():
            shutil.rmtree(temp)
        temp.mkdir()
    except OSError as error:
        lock.release()
        raise OutputError(f"{temp}: cannot write ({error.strerror or error})") from error
    except BaseException:
        lock.release()
        raise
    return lock, temp


class ShardedWriter:
    """Writes shards tensor by tensor into a temporary directory, then renames it into place.

    Use as a context manager: leaving the block with an exception removes the temporary
    directory, leaving the target untouched. With ``direct``, shards are written through one
    reused buffer of ``buffer_bytes`` with ``O_DIRECT`` where the filesystem allows
    (:mod:`merge_cli.io.direct`); an output made only of copied bytes is better left to the
    kernel (``copy_file_range``), which the buffered writes of ``direct=False`` allow.
    """

    def __init__(
        self,
        target: Path,
        shards: list[list[TensorInfo]],
        file_names: list[str],
        overwrite: bool = False,
        buffer_bytes: int = BUFFER_BYTES,
        direct: bool = True,
    ):
        self.target = target
        self.shards = shards
        self.file_names = file_names
        self.overwrite = overwrite
        check_target(target, overwrite)
        self.temp = staging_path(target)
        self._lock: TargetLock | None = None
        self._shard = -1
        self._handle: AppendFile | None = None
        self._buffer = aligned_buffer(buffer_bytes)
        self._direct = direct
        self._expected: list[tuple[TensorInfo, int]] = []  # (tensor, bytes still to write)

    # -- context manager -------------------------------------------------------------
    def __enter__(self) -> ShardedWriter:
        self._lock, self.temp = begin_staging(self.target, self.overwrite)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.abandon()
            self._handle = None
        shutil.rmtree(self.temp, ignore_errors=True)
        self._release()

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    # -- writing ---------------------------------------------------------------------
    def write(self, name: str, data: torch.Tensor) -> None:
        """Append ``data`` (all of tensor ``name``, or its next row chunk) to the output."""
        if not data.numel():
            return  # a 0-sized tensor: its header entry is all there is
        while not self._expected:
            self._open_next_shard()
        info, remaining = self._expected[0]
        if name != info.name or data.dtype != info.dtype:
            raise AssertionError(
                f"writer expected {info.name} ({info.dtype}), got {name} ({data.dtype})"
            )
        payload = tensor_bytes(data.cpu())
        if payload.nbytes > remaining:
            raise AssertionError(f"writer: too many bytes for {name}")
        self._write_bytes(payload)
        self._advance(info, remaining - payload.nbytes)

    def copy_range(self, name: str, source: FileRange) -> None:
        """Append tensor ``name``'s bytes (or its next row chunk's) straight from ``source``.

        Without reading them here (:meth:`~merge_cli.io.direct.AppendFile.copy_from`): the
        kernel copies file to file, or, into a direct shard, straight into its buffer.
        """
        if not source.nbytes:
            return  # a 0-sized tensor: its header entry is all there is
        while not self._expected:
            self._open_next_shard()
        info, remaining = self._expected[0]
        if name != info.name or source.dtype != info.dtype or source.nbytes > remaining:
            raise AssertionError(f"writer expected {info.name} ({info.dtype}), got {name}")
        assert self._handle is not None
        try:
            with open(source.path, "rb", buffering=0) as handle:
                self._handle.copy_from(handle.fileno(), source.offset, source.nbytes)
        except OSError as error:
            raise self._os_error(error, Path(self._handle.name)) from error
        self._advance(info, remaining - source.nbytes)

    def _advance(self, info: TensorInfo, remaining: int) -> None:
        if remaining:
            self._expected[0] = (info, remaining)
        else:
            self._expected.pop(0)
            self._skip_empty()
            if not self._expected:
                self._close_shard()

    def _skip_empty(self) -> None:
        """Drop the expected tensors of 0 bytes ahead: they need no data, and no write."""
        while self._expected and self._expected[0][1] == 0:
            self._expected.pop(0)

    def _open_next_shard(self) -> None:
        self._shard += 1
        if self._shard >= len(self.shards):
            raise AssertionError("writer: more tensors than planned")
        tensors = self.shards[self._shard]
        path = self.temp / self.file_names[self._shard]
        try:
            self._handle = AppendFile(path, self._buffer, self._direct)
        except OSError as error:
            raise self._os_error(error, path) from error
        self._expected = [(info, info.nbytes) for info in tensors]
        header = safetensors_header(tensors)
        try:
            preallocate(self._handle.fileno(), len(header) + sum(info.nbytes for info in tensors))
        except OSError as error:
            raise self._os_error(error, path) from error
        self._write_bytes(header)
        self._skip_empty()
        if not self._expected:  # a shard of 0-sized tensors only: its header is all of it
            self._close_shard()

    def _write_bytes(self, payload: bytes | memoryview) -> None:
        assert self._handle is not None
        try:
            self._handle.write(payload)
        except OSError as error:
            raise self._os_error(error, Path(self._handle.name)) from error

    def _close_shard(self) -> None:
        assert self._handle is not None
        try:
            self._handle.close()
        except OSError as error:
            raise self._os_error(error, Path(self._handle.name)) from error
        self._handle = None

    # -- finishing -------------------------------------------------------------------
    def write_text(self, relative: str, text: str) -> None:
        path = self.temp / relative
        try:
            # a name from the command line may hold lone surrogates (undecodable bytes)
            path.write_text(text, encoding="utf-8", errors="backslashreplace")
        except OSError as error:
            raise self._os_error(error, path) from error

    def write_bytes(self, relative: str, data: bytes) -> None:
        path = self.temp / relative
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        except OSError as error:
            raise self._os_error(error, path) from error

    def copy_file(self, source: Path, relative: str) -> None:
        try:
            shutil.copyfile(source, self.temp / relative)
        except OSError as error:
            raise self._os_error(error, self.temp / relative) from error

    def finish(self) -> Path:
        """Check that every planned byte was written, write the index, move into place."""
        while not self._expected and self._shard < len(self.shards) - 1:
            self._open_next_shard()  # trailing shards of 0-sized tensors only
        if self._shard != len(self.shards) - 1 or self._expected:
            raise AssertionError("writer: finished before every planned tensor was written")
        if len(self.shards) > 1:
            weight_map = {
                info.name: file_name
                for tensors, file_name in zip(self.shards, self.file_names, strict=True)
                for info in tensors
            }
            total = sum(info.nbytes for tensors in self.shards for info in tensors)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            self.write_text(SAFETENSORS_INDEX, json.dumps(index, indent=2) + "\n")
        try:
            move_into_place(self.temp, self.target, self.overwrite)
        except OSError as error:
            raise self._os_error(error, self.target) from error
        except OutputError:
            self.abort()
            raise
        self._release()
        return self.target

    def _os_error(self, error: OSError, path: Path) -> OutputError:
        self.abort()
        if error.errno == errno.ENOSPC:
            reason = "the disk is full"
        elif error.errno in (errno.EACCES, errno.EPERM):
            reason = "permission denied"
        else:
            reason = error.strerror or str(error)
        return OutputError(f"{path}: cannot write ({reason}); nothing was written at {self.target}")


@contextmanager
def staged_directory(target: Path, overwrite: bool = False) -> Iterator[Path]:
    """A temporary sibling of ``target`` to fill; renamed to ``target`` when the block succeeds.

    For outputs made of several checkpoints (an ensemble's members, each written by a
    :class:`ShardedWriter` inside the staged directory): like a single checkpoint, the
    target is never left half-written, and an existing target is replaced only with
    ``overwrite``.
    """
    check_target(target, overwrite)
    lock, temp = begin_staging(target, overwrite)
    try:
        yield temp
        move_into_place(temp, target, overwrite)
    except OSError as error:
        shutil.rmtree(temp, ignore_errors=True)
        raise OutputError(
            f"{target}: cannot write ({error.strerror or error}); nothing was written there"
        ) from error
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    finally:
        lock.release()
