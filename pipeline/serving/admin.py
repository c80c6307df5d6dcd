"""The ``pipeline.admin.PipelineAdmin`` service, served by the ingress next to KServe v2.

``Processes`` lists every process of the pipeline as the ingress sees it:
itself (pid, resident memory now, its own counters) and each shard from its
latest heartbeat (pid, host, ready, resident memory, the heartbeat's stats
map as sent). Shards may run on other machines; the ingress hears from all of
them, so a client that can reach the ingress sees the whole pipeline
(``pipeline soak`` samples memory over time with it; a live view can too).

:class:`ProcessTable` is pure bookkeeping (no sockets): the ingress feeds it
every heartbeat it accepts.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import psutil

from pipeline import replicas
from pipeline import topology as topo
from pipeline.pb import admin_pb2 as apb
from pipeline.pb import admin_pb2_grpc as apb_grpc
from pipeline.pb import envelope_pb2 as pb

if TYPE_CHECKING:
    from pipeline.serving.ingress import Ingress

SERVICE_NAME = apb.DESCRIPTOR.services_by_name["PipelineAdmin"].full_name


@dataclass
class _Seen:
    heartbeat: pb.Heartbeat
    at: float  # monotonic seconds
    count: int = 0
    restarts: int = 0


class ProcessTable:
    """Latest heartbeat of every shard, with counts of heartbeats and restarts."""

    def __init__(self, shards: Iterable[str]) -> None:
        self.shards = list(shards)
        self._seen: dict[str, _Seen] = {}

    def beat(self, shard: str, heartbeat: pb.Heartbeat, restarted: bool = False, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        seen = self._seen.get(shard)
        if seen is None:
            seen = self._seen[shard] = _Seen(pb.Heartbeat(), now)
        seen.heartbeat.CopyFrom(heartbeat)
        seen.at = now
        seen.count += 1
        seen.restarts += int(restarted)

    def get(self, shard: str) -> _Seen | None:
        return self._seen.get(shard)


def ingress_stats(ingress: Ingress) -> dict[str, float]:
    """The ingress's own counters and gauges (names are stable: clients show them)."""
    stats = ingress.stats
    out: dict[str, float] = {
        "pending": len(ingress.table),
        "max_inflight": ingress.config.max_inflight,
        "inference_count": stats.inference_count,
        "execution_count": stats.execution_count,
        "success": stats.success.count,
        "fail": stats.fail.count,
        "dropped": ingress.drops.total,
        "retries": getattr(ingress, "retried", 0),
    }
    out.update({f"codes.{code}": n for code, n in stats.codes.items()})
    out.update({f"dropped.{reason}": n for reason, n in ingress.drops.snapshot().items()})
    out.update({f"ignored.{reason}": n for reason, n in ingress.table.ignored.items()})
    recorder = getattr(ingress, "recorder", None)
    if recorder is not None:
        out.update(recorder.snapshot())
    return out


class AdminServicer(apb_grpc.PipelineAdminServicer):
    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self._process = psutil.Process(self.pid)

    async def Processes(self, request: apb.ProcessesRequest, context: grpc.aio.ServicerContext) -> apb.ProcessesResponse:
        return self.processes()

    def processes(self) -> apb.ProcessesResponse:
        ing = self.ingress
        now = time.monotonic()
        response = apb.ProcessesResponse(
            model=ing.topology.name, time_ns=time.time_ns(), heartbeat_interval_s=ing.config.heartbeat_interval_s
        )
        try:
            rss = self._process.memory_info().rss
        except psutil.Error:
            rss = 0
        ready = ing.ready()
        me = response.processes.add(
            name=topo.INGRESS,
            role="ingress",
            host=self.host,
            pid=self.pid,
            ready=ready,
            up=not ing.closing,
            state="closing" if ing.closing else ("up" if ready else "up, waiting for shards"),
            rss_bytes=rss,
            heartbeat_age_s=0.0,
            metrics=ing.topology.ingress.metrics,
        )
        for key, value in ingress_stats(ing).items():
            me.stats[key] = float(value)
        not_up = getattr(ing.liveness, "replicas_not_up", ing.liveness.not_up)(now)  # per replica (pipeline.replicas)
        table: ProcessTable = ing.processes
        for shard in table.shards:
            seen = table.get(shard)
            entry = response.processes.add(name=shard, role="shard", up=shard not in not_up, state=not_up.get(shard, "up"))
            if seen is None:
                entry.heartbeat_age_s = -1.0
                entry.metrics = replicas.metrics_of(ing.topology, shard)
                continue
            hb = seen.heartbeat
            entry.host = hb.host
            entry.pid = hb.pid
            entry.ready = hb.ready
            entry.rss_bytes = hb.rss_bytes
            entry.heartbeat_age_s = max(0.0, now - seen.at)
            entry.metrics = hb.metrics or replicas.metrics_of(ing.topology, shard)
            entry.heartbeats = seen.count
            entry.restarts = seen.restarts
            for key, value in hb.stats.items():
                entry.stats[key] = value
        return response


def add_to_server(ingress: Ingress, server: Any) -> str:
    """Register the admin service on a gRPC server; return its full name (for reflection)."""
    apb_grpc.add_PipelineAdminServicer_to_server(AdminServicer(ingress), server)
    return SERVICE_NAME
