"""Putting a finished output directory in place without ever losing one.

An output is written into a hidden sibling of its target (``.NAME.partial-PID``) and moved
into place when complete. This module owns the names of those siblings and the three
things that make the move safe whatever happens to the process:

- a lock (``.NAME.lock``, ``flock``) held from the first byte to the move, so two runs
  never write one target: the second is refused at once;
- the move itself: ``renameat2`` with ``RENAME_EXCHANGE`` swaps a new output with the old
  one in one step (the old one is then deleted from the staging name), and
  ``RENAME_NOREPLACE`` refuses a target that appeared while the run was writing. Where the
  kernel or filesystem lacks ``renameat2``, two plain renames under the lock do it, the old
  output parked as ``.NAME.old-PID`` in between;
- recovery: a run that takes the lock first removes the staging siblings of runs that died
  (kill -9, power loss) and, if one died between the two fallback renames, puts the old
  output back at the target.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import shutil
import sys
from pathlib import Path

from merge_cli.errors import OutputError

try:
    import fcntl
except ImportError:  # not POSIX: runs are not locked against each other
    fcntl = None  # type: ignore[assignment]

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
_AT_FDCWD = -100
#: The longest file name most filesystems take (NAME_MAX).
NAME_MAX = 255
#: Room a staging name needs after its stem: ".partial-" and a PID.
_SUFFIX_ROOM = len(".partial-") + 10
#: Errors saying that renameat2 (or one of its flags) is not available here.
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def staging_stem(target: Path) -> str:
    """The hidden prefix of every sibling a run writes for ``target``: ``.NAME``, or, for a
    name too long to take a suffix within NAME_MAX, ``.merge-cli-`` and a hash of it."""
    encoded = os.fsencode(target.name)
    if 1 + len(encoded) + _SUFFIX_ROOM <= NAME_MAX:
        return f".{target.name}"
    return ".merge-cli-" + hashlib.sha256(encoded).hexdigest()[:32]


def staging_path(target: Path) -> Path:
    """The hidden sibling this process writes ``target``'s new contents into."""
    return target.parent / f"{staging_stem(target)}.partial-{os.getpid()}"


def parked_path(target: Path) -> Path:
    """Where the fallback move parks the old ``target`` between its two renames."""
    return target.parent / f"{staging_stem(target)}.old-{os.getpid()}"


def pid_alive(pid: int) -> bool:
    """Whether a process with id ``pid`` exists (on this machine)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


class TargetLock:
    """An exclusive ``flock`` on ``.NAME.lock`` beside ``target``, held while a run writes it.

    Refused at once (not waited for) when another process holds it. The lock file is
    removed on release; a process that locked a file just removed sees its inode gone and
    locks the new one instead.
    """

    def __init__(self, target: Path):
        self.target = target
        self.path = target.parent / f"{staging_stem(target)}.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        if fcntl is None:
            return
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0))
            except OSError as error:
                raise OutputError(
                    f"{self.path}: cannot create the output lock ({error.strerror or error})"
                ) from error
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                holder = _read_pid(fd)
                os.close(fd)
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    who = f" (pid {holder})" if holder else ""
                    raise OutputError(
                        f"{self.target}: another merge-cli run{who} is writing this output; "
                        "wait for it to finish or choose another --out"
                    ) from None
                raise OutputError(
                    f"{self.path}: cannot lock the output ({error.strerror or error})"
                ) from error
            if _same_file(fd, self.path):
                break
            os.close(fd)  # removed by its last holder after we opened it: lock the new one
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self._fd)
        self._fd = None


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 20, 0).decode("ascii", "replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except OSError:
        return False
    opened = os.fstat(fd)
    return (opened.st_dev, opened.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def recover_stale(target: Path) -> list[str]:
    """Clean up after runs on ``target`` that died; call with the target's lock held.

    A dead run's ``.partial-PID`` directory is removed. Its ``.old-PID`` directory (the
    previous output, parked by the fallback move) goes back to ``target`` when nothing is
    there, and is removed otherwise. Returns what was done, one line per sibling.
    """
    stem = staging_stem(target)
    pattern = re.compile(re.escape(stem) + r"\.(partial|old)-(\d+)")
    try:
        siblings = sorted(target.parent.iterdir())
    except OSError:
        return []
    done = []
    # parked old outputs first: one may have to go back in place before anything else
    for sibling in sorted(siblings, key=lambda path: not path.name.startswith(f"{stem}.old-")):
        match = pattern.fullmatch(sibling.name)
        if match is None or int(match[2]) == os.getpid() or pid_alive(int(match[2])):
            continue
        if match[1] == "old" and not os.path.lexists(target):
            os.rename(sibling, target)
            done.append(f"restored {target} from {sibling.name} (a run died while replacing it)")
        else:
            remove(sibling)
            done.append(f"removed {sibling.name} (left by a run that died)")
    return done


def remove(path: Path) -> None:
    """Delete a directory tree, or a symlink (an old output may have been one) or file."""
    if path.is_symlink() or not path.is_dir():
        with contextlib.suppress(OSError):
            path.unlink()
    else:
        shutil.rmtree(path, ignore_errors=True)


def _renameat2(source: Path, destination: Path, flags: int) -> bool:
    """``renameat2(source, destination, flags)``; False where it is not available."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        function = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    function.argtypes += [ctypes.c_uint]
    if function(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(destination), flags):
        code = ctypes.get_errno()
        if code in _UNSUPPORTED:
            return False
        raise OSError(code, os.strerror(code), str(destination))
    return True


def exchange(source: Path, destination: Path) -> bool:
    """Swap two directories in one step; False where the system cannot."""
    return _renameat2(source, destination, RENAME_EXCHANGE)


def rename_no_replace(source: Path, destination: Path) -> bool:
    """Rename, failing with EEXIST if ``destination`` exists; False where unavailable."""
    return _renameat2(source, destination, RENAME_NOREPLACE)


def move_into_place(temp: Path, target: Path, overwrite: bool) -> None:
    """Move the finished ``temp`` directory to ``target``; call with the target's lock held.

    With ``overwrite`` an existing target is swapped out in one step, then deleted; at no
    moment is there nothing complete at ``target`` (with the fallback, a rerun restores the
    old output if this process dies between its two renames). Without ``overwrite`` a
    target that appeared in the meantime is refused, never replaced.
    """
    exists = os.path.lexists(target)
    if exists and not overwrite:
        raise _appeared(target)
    if exists:
        if exchange(temp, target):
            remove(temp)  # now holds the old output
            return
        parked = parked_path(target)
        os.rename(target, parked)
        try:
            os.rename(temp, target)
        except BaseException:  # an error or a signal between the renames: put the old back
            os.rename(parked, target)
            raise
        remove(parked)
        return
    try:
        if rename_no_replace(temp, target):
            return
    except FileExistsError:
        raise _appeared(target) from None
    if os.path.lexists(target):
        raise _appeared(target)
    os.rename(temp, target)


def _appeared(target: Path) -> OutputError:
    return OutputError(
        f"{target}: output already exists (it appeared while this run was writing); "
        "nothing was replaced; pass --overwrite to replace it, or choose another --out"
    )
