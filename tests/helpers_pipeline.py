"""A whole pipeline started from a topology (``pipeline.launch.Cluster``), as the integration tests start and ask it.

Shared by ``tests/integration/test_colocation.py`` and ``test_replicas.py``: the references recorded with the
workers' thread count (so one-at-a-time answers compare bitwise), the pipeline started and always stopped, and
what the ingress's admin service says of each process, every wait with a deadline.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
from soak.helpers_soak import check, pipeline, wait_for

from pipeline import topology as topo
from pipeline.launch import Cluster
from pipeline.pb import admin_pb2 as apb
from pipeline.pb import admin_pb2_grpc as apb_grpc
from pipeline.pb import grpc_service_pb2 as kpb
from pipeline.pb import grpc_service_pb2_grpc as kpb_grpc
from pipeline.soak import replay

#: how long a wait on the admin service's view (a heartbeat, a process down or back) may take by default.
WAIT_S = 60.0


def record(directory: Path, out: Path, *, count: int, batch: int, seed: int, threads: str) -> replay.Replay:
    """``pipeline record`` of ``count`` requests of ``batch`` rows with the workers' ``--threads`` (bitwise at batch 1)."""
    check(pipeline("record", str(directory), "--count", str(count), "--batch", str(batch), "--seed", str(seed), "--threads", threads, "--out", str(out)))
    return replay.load(out)


@contextmanager
def serving(t: topo.Topology, logs: Path, *, threads: str, start_s: float) -> Iterator[Cluster]:
    """Every process of ``t`` started (workers with ``--threads``), each up for the ingress within ``start_s``; all
    stopped at the end. (``ServerReady`` alone is true once one replica of each shard is up.)"""
    cluster = Cluster(t, logs, common_worker_args=["--threads", threads])
    try:
        cluster.start(start_s)
        wait(lambda: all(p.up for p in processes(cluster.target).values()), "every process up for the ingress", start_s)
        yield cluster
    finally:
        cluster.stop()


def processes(target: str) -> dict[str, apb.Process]:
    """The ingress's admin view of every process (``PipelineAdmin.Processes``), by name."""
    with grpc.insecure_channel(target) as channel:
        response = apb_grpc.PipelineAdminStub(channel).Processes(apb.ProcessesRequest(), timeout=10)
    return {p.name: p for p in response.processes}


def server_ready(target: str) -> bool:
    """The ingress's ``ServerReady`` (``False`` while it cannot be asked)."""
    with grpc.insecure_channel(target) as channel:
        try:
            return bool(kpb_grpc.GRPCInferenceServiceStub(channel).ServerReady(kpb.ServerReadyRequest(), timeout=2).ready)
        except grpc.RpcError:
            return False


def wait(predicate: Callable[[], Any], what: str, timeout_s: float = WAIT_S) -> Any:
    """``predicate()`` once it is true; fails the test naming ``what`` after ``timeout_s``."""
    return wait_for(predicate, timeout_s, what, interval_s=0.1)


def settled_stat(target: str, name: str, stat: str) -> float:
    """``stat`` of process ``name`` from a heartbeat sent at least two heartbeats after this call began."""
    first = processes(target)[name].heartbeats
    fresh = wait(lambda: (lambda p: p if p.heartbeats >= first + 2 else None)(processes(target)[name]), f"two heartbeats of {name}")
    return fresh.stats[stat]
