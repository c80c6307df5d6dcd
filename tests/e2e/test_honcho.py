"""End to end: `honcho start` on a generated Procfile serves the default model (MobileNetV3Large in
4 shards, BatchNormalization calibrated so that its answers depend on the input). One request at a
time, its answers through gRPC are bitwise equal to the whole model's; under concurrent load, where
dynamic batching regroups rows, every answer is its own request's within the batching tolerance, far
below the difference between the answers of different inputs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from pipeline.launch import free_ports
from pipeline.pb import grpc_service_pb2 as kpb
from pipeline.pb import grpc_service_pb2_grpc as kgrpc

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240


def _run(*args: str, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=600, **kw)


def test_procfile_in_repo_matches_generated_lines(tmp_path: Path) -> None:
    """The committed Procfile is what `pipeline procfile` writes for the default topology's shape (bin/run:
    4 shards co-located in one worker process)."""
    from pipeline.procfile import lines
    from pipeline.topology import load

    r = _run("partition", "mobilenet_v3_large", "--shards", "4", "--colocate", "--out", str(tmp_path / "mobilenet_v3_large"), "--no-verify")
    assert r.returncode == 0, r.stderr
    generated = lines(load(tmp_path / "mobilenet_v3_large"), "topology/mobilenet_v3_large")
    assert (ROOT / "Procfile").read_text().splitlines() == generated


def test_honcho_start_serves_exact_answers(tmp_path: Path) -> None:
    (grpc_port,) = free_ports(1)
    target = f"127.0.0.1:{grpc_port}"
    topo_dir = tmp_path / "mobilenet_v3_large"
    # as bin/run makes it: the 4 shards co-located in one worker process (one Procfile line for them)
    r = _run("partition", "mobilenet_v3_large", "--shards", "4", "--colocate", "--out", str(topo_dir), "--grpc-address", target, "--no-verify")
    assert r.returncode == 0, r.stderr
    procfile = tmp_path / "Procfile"
    r = _run("procfile", str(topo_dir), "--out", str(procfile))
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONUNBUFFERED": "1"}
    log = open(tmp_path / "honcho.log", "wb")
    honcho = subprocess.Popen(
        [str(Path(sys.executable).parent / "honcho"), "start", "-f", str(procfile), "-d", str(tmp_path)],
        stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
    )  # fmt: skip
    try:
        channel = grpc.insecure_channel(target)
        stub = kgrpc.GRPCInferenceServiceStub(channel)
        deadline = time.monotonic() + START_TIMEOUT_S
        ready = False
        while time.monotonic() < deadline and not ready:
            assert honcho.poll() is None, (tmp_path / "honcho.log").read_text()[-4000:]
            try:
                ready = stub.ServerReady(kpb.ServerReadyRequest(), timeout=1).ready
            except grpc.RpcError:
                pass
            time.sleep(0.5)
        assert ready, (tmp_path / "honcho.log").read_text()[-4000:]

        from pipeline.soak import replay
        from tests.answers import mismatches

        # the references come from the whole model, compiled and with the workers' thread count (both move
        # the last bits; `record` takes the co-located process's pool by default), by the command a user
        # runs; one file of single samples, one of 2-sample requests
        for batch in (1, 2):
            r = _run("record", str(topo_dir), "--count", "8", "--batch", str(batch), "--seed", str(batch), "--out", str(tmp_path / f"r{batch}.npz"))
            assert r.returncode == 0, r.stderr
            assert "oracle: rows move by up to" in r.stdout, r.stdout
        files = [replay.load(tmp_path / f"r{batch}.npz") for batch in (1, 2)]
        inputs = [q.inputs for f in files for q in f.requests]
        references = [q.outputs for f in files for q in f.requests]
        # one at a time, each request is computed alone (or as its own batch): bitwise
        assert mismatches(target, "mobilenet_v3_large", inputs, references, tolerance=0.0, concurrency=1) == []
        # concurrently the shards batch rows of different requests together: within the batching tolerance
        tolerance = files[0].tolerance
        assert tolerance is not None and 0 < tolerance < 1e-6, tolerance
        assert mismatches(target, "mobilenet_v3_large", inputs * 3, references * 3, tolerance=tolerance, concurrency=8) == []
        channel.close()
    finally:
        os.killpg(honcho.pid, signal.SIGTERM)
        try:
            honcho.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(honcho.pid, signal.SIGKILL)
            honcho.wait(10)
        log.close()
    text = (tmp_path / "honcho.log").read_text()
    # every process stopped on its own within honcho's budget (none had to be killed), with status 0
    assert "SIGKILL" not in text, text[-3000:]
    for name in ("ingress", "workers"):
        assert f"{name}.1 stopped (rc=0)" in text, text[-3000:]
    assert text.count('"worker_stopped"') == 4, text[-3000:]  # every shard of the process drained
