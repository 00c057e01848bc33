"""Memory allocator settings for the merge process (glibc only)."""

from __future__ import annotations

import ctypes
import platform


def tune_allocator() -> None:
    """Keep freed tensor memory in the process for reuse (glibc only).

    The executor allocates and frees same-sized chunk buffers for every tensor. By default
    glibc returns allocations above 32 MB to the OS and maps them afresh each time, so every
    chunk pays for page faults on new memory. Raising the
    mmap and trim thresholds lets freed chunks be reused; the peak resident set stays bounded
    by the chunks in flight. One arena for every thread: the reader allocates the chunks and
    the main thread frees them, and a thread's own arena (a few 64 MB heaps) gave its memory
    back and faulted it in again. The measurements: docs/performance-notes.md.
    """
    if platform.system() != "Linux":
        return
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc; absent from musl
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8
    mallopt(m_mmap_threshold, 1 << 30)
    mallopt(m_trim_threshold, 1 << 31)
    mallopt(m_arena_max, 1)
