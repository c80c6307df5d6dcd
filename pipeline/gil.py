"""A short GIL switch interval for serving processes (``sys.setswitchinterval``).

A serving process runs several Python threads that hand work to each other:
each shard's network loop and compute thread, the ingress's event loop and
gRPC's poller when the ingress shares the process. A thread that wants the
GIL while another runs Python waits until the holder blocks or until the
switch interval has passed (Python's default: 5 ms). Each hand-off inside a
request (a message received, a batch computed, a result sent) can wait that
long, and under load they add up.

Measured on MobileNetV3Large in 2 co-located shards on 2 CPUs, two pipelines
side by side in 8 interleaved rounds (each round: 40 requests one at a time,
160 at concurrency 16; docs/BENCHMARKS.md, "The ingress in the shards'
process"): the shards' process at 0.1 ms against 5 ms served 1.07x the
requests at concurrency 16 (more in 7 of 8 rounds), p50 0.97x; with the
ingress in that process, 0.5 ms against 5 ms 1.07-1.18x, and 0.1 ms against
0.5 ms 1.11x (7 of 8); 0.025 ms against 0.1 ms 0.89x (the switches
themselves start to cost).

``pipeline worker`` and ``pipeline ingress`` call :func:`configure` first
thing; ``PIPELINE_SWITCH_INTERVAL_MS`` sets another interval.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

#: the switch interval of a serving process unless the environment says otherwise (Python's default: 5 ms).
DEFAULT_MS = 0.1
ENV = "PIPELINE_SWITCH_INTERVAL_MS"


def interval_s(environ: Mapping[str, str]) -> float:
    """The interval to set, in seconds; :class:`ValueError` naming the variable for a value that is not > 0."""
    raw = environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_MS / 1000
    try:
        ms = float(raw)
    except ValueError:
        ms = float("nan")
    if not ms > 0:
        raise ValueError(f"{ENV}={raw!r}: expected a positive number of milliseconds, such as {DEFAULT_MS:g}")
    return ms / 1000


def configure(environ: Mapping[str, str] | None = None) -> float:
    """Set this process's switch interval; return it in seconds."""
    seconds = interval_s(os.environ if environ is None else environ)
    sys.setswitchinterval(seconds)
    return seconds
