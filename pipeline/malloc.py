"""At most a few glibc malloc arenas per serving process (``mallopt(M_ARENA_MAX)``).

glibc gives each new thread an arena of its own, up to eight per CPU, and an
arena keeps the memory freed into it. A worker process has many threads
(each shard's loop and compute thread, TensorFlow's pools, ZeroMQ's I/O
thread, gRPC's pollers), and tensors of hundreds of kilobytes are allocated
on one thread and freed on another, so every arena ends up holding its own
high-water mark. Two arenas hold less. Measured on MobileNetV3Large with the
shards co-located, two pipelines side by side in interleaved rounds (each
round: 40 requests one at a time, 160 at concurrency 16), the resident memory
of the whole pipeline after each round was 815-888 MB against 886-929 MB with
glibc's default (2 shards, lower in all 8 rounds) and 808-856 MB against
833-945 MB (4 shards, 6 rounds). Speed did not move beyond the noise: p50
0.98x and 0.87x, rate at concurrency 16 0.97x and 1.02x (another run: 1.07x).

It must run before the process starts threads: glibc fixes the limit when
its ninth arena would be made. ``pipeline worker`` and ``pipeline ingress``
call :func:`limit_arenas` first thing. ``MALLOC_ARENA_MAX`` in the
environment (read by glibc itself) wins; ``PIPELINE_MALLOC_ARENAS=0`` leaves
glibc's default.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

#: glibc's ``M_ARENA_MAX`` parameter of ``mallopt`` (malloc.h).
M_ARENA_MAX = -8
#: arenas per serving process unless ``PIPELINE_MALLOC_ARENAS`` says otherwise.
DEFAULT_ARENAS = 2
ENV = "PIPELINE_MALLOC_ARENAS"


def arenas_wanted(environ: Mapping[str, str]) -> int:
    """The limit to set: 0 when glibc's own setting applies (``MALLOC_ARENA_MAX`` set, or ``PIPELINE_MALLOC_ARENAS=0``)."""
    if environ.get("MALLOC_ARENA_MAX"):
        return 0
    raw = environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_ARENAS
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{ENV}={raw!r}: expected a whole number of malloc arenas (0: glibc's default)") from None
    if value < 0:
        raise ValueError(f"{ENV}={raw!r}: expected 0 or more malloc arenas")
    return value


def limit_arenas(environ: Mapping[str, str] | None = None) -> int:
    """Set this process's malloc arena limit; return the limit set (0: none, or not glibc)."""
    n = arenas_wanted(os.environ if environ is None else environ)
    if n == 0:
        return 0
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return 0  # not glibc: its allocator has no arenas to limit
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return n if mallopt(M_ARENA_MAX, n) == 1 else 0
