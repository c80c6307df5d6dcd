"""End to end: `honcho start` on a generated Procfile serves the default model (MobileNetV3Large in
4 shards), and its answers through gRPC are bitwise equal to the whole model at batch 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
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
    """The committed Procfile is what `pipeline procfile` writes for the default topology's shape."""
    from pipeline.procfile import lines
    from pipeline.topology import load

    r = _run("partition", "mobilenet_v3_large", "--shards", "4", "--out", str(tmp_path / "mobilenet_v3_large"), "--no-verify")
    assert r.returncode == 0, r.stderr
    generated = lines(load(tmp_path / "mobilenet_v3_large"), "topology/mobilenet_v3_large")
    assert (ROOT / "Procfile").read_text().splitlines() == generated


def test_honcho_start_serves_exact_answers(tmp_path: Path) -> None:
    (grpc_port,) = free_ports(1)
    target = f"127.0.0.1:{grpc_port}"
    topo_dir = tmp_path / "mobilenet_v3_large"
    r = _run("partition", "mobilenet_v3_large", "--shards", "4", "--out", str(topo_dir), "--grpc-address", target, "--no-verify")
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

        import keras

        whole = keras.saving.load_model(topo_dir / "model.keras")
        rng = np.random.default_rng(7)
        for _ in range(3):
            x = rng.standard_normal((1, 224, 224, 3)).astype(np.float32)
            req = kpb.ModelInferRequest(model_name="mobilenet_v3_large")
            req.inputs.add(name="input_layer", datatype="FP32", shape=[1, 224, 224, 3])
            req.raw_input_contents.append(x.tobytes())
            resp = stub.ModelInfer(req, timeout=30)
            assert resp.outputs[0].name == "predictions" and list(resp.outputs[0].shape) == [1, 1000]
            got = np.frombuffer(resp.raw_output_contents[0], np.float32).reshape(1, 1000)
            expected = np.asarray(whole(x, training=False))
            assert got.tobytes() == expected.tobytes(), float(np.abs(got - expected).max())
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
    for name in ("ingress", "shard0", "shard1", "shard2", "shard3"):
        assert f"{name}.1 stopped (rc=0)" in text, text[-3000:]
