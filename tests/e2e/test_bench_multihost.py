"""`pipeline bench DIR --only multihost` as a user runs it (as root), on a small model and one second of load
per plan: every row of the table is printed, the plans are listed, the JSON holds each plan's numbers,
and no namespace is left behind. Timings are never asserted (the machine is shared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.netns import BASE_PREFIX, namespaces, unavailable_reason
from tests import models

pytestmark = pytest.mark.slow
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def _run(*args: str, timeout_s: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=timeout_s, env=ENV)


def _dead_runs(names: list[str]) -> set[str]:
    """Namespaces made by a process that is gone (a bench that did not clean up after itself)."""
    out = set()
    for name in names:
        if name.startswith(BASE_PREFIX):
            pid = name[len(BASE_PREFIX) :].split("-", 1)[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                out.add(name)
    return out


@pytest.mark.timeout(1200)
def test_bench_multihost_prints_every_row_and_removes_its_namespaces(tmp_path: Path) -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"the multihost bench needs network namespaces: {reason}")
    model_file = tmp_path / "inception.keras"
    models.inception().save(model_file)
    r = _run("partition", str(model_file), "--shards", "3", "--out", str(tmp_path / "inc"), "--no-verify")
    assert r.returncode == 0, r.stderr
    before = set(namespaces())
    r = _run(
        "bench", str(tmp_path / "inc"), "--only", "multihost", "--rates", "100mbit", "--load-seconds", "1",
        "--load-concurrency", "4", "--json", str(tmp_path / "bench.json"), "--logs", str(tmp_path / "logs"),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    rows = [
        "single host (reference)       loopback",
        "single host again, last       loopback",
        "compute-only, in order        100mbit",
        "cluster-aware                 100mbit",
        "plan with every host at one speed",
        "plan with h2 at 2.0x the speed",
        "at 100mbit: cluster-aware / compute-only throughput",
        "single host: hosts h1/h1/h1 (ingress h1)",
        "compute-only at 100mbit: hosts h1/h2/h3 (ingress h1)",
        "cluster-aware at 100mbit: hosts",
        "share of the model's compute on h2",
        "every host declared at speed",
        "the whole model in one process on every CPU:",
        "at 100mbit: x8 the compute-only plan needs",
    ]
    missing = [row for row in rows if row not in out]
    assert not missing, f"rows missing: {missing}\n{out}"
    assert "FAILED" not in out, out
    report = json.loads((tmp_path / "bench.json").read_text())["multihost"]
    plans = [report["single"], *(p for row in report["rates"].values() for p in row.values())]
    plans += [report["heterogeneous"]["uniform"], report["heterogeneous"]["aware"], report["single_after"]]
    assert len(plans) == 6
    assert report["local"]["rate"] > 0 and report["local"]["p50_ms"] > 0, report["local"]
    for p in plans:  # each plan answered (no number is judged, only that it was measured)
        assert p["requests"] > 0 and p["errors"] == {}, p
    assert _dead_runs(namespaces()) - _dead_runs(list(before)) == set(), "the bench left namespaces behind"
