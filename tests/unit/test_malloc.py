"""The serving processes' malloc arena limit: the setting, and its effect on a real glibc process."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

from pipeline import malloc

# A child that sets the limit as `pipeline worker` does, starts 8 threads that allocate at once,
# then prints how many arenas (heaps) glibc's malloc_info reports.
CHILD = r"""
import ctypes, os, sys, threading
from pipeline.malloc import limit_arenas
print("limit", limit_arenas(), flush=True)
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
gate = threading.Barrier(8)
def work():
    gate.wait()
    for _ in range(2000):
        libc.free(libc.malloc(200_000))
threads = [threading.Thread(target=work) for _ in range(8)]
[t.start() for t in threads]
[t.join() for t in threads]
libc.open_memstream.restype = ctypes.c_void_p
buf, size = ctypes.c_char_p(), ctypes.c_size_t()
f = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
libc.malloc_info(0, ctypes.c_void_p(f))
libc.fclose(ctypes.c_void_p(f))
print("heaps", buf.value.decode().count("<heap nr="), flush=True)
"""


def _child(env: dict[str, str]) -> dict[str, int]:
    clean = {k: v for k, v in os.environ.items() if k not in ("MALLOC_ARENA_MAX", malloc.ENV)}
    r = subprocess.run([sys.executable, "-c", CHILD], env={**clean, **env}, capture_output=True, text=True, timeout=120, check=True)
    return {line.split()[0]: int(line.split()[1]) for line in r.stdout.splitlines()}


def test_the_setting_defaults_to_two_and_yields_to_glibcs_own() -> None:
    assert malloc.arenas_wanted({}) == malloc.DEFAULT_ARENAS == 2
    assert malloc.arenas_wanted({"PIPELINE_MALLOC_ARENAS": "4"}) == 4
    assert malloc.arenas_wanted({"PIPELINE_MALLOC_ARENAS": "0"}) == 0
    assert malloc.arenas_wanted({"MALLOC_ARENA_MAX": "1", "PIPELINE_MALLOC_ARENAS": "4"}) == 0
    for bad in ("two", "-1"):
        with pytest.raises(ValueError, match=r"PIPELINE_MALLOC_ARENAS=.*malloc arenas"):
            malloc.arenas_wanted({"PIPELINE_MALLOC_ARENAS": bad})


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="arenas are glibc's")
def test_a_limited_process_keeps_its_threads_in_two_arenas() -> None:
    limited = _child({})
    assert limited == {"limit": 2, "heaps": 2}, limited
    free = _child({"PIPELINE_MALLOC_ARENAS": "0"})
    assert free["limit"] == 0 and free["heaps"] > 2, free  # the same threads spread over more arenas without it


def test_a_bad_setting_stops_a_worker_with_a_clear_error(tmp_path: os.PathLike[str]) -> None:
    env = {**os.environ, "PIPELINE_MALLOC_ARENAS": "lots"}
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "worker", str(tmp_path)], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "PIPELINE_MALLOC_ARENAS='lots': expected a whole number of malloc arenas" in r.stderr, r.stderr
