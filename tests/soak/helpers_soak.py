"""Helpers for the soak and fault tests: topologies, processes, the admin RPC, answers.

Every wait has a deadline and fails the test instead of hanging; every
process started here is stopped by the caller in a ``finally`` (``stop``).
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from pipeline import process
from pipeline import topology as topo
from pipeline.pb import admin_pb2 as apb
from pipeline.pb import admin_pb2_grpc as apb_grpc
from pipeline.pb import grpc_service_pb2 as kpb
from pipeline.pb import grpc_service_pb2_grpc as kpb_grpc
from pipeline.serving import kserve

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
BIN = Path(sys.executable).parent
#: a cold start imports TensorFlow in every process; on a busy 2-core machine several at once take a while.
START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 8.0
_PORT = re.compile(r'"port":\s*(\d+)')


def env() -> dict[str, str]:
    """The environment of every process started here: the venv first on PATH, unbuffered, no stray PIPELINE_* settings."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    return {
        **base,
        "PATH": f"{BIN}:{base.get('PATH', '')}",
        "PYTHONUNBUFFERED": "1",
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONPATH": f"{ROOT}:{base.get('PYTHONPATH', '')}".rstrip(":"),
    }


def pipeline(*args: str, timeout_s: float = 300.0) -> subprocess.CompletedProcess[str]:
    """Run a ``pipeline`` sub-command to completion."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=timeout_s, env=env(), cwd=ROOT
    )


def check(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


# ------------------------------------------------------------------ topologies
def join_topology(directory: Path, sock_dir: str | None = None) -> Path:
    """A small topology with a join: ``tests.models.inception`` cut into 3 shards.

    ``shard0`` and ``shard1`` each take the image and feed ``shard2``, which
    also takes the image: a join of three producers (ingress, shard0, shard1).
    With ``sock_dir``, every ZeroMQ endpoint is an ipc path there (no ports).
    """
    directory.parent.mkdir(parents=True, exist_ok=True)
    source = directory.parent / "inception.keras"
    subprocess.run(
        [sys.executable, "-c", f"import models; models.inception().save({str(source)!r})"],
        cwd=TESTS, env=env(), check=True, timeout=180, capture_output=True,
    )  # fmt: skip
    check(
        pipeline(
            "partition", str(source), "--cut", "branch_a", "--cut", "branch_b2", "--out", str(directory),
            "--grpc-address", "127.0.0.1:0", "--no-verify",
        )
    )  # fmt: skip
    if sock_dir is not None:
        t = topo.load(directory)
        shards = tuple(
            dataclasses.replace(s, endpoint=f"ipc://{sock_dir}/{s.name}.ipc", bind=f"ipc://{sock_dir}/{s.name}.ipc", metrics="")
            for s in t.shards
        )
        results = f"ipc://{sock_dir}/ingress.ipc"
        ingress = dataclasses.replace(t.ingress, results=results, bind=results, metrics="")
        t.replace(shards=shards, ingress=ingress).write(directory)
    return directory


# ------------------------------------------------------------------- processes
#: a started process (the one launcher of ``pipeline.process``).
Proc = process.Process


def start(name: str, argv: Sequence[str], log_dir: Path, *, group: bool = False, netns: str | None = None) -> Proc:
    """Start a process with its output in a log file (``group``: in its own process group, e.g. honcho)."""
    return process.start(name, argv, log_dir, env=env(), cwd=ROOT, group=group, netns=netns)


def start_ingress(directory: Path, log_dir: Path, *extra: str) -> Proc:
    return start("ingress", process.pipeline_command("ingress", str(directory), "--address", "127.0.0.1:0", *extra), log_dir)


def start_worker(directory: Path, shard: str, log_dir: Path, *extra: str) -> Proc:
    return start(shard, process.pipeline_command("worker", str(directory), "--shard", shard, *extra), log_dir)


def stop(p: Proc | None, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
    """Signal a process (its whole group when it leads one), then SIGKILL after ``timeout_s``."""
    return None if p is None else p.stop(sig, timeout_s)


def grpc_port(p: Proc, timeout_s: float = START_TIMEOUT_S) -> int:
    """The port the ingress bound (its ``ingress_started`` log line), from its own log or honcho's."""
    deadline = time.monotonic() + timeout_s
    while True:
        for line in p.text().splitlines():
            if "ingress_started" in line:
                found = _PORT.search(line)
                if found:
                    return int(found.group(1))
        if not p.alive:
            pytest.fail(f"{p.name} exited with {p.proc.returncode} before the ingress started\n{p.tail()}")
        if time.monotonic() > deadline:
            pytest.fail(f"no ingress_started line within {timeout_s} s\n{p.tail()}")
        time.sleep(0.2)


def wait_for(predicate: Callable[[], Any], timeout_s: float, what: str, procs: Sequence[Proc] = (), interval_s: float = 0.05) -> Any:
    """``predicate()`` once it is true; fails the test naming ``what`` (and the tails of ``procs``) after ``timeout_s``.

    The one polling wait of the test helpers (``helpers_worker.wait_until``, ``multihost.hosts.wait``)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}\n" + "\n".join(p.tail() for p in procs))
        time.sleep(interval_s)


# ------------------------------------------------------------------ gRPC side
class Client:
    """Blocking stubs for the KServe and admin services of one ingress."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.channel = grpc.insecure_channel(target)
        self.infer = kpb_grpc.GRPCInferenceServiceStub(self.channel)
        self.admin = apb_grpc.PipelineAdminStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def ready(self) -> bool:
        try:
            return self.infer.ServerReady(kpb.ServerReadyRequest(), timeout=1).ready
        except grpc.RpcError:
            return False

    def processes(self) -> dict[str, apb.Process]:
        response = self.admin.Processes(apb.ProcessesRequest(), timeout=5)
        return {p.name: p for p in response.processes}


def request(model: str, inputs: dict[str, np.ndarray]) -> kpb.ModelInferRequest:
    return kserve.infer_request(model, inputs)


def outputs(response: kpb.ModelInferResponse) -> dict[str, np.ndarray]:
    return {t.name: kserve.output_array(response, i) for i, t in enumerate(response.outputs)}


def bitwise_equal(expected: dict[str, np.ndarray], received: dict[str, np.ndarray]) -> bool:
    return set(expected) <= set(received) and all(
        expected[k].shape == received[k].shape and expected[k].tobytes() == received[k].tobytes() for k in expected
    )


def within(expected: dict[str, np.ndarray], received: dict[str, np.ndarray], tolerance: float) -> bool:
    """Every output within ``tolerance`` of the reference (bitwise when it is 0), as ``pipeline soak`` checks."""
    if tolerance <= 0:
        return bitwise_equal(expected, received)
    return all(
        k in received
        and expected[k].shape == received[k].shape
        and float(np.max(np.abs(expected[k].astype(np.float64) - received[k].astype(np.float64)), initial=0.0)) <= tolerance
        for k in expected
    )
