"""Soak: `honcho start` on a generated Procfile, `pipeline record`, then `pipeline soak` for 60 s.

Run against the default topology (MobileNetV3Large in 4 shards) and a small
one with a join (three producers into one shard). The soak fails on any wrong
or lost answer and on memory growth; the test also asks for no error at all,
every pipeline process in the memory report, and a chart.

``PIPELINE_SOAK_TEST_S`` changes the duration (default 60 s).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers_soak import BIN, Proc, check, grpc_port, join_topology, pipeline, start, stop  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
DURATION_S = float(os.environ.get("PIPELINE_SOAK_TEST_S", "60"))
CONCURRENCY = 4  # a 2-core machine: enough to batch, not enough to starve the processes


def _soak_under_honcho(tmp_path: Path, topology_dir: Path, shards: list[str], *soak_args: str) -> dict:
    procfile = tmp_path / "Procfile"
    check(pipeline("procfile", str(topology_dir), "--out", str(procfile)))
    replay = tmp_path / "replay.npz"
    report_path, chart_path = tmp_path / "soak.json", tmp_path / "soak.png"
    honcho: Proc | None = None
    recorder: Proc | None = None
    try:
        honcho = start("honcho", [str(BIN / "honcho"), "start", "-f", str(procfile), "-d", str(tmp_path)], tmp_path, group=True)
        # the reference outputs are computed while the workers start
        recorder = start(
            "record",
            [sys.executable, "-m", "pipeline.cli", "record", str(topology_dir), "--count", "16", "--out", str(replay)],
            tmp_path,
        )
        port = grpc_port(honcho)
        assert recorder.proc.wait(300) == 0, recorder.tail()
        soak = pipeline(
            "soak", "--target", f"127.0.0.1:{port}", "--replay", str(replay), "--duration", str(DURATION_S),
            "--concurrency", str(CONCURRENCY), "--timeout", "30", "--wait-ready", "240",
            "--report", str(report_path), "--chart", str(chart_path), *soak_args,
            timeout_s=DURATION_S + 360,
        )  # fmt: skip
        assert honcho.alive, honcho.tail()
    finally:
        stop(recorder)
        stop(honcho, timeout_s=15)
    assert report_path.is_file(), f"no report\n{soak.stdout}\n{soak.stderr[-3000:]}\n{honcho.tail()}"
    report = json.loads(report_path.read_text())
    totals = report["totals"]
    print(soak.stdout)
    assert soak.returncode == 0, f"{soak.stdout}\n{soak.stderr[-2000:]}"
    assert totals["wrong"] == 0 and totals["lost"] == 0, totals
    assert totals["errors"] == {}, (totals, report["error_examples"])
    assert totals["correct"] >= DURATION_S, totals  # at least one a second, i.e. it really ran
    assert report["duration_s"] >= DURATION_S
    assert report["verdict"]["ok"], report["verdict"]
    # memory of every process over the whole run, through the ingress's admin RPC
    assert set(report["processes"]) == {"ingress", *shards}
    for name, proc in report["processes"].items():
        assert proc["growth"] is not None, name
        assert len(proc["samples"]) >= DURATION_S / 2, (name, len(proc["samples"]))
        assert len(proc["pids"]) == 1, (name, proc["pids"])  # nothing restarted
    assert len(report["intervals"]) >= DURATION_S
    assert chart_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the check could fail: the reference outputs of different inputs differ by far more than the tolerance
    oracle = report["oracle"]
    assert oracle["warning"] is None and oracle["spread"]["rows"] >= 16, oracle
    assert oracle["margin"] is None or oracle["margin"] >= 100, oracle
    return report


def test_soak_default_topology(tmp_path: Path) -> None:
    """MobileNetV3Large (calibrated, so its answers depend on the input) within the batching tolerance that
    `pipeline record` measured: dynamic batching moves a row's last bits (~1e-9), a wrong row moves it ~1e-4."""
    topology_dir = tmp_path / "mobilenet_v3_large"
    check(pipeline("partition", "mobilenet_v3_large", "--shards", "4", "--out", str(topology_dir), "--grpc-address", "127.0.0.1:0", "--no-verify"))
    report = _soak_under_honcho(tmp_path, topology_dir, ["shard0", "shard1", "shard2", "shard3"])
    oracle = report["oracle"]
    assert oracle["kind"].startswith("batching tolerance") and 0 < oracle["tolerance"] < 1e-6, oracle
    assert oracle["spread"]["smallest"] > 1e-5, oracle


def test_soak_topology_with_a_join(tmp_path: Path) -> None:
    """Within 1e-5: this model's Dense layer gives a row results that differ by about 1e-7 with the batch size
    (TensorFlow's CPU matmul; the unsplit model does the same), and the workers batch concurrent requests.
    A part joined to the wrong request would differ by far more."""
    topology_dir = join_topology(tmp_path / "inception")
    report = _soak_under_honcho(tmp_path, topology_dir, ["shard0", "shard1", "shard2"], "--tolerance", "1e-5")
    # the join shard's heartbeat stats travel through the admin RPC into the report
    assert "pending_joins" in report["processes"]["shard2"]["stats"]
