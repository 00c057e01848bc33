"""An append-only output file that bypasses the page cache where the system allows it.

A merge writes each output byte once and does not read it back, so copying it into the page
cache first only costs: the copy itself (slow where every newly cached page must first be
backed by the host, as on virtual machines that hand freed pages back), and the pages it
pushes out — the inputs a merge is still reading, when they and the output do not both fit
in memory. With ``O_DIRECT`` the device reads the bytes straight from one reused,
page-aligned buffer. The measurements: docs/performance-notes.md.

``O_DIRECT`` needs block-aligned buffers, offsets and lengths: bytes are gathered in the
buffer and written a whole buffer at a time; the last block is padded with zeros and the
file is then truncated to its true length. Where the filesystem refuses ``O_DIRECT`` (older tmpfs,
some network filesystems, other systems than Linux) the file is written the usual way, and
bytes copied from another file go file to file in the kernel (``copy_file_range``).
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os

#: Offsets and lengths of direct writes are multiples of this (any block size up to it).
ALIGNMENT = 4096
#: Bytes gathered before each write: large enough that the device streams.
BUFFER_BYTES = 16 * 2**20
_DIRECT = getattr(os, "O_DIRECT", 0)
#: What a filesystem answers when it does not take O_DIRECT (or its alignment).
_REFUSED = (errno.EINVAL, errno.EOPNOTSUPP)


class AppendFile:
    """Bytes appended to a new file, through an aligned buffer with ``O_DIRECT`` if possible.

    ``buffer`` is lent by the caller, so one allocation (whose pages stay backed) serves every
    shard of an output: an anonymous ``mmap`` of a multiple of :data:`ALIGNMENT` bytes.
    ``direct=False`` writes the usual way.
    """

    def __init__(self, path: str | os.PathLike[str], buffer: mmap.mmap, direct: bool = True):
        self.name = os.fspath(path)
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
        self.direct = direct and bool(_DIRECT)
        try:
            self.fd = os.open(self.name, flags | (_DIRECT if self.direct else 0), 0o666)
        except OSError as error:
            if error.errno not in _REFUSED or not self.direct:
                raise
            self.direct = False
            self.fd = os.open(self.name, flags, 0o666)
        self._buffer = memoryview(buffer)
        self._filled = 0
        self.size = 0  # bytes appended so far

    def fileno(self) -> int:
        return self.fd

    def write(self, data: bytes | memoryview) -> None:
        data = memoryview(data).cast("B")
        self.size += data.nbytes
        if not self.direct:
            _write_all(self.fd, data)
            return
        while data.nbytes:
            space = self._space(data.nbytes)
            space[:] = data[: space.nbytes]
            data = data[space.nbytes :]
            self._advance(space.nbytes)

    def copy_from(self, source_fd: int, offset: int, count: int) -> None:
        """Append ``count`` bytes read from ``offset`` of ``source_fd``.

        A direct file reads them straight into its buffer (one copy, where a read and a
        :meth:`write` would take two); any other has the kernel copy file to file
        (``copy_file_range``: the bytes never pass through this process), or copies by hand
        where the filesystem cannot.
        """
        self.size += count
        if not self.direct:
            _copy_bytes(source_fd, self.fd, offset, count)
            return
        while count > 0:
            got = os.preadv(source_fd, [self._space(count)], offset)
            if got == 0:
                raise OSError(errno.EIO, f"unexpected end of the input at byte {offset}")
            offset += got
            count -= got
            self._advance(got)

    def close(self) -> None:
        """Write what is left (padded to a whole block, then truncated away) and close."""
        if self.fd < 0:
            return
        try:
            if self._filled:
                padded = -(-self._filled // ALIGNMENT) * ALIGNMENT
                self._buffer[self._filled : padded] = bytes(padded - self._filled)
                self._flush(padded)
                os.ftruncate(self.fd, self.size)
        finally:
            self.abandon()

    def abandon(self) -> None:
        """Close without writing what is left (the file is being thrown away)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def _space(self, count: int) -> memoryview:
        """The free part of the buffer, at most ``count`` bytes of it."""
        return self._buffer[self._filled : min(self._buffer.nbytes, self._filled + count)]

    def _advance(self, count: int) -> None:
        """``count`` more bytes of the buffer are filled: written out once it is full."""
        self._filled += count
        if self._filled == self._buffer.nbytes:
            self._flush(self._filled)

    def _flush(self, count: int) -> None:
        try:
            _write_all(self.fd, self._buffer[:count])
        except OSError as error:
            if error.errno not in _REFUSED or not self.direct:
                raise
            # The filesystem took the flag but not the write (it wants another alignment):
            # the rest of the file is written the usual way.
            fcntl.fcntl(self.fd, fcntl.F_SETFL, fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~_DIRECT)
            self.direct = False
            _write_all(self.fd, self._buffer[:count])
        self._filled = 0


def aligned_buffer(nbytes: int = BUFFER_BYTES) -> mmap.mmap:
    """A page-aligned anonymous buffer for :class:`AppendFile`."""
    return mmap.mmap(-1, -(-nbytes // ALIGNMENT) * ALIGNMENT)


def _write_all(fd: int, data: memoryview) -> None:
    while data.nbytes:
        data = data[os.write(fd, data) :]


def _copy_bytes(source_fd: int, target_fd: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes from ``offset`` of ``source_fd`` to the position of ``target_fd``."""
    copy_file_range = getattr(os, "copy_file_range", None)
    while count > 0 and copy_file_range is not None:
        try:
            copied = copy_file_range(source_fd, target_fd, count, offset)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
                raise
            break  # not supported here (EXDEV, ENOSYS, EINVAL, ...): copy by hand
        if copied == 0:
            raise OSError(errno.EIO, f"unexpected end of the input at byte {offset}")
        offset += copied
        count -= copied
    while count > 0:
        data = memoryview(os.pread(source_fd, min(count, 16 * 2**20), offset))
        if not data:
            raise OSError(errno.EIO, f"unexpected end of the input at byte {offset}")
        offset += len(data)
        count -= len(data)
        _write_all(target_fd, data)
