"""Helpers for pipelines spread over namespace hosts: placement, start, readiness and load from the ingress host.

:func:`place_on_hosts` is the only place that decides where processes live
and which ports they use; once ``pipeline place DIR --cluster`` lands, it is
the one function to replace with that command.
"""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import process
from pipeline import topology as topo
from pipeline.launch import PORT_FLOOR, Cluster, ephemeral_range
from tests.netns import Network

ROOT = Path(__file__).resolve().parents[2]
LOAD = Path(__file__).resolve().parent / "load.py"
#: starting three TensorFlow processes on a busy 2-core machine.
START_TIMEOUT_S = 300.0

READY_PROBE = """
import sys, grpc
from pipeline.pb import grpc_service_pb2 as kpb, grpc_service_pb2_grpc as kgrpc
with grpc.insecure_channel(sys.argv[1]) as ch:
    try:
        sys.exit(0 if kgrpc.GRPCInferenceServiceStub(ch).ServerReady(kpb.ServerReadyRequest(), timeout=2).ready else 1)
    except grpc.RpcError:
        sys.exit(1)
"""


def place_on_hosts(directory: Path, placement: Mapping[str, str], *, seed: int | None = None) -> topo.Topology:
    """Rewrite ``DIR/topology.yaml`` so each process (``ingress`` or a shard) runs on its host address.

    ``placement`` maps every process name to a host address (``198.18.0.X``).
    Each process gets ``host``, ``endpoint`` (``tcp://ADDRESS:PORT``), ``bind``
    (``tcp://0.0.0.0:PORT``) and ``metrics``; the ingress also its ``grpc``
    address and ``results`` endpoint. Ports are drawn at random (distinct on the
    whole machine): the namespaces are fresh, so nothing else holds them.
    """
    t = topo.load(directory)
    missing = sorted(set(t.processes_on(None)) - set(placement))
    if missing:
        raise ValueError(f"expected a host for every process, none given for {missing}")
    # below the ephemeral range: an outgoing connection from the same namespace cannot hold one of them
    ports = iter(random.Random(seed).sample(range(PORT_FLOOR, ephemeral_range()[0]), 3 * len(placement) + 4))

    def where(name: str) -> tuple[str, int]:
        return placement[name], next(ports)

    shards = []
    for s in t.shards:
        address, port = where(s.name)
        shards.append(
            dataclasses.replace(
                s,
                host=address,
                endpoint=f"tcp://{address}:{port}",
                bind=f"tcp://0.0.0.0:{port}",
                metrics=f"{address}:{next(ports)}",
            )
        )
    address, port = where(topo.INGRESS)
    ingress = dataclasses.replace(
        t.ingress,
        host=address,
        grpc=f"{address}:{next(ports)}",
        results=f"tcp://{address}:{port}",
        bind=f"tcp://0.0.0.0:{port}",
        metrics=f"{address}:{next(ports)}",
    )
    t.replace(shards=tuple(shards), ingress=ingress).write(directory)
    return topo.load(directory)


@dataclasses.dataclass
class MultiHost:
    """A topology placed over a :class:`Network`'s hosts, run with one :class:`Cluster`."""

    network: Network
    topology: topo.Topology
    log_dir: Path
    hosts: Mapping[str, str]  # process name -> host name (h1, h2...)
    worker_args: Sequence[str] = ()
    cluster: Cluster | None = None

    @property
    def ingress_host(self) -> str:
        return self.hosts[topo.INGRESS]

    @property
    def target(self) -> str:
        return self.topology.ingress.grpc

    def start(self, timeout_s: float = START_TIMEOUT_S) -> MultiHost:
        netns = {name: self.network.host(h).netns for name, h in self.hosts.items()}
        self.cluster = Cluster(
            self.topology,
            self.log_dir,
            netns=netns,
            common_worker_args=list(self.worker_args),
            ready=self.ready,
        )
        self.cluster.start(timeout_s)
        return self

    def stop(self) -> dict[str, int | None]:
        return self.cluster.stop() if self.cluster is not None else {}

    def ready(self) -> bool:
        """``ServerReady`` asked from the ingress's host (this process cannot reach the namespaces)."""
        result = self.network.run(self.ingress_host, [sys.executable, "-c", READY_PROBE, self.target], timeout_s=30, cwd=ROOT)
        return result.returncode == 0

    def load_command(self, replay: Path, out: Path, **options: Any) -> list[str]:
        argv = [sys.executable, str(LOAD), "--target", self.target, "--replay", str(replay), "--out", str(out)]
        for key, value in options.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        return argv

    def load(self, replay: Path, out: Path, timeout_s: float = 300.0, **options: Any) -> list[dict[str, Any]]:
        """Run the load client on the ingress's host to completion; its records."""
        result = self.network.run(self.ingress_host, self.load_command(replay, out, **options), timeout_s=timeout_s, cwd=ROOT)
        assert result.returncode == 0, f"load client exited {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        return read_records(out)

    def start_load(self, replay: Path, out: Path, **options: Any) -> process.Process:
        """Start the load client on the ingress's host in the background (stop it in a ``finally``)."""
        return process.start("load", self.load_command(replay, out, **options), self.log_dir, cwd=ROOT, netns=self.network.host(self.ingress_host).netns)

    def tails(self) -> str:
        return "\n".join(p.tail(20) for p in (self.cluster.procs.values() if self.cluster else []))


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def counts(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Requests by fate: ``correct``, ``wrong``, ``LOST`` or the gRPC code of the error."""
    out: dict[str, int] = {}
    for r in records:
        key = ("wrong" if r["wrong"] else "correct") if r["code"] == "OK" else str(r["code"])
        out[key] = out.get(key, 0) + 1
    return out


def partition(source: str | Path, out: Path, *args: str, timeout_s: float = 900.0) -> Path:
    """``pipeline partition SOURCE ... --out OUT --no-verify`` (placement follows, by :func:`place_on_hosts`)."""
    result = subprocess.run(
        [*process.pipeline_command("partition", str(source), *args, "--out", str(out), "--no-verify")],
        capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, f"partition failed\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return out


def record(directory: Path, out: Path, count: int, *args: str, timeout_s: float = 600.0) -> Path:
    """``pipeline record DIR --count N --out FILE``: inputs and the whole model's reference outputs."""
    result = subprocess.run(
        [*process.pipeline_command("record", str(directory), "--count", str(count), "--out", str(out), *args)],
        capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, f"record failed\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return out


def reference_spread(replay_path: Path) -> float:
    """The smallest largest-difference between the reference outputs of any two requests of a replay.

    A comparison with tolerance ``tol`` can fail only if this is far above ``tol``
    (inputs that all answer the same would let a pipeline that mixes requests up pass).
    """
    from pipeline.soak import replay as replay_mod

    outs = [r.outputs for r in replay_mod.load(replay_path).requests]
    spread = float("inf")
    for i in range(len(outs)):
        for j in range(i + 1, len(outs)):
            d = max(float(np.max(np.abs(outs[i][k].astype(np.float64) - outs[j][k].astype(np.float64)))) for k in outs[i])
            spread = min(spread, d)
    return spread


def wait(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(interval_s)
