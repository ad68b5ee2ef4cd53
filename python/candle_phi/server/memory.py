"""Keeping a long-running server's memory flat under glibc's allocator (a no-op elsewhere)."""

from __future__ import annotations

import ctypes
import os
import sys

M_ARENA_MAX = -8  # glibc's mallopt parameter


def _glibc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None  # musl or another libc: its allocator has its own ways
    return libc if hasattr(libc, "malloc_trim") else None


_LIBC = _glibc()


def limit_arenas() -> None:
    """glibc gives threads that allocate at once arenas of their own, up to 8 per core; with
    a worker thread per request beside Rust's pools, the process's memory then creeps up
    under load. Two arenas keep it flat (the MALLOC_ARENA_MAX=2 that servers are advised).
    Call it before the threads start; MALLOC_ARENA_MAX, when set, wins."""
    if _LIBC is not None and "MALLOC_ARENA_MAX" not in os.environ:
        _LIBC.mallopt(M_ARENA_MAX, 2)


def trim() -> None:
    """Give the pages freed after a burst of requests back to the system."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
