"""The operator process's malloc: fewer glibc arenas (no kopf here, so tests can import it)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# glibc gives each thread that allocates an arena of its own, up to 8 per core, and keeps what
# they held: the database calls run in threads. Two arenas: 198 instead of 203 MB peak RSS at
# 1,000 tenants, the same speed (bench/README.md, operator_scale). MALLOC_ARENA_MAX wins.
MALLOC_ARENAS = 2
_M_ARENA_MAX = -8  # mallopt's parameter number in glibc's malloc.h


def limit_malloc_arenas(count: int) -> bool:
    """Cap glibc's malloc arenas before any thread starts; False where that is not glibc."""
    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    return bool(mallopt is not None and mallopt(_M_ARENA_MAX, count) == 1)
