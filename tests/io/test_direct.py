"""The direct-I/O append file: the same bytes as a plain write, whatever the sizes."""

from __future__ import annotations

import errno
import os

import pytest

from merge_cli.io import direct
from merge_cli.io.direct import ALIGNMENT, AppendFile, aligned_buffer

BUFFER = 4 * ALIGNMENT
# Pieces that end inside a block, on a block, on the buffer's end and past it.
PIECES = [0, 1, 7, ALIGNMENT - 8, ALIGNMENT, BUFFER - 1, BUFFER + 3, 3 * BUFFER, 5]


def payload(size: int, seed: int) -> bytes:
    return bytes((seed * 31 + i * 7) % 251 for i in range(size))


@pytest.fixture(params=["direct", "buffered"])
def mode(request, monkeypatch):
    if request.param == "buffered":  # a filesystem or system without O_DIRECT
        monkeypatch.setattr(direct, "_DIRECT", 0)
    return request.param


def test_appended_bytes_are_the_file(tmp_path, mode):
    path = tmp_path / "out.bin"
    expected = b""
    target = AppendFile(path, aligned_buffer(BUFFER))
    if mode == "buffered":
        assert not target.direct
    for seed, size in enumerate(PIECES):
        piece = payload(size, seed)
        target.write(memoryview(piece))
        expected += piece
        assert target.size == len(expected)
    target.close()
    assert path.read_bytes() == expected  # the last block's padding is truncated away
    target.close()  # closing twice is harmless


def test_copy_from_reads_into_the_buffer(tmp_path):
    source = tmp_path / "source.bin"
    data = payload(3 * BUFFER + 100, 1)
    source.write_bytes(data)
    target = AppendFile(tmp_path / "out.bin", aligned_buffer(BUFFER))
    if not target.direct:
        pytest.skip("this filesystem refuses O_DIRECT")
    target.write(b"head")
    with open(source, "rb") as handle:
        target.copy_from(handle.fileno(), 50, 2 * BUFFER + 7)
        target.copy_from(handle.fileno(), 0, 3)
    target.close()
    expected = b"head" + data[50 : 50 + 2 * BUFFER + 7] + data[:3]
    assert (tmp_path / "out.bin").read_bytes() == expected


def test_copy_from_past_the_end_of_the_source_fails(tmp_path):
    source = tmp_path / "source.bin"
    source.write_bytes(b"short")
    target = AppendFile(tmp_path / "out.bin", aligned_buffer(BUFFER))
    if not target.direct:
        pytest.skip("this filesystem refuses O_DIRECT")
    with open(source, "rb") as handle, pytest.raises(OSError, match="unexpected end"):
        target.copy_from(handle.fileno(), 0, 100)
    target.abandon()


def test_a_filesystem_refusing_the_flag_at_open_gets_a_plain_file(tmp_path, monkeypatch):
    monkeypatch.setattr(direct, "_DIRECT", 0x4000)  # pretend there is a flag, refused
    real_open = os.open

    def refusing(path, flags, mode=0o777):
        if flags & 0x4000:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, mode)

    monkeypatch.setattr(os, "open", refusing)
    target = AppendFile(tmp_path / "out.bin", aligned_buffer(BUFFER))
    assert not target.direct
    target.write(b"abc")
    target.close()
    assert (tmp_path / "out.bin").read_bytes() == b"abc"


@pytest.mark.parametrize("code", [errno.EINVAL, errno.EOPNOTSUPP])
def test_a_refused_direct_write_is_written_the_usual_way(tmp_path, monkeypatch, code):
    target = AppendFile(tmp_path / "out.bin", aligned_buffer(BUFFER))
    if not target.direct:
        pytest.skip("this filesystem refuses O_DIRECT")
    real_write = direct._write_all
    calls = []

    def refuse_first(fd, data):
        calls.append(data.nbytes)
        if len(calls) == 1:
            raise OSError(code, os.strerror(code))
        real_write(fd, data)

    monkeypatch.setattr(direct, "_write_all", refuse_first)
    data = payload(BUFFER + 10, 3)
    target.write(data)
    assert not target.direct and calls == [BUFFER, BUFFER]
    target.close()
    assert (tmp_path / "out.bin").read_bytes() == data


def test_a_full_disk_is_an_error_not_a_fallback(tmp_path, monkeypatch, mode):
    target = AppendFile(tmp_path / "out.bin", aligned_buffer(BUFFER))
    direct_at_first = target.direct

    def full(_fd, _data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(direct, "_write_all", full)
    with pytest.raises(OSError, match="No space"):
        target.write(payload(BUFFER, 0))  # a whole buffer: written at once in both modes
    assert target.direct == direct_at_first
    if target.direct:
        with pytest.raises(OSError, match="No space"):
            target.close()  # the buffer is still due: tried again, and the file closed
    else:
        target.close()  # nothing was kept back
    assert target.fd == -1
