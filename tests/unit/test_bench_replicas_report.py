"""The replicas bench's report (pure logic): the ratios, the CPU line, errors; and the CPU accounting it uses."""

from __future__ import annotations

import os
import subprocess
import sys

from pipeline.bench.colocation import cpu_seconds
from pipeline.bench.replicas import render


def _result(**extra: object) -> dict[str, object]:
    run = {"rate": 50.0, "p50_ms": 30.0, "errors": {}}
    return {
        "shard": "shard1",
        "cores": 2,
        "rounds": {"one": [run], "two": [{**run, "rate": 70.0, "errors": {"UNAVAILABLE": 2}}]},
        "rate_one": 50.0,
        "rate_two": 70.0,
        "rate_ratio": 1.4,
        "p50_one_ms": 30.0,
        "p50_two_ms": 33.0,
        "p50_ratio": 1.1,
        "round_ratios": [1.4],
        **extra,
    }


def test_the_report_shows_the_ratios_the_cpu_in_use_and_the_errors() -> None:
    text = "\n".join(render(_result(cpu_cores_one=1.47, cpu_cores_two=1.94)))
    assert "one replica 50.0/s, two 70.0/s, ratio 1.40 (goal >= 1.7)" in text
    assert "one 30.00 ms, two 33.00 ms, ratio 1.10 (goal within 10%)" in text
    assert "one replica 1.47 cores, two 1.94 cores, of 2" in text
    assert "errors (two): [{'UNAVAILABLE': 2}]" in text and "errors (one)" not in text
    # a report written before the CPU was measured still renders
    assert "one replica nan cores" in "\n".join(render(_result()))


def test_cpu_seconds_counts_live_processes_and_skips_gone_ones() -> None:
    busy = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    gone = int(busy.stdout)
    own = cpu_seconds([os.getpid()])
    assert own > 0
    for _ in range(200):  # spend CPU until the kernel's clock ticks show it (bounded: a few seconds at most)
        sum(i * i for i in range(50_000))
        if cpu_seconds([os.getpid()]) > own:
            break
    assert cpu_seconds([os.getpid()]) > own
    assert cpu_seconds([gone]) == 0.0 or os.path.exists(f"/proc/{gone}")  # a reused pid is the only exception
