"""`pipeline bench` as a user runs it, on a small model: every section prints its table, the JSON
holds the numbers, and the chart is drawn. (Numbers are never asserted: the machine is shared.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import models

pytestmark = pytest.mark.slow
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=900, env=ENV)


def test_bench_prints_every_section_and_writes_json_and_chart(tmp_path: Path) -> None:
    model_file = tmp_path / "residual.keras"
    models.residual().save(model_file)
    r = _run("partition", str(model_file), "--shards", "3", "--out", str(tmp_path / "res"), "--no-verify")
    assert r.returncode == 0, r.stderr
    r = _run(
        "bench", str(tmp_path / "res"), "--requests", "30", "--concurrency", "1,4", "--batch-sizes", "1,4",
        "--sections", "latency,throughput,parallel,hop,spans",
        "--json", str(tmp_path / "bench.json"), "--chart", str(tmp_path / "bench.png"), "--logs", str(tmp_path / "logs"),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    for heading in ("latency at batch 1", "throughput (samples/s)", "pipeline parallelism", "hop (encode", "where the time goes"):
        assert heading in r.stdout, r.stdout
    report = json.loads((tmp_path / "bench.json").read_text())
    assert report["pipeline_latency"]["errors"] == {}
    assert {row["errors"] == {} for row in report["pipeline_throughput"].values()} == {True}
    par = report["parallel"]
    if "skipped" not in par:  # a machine with one CPU skips it, saying why
        assert par["errors"] == {} and par["pipeline_rate"] > 0 and par["speedup"] > 0
        if par["best_batch"] > 1:
            assert par["batched_errors"] == {} and par["batched_rate"] > 0
    assert [row["label"] for row in report["hop"]] == ["64 KiB", "1 MiB", "16 MiB"]
    assert "shard0.compute" in report["spans"] and "client.total" in report["spans"]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_colocation_section_serves_every_configuration_in_rounds(tmp_path: Path) -> None:
    # the section the co-location tables in docs/BENCHMARKS.md come from, without Triton (its own venv)
    model_file = tmp_path / "residual.keras"
    models.residual().save(model_file)
    assert _run("partition", str(model_file), "--shards", "2", "--out", str(tmp_path / "res"), "--no-verify").returncode == 0
    r = _run(
        "bench", str(tmp_path / "res"), "--only", "colocation", "--no-triton", "--rounds", "2", "--requests", "20",
        "--threads", "1", "--json", str(tmp_path / "bench.json"),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    assert "2 interleaved round(s)" in r.stdout and "skipped: not asked for (--no-triton)" in r.stdout, r.stdout
    for label in ("local, compiled, in-process", "pipeline, one process per shard", "pipeline, shards co-located", "pipeline, co-located with ingress"):
        assert label in r.stdout, r.stdout
    report = json.loads((tmp_path / "bench.json").read_text())["colocation"]
    assert report["rounds"] == 2 and report["shards"] == 2
    # the ingress and the workers' processes; with-ingress: one process serves all
    for name, processes in (("per-shard", 3), ("co-located", 2), ("with-ingress", 1)):
        row = report[name]
        assert row["errors"] == {} and row["processes"] == processes and row["rate"] > 0 and row["p50_ms"] > 0
        assert len(row["runs"]) == 2  # one entry per round
    assert report["triton"] == {"skipped": "not asked for (--no-triton)"}
    # one thread count asked for: the overlap of the shards with 1 intra-op thread, and as many or 1 inter-op threads
    assert [(o["threads"], o["inter_threads"]) for o in report["overlap"]] == [(1, 2), (1, 1)], report["overlap"]
    assert all(o["work"] > 0 for o in report["overlap"]), report["overlap"]
