"""``pipeline ingress DIR``: the KServe v2 gRPC server in front of the shard workers.

One ``grpc.aio`` server and one asyncio loop (no thread pool to starve)
serve ``inference.GRPCInferenceService`` (KServe v2 plus Triton's
``ModelConfig`` and ``ModelStatistics``), ``grpc.health.v1`` and server
reflection. A ``ModelInfer`` call is validated against the topology
(:mod:`pipeline.serving.kserve`) before anything is queued, then sent as one
``REQUEST`` per entry shard over non-blocking ``PUSH`` sockets; a background
task reads the results ``PULL`` socket (``RESULT``, ``ERROR``, ``HEARTBEAT``)
and resolves the pending table (:mod:`pipeline.serving.pending`), joining the
outputs of several shards.

Status codes: unknown model ``NOT_FOUND``; bad inputs ``INVALID_ARGUMENT``; a
shard not up ``UNAVAILABLE`` at once (and for requests in flight when a shard
goes down or restarts); more than ``max_inflight`` requests
``RESOURCE_EXHAUSTED``; no answer by the deadline ``DEADLINE_EXCEEDED``; a
shard's ``ERROR`` message its own ``error.code`` with its message.

Timings: when a request carries the parameter ``timing`` (``bool_param``
true), the response ``parameters`` hold

- ``timing``: a ``string_param`` with JSON
  ``{"spans": [{"name", "start_ns", "end_ns", "duration_ns"}, ...], "total_ns": N}``,
  the spans of every result part (shards, hops, queues) followed by the
  ingress's own ``ingress.decode``, ``ingress.send``, ``ingress.wait`` and
  ``ingress.encode``;
- ``timing.<span name>_ns``: an ``int64_param`` per span name, the summed
  duration in nanoseconds (e.g. ``timing.shard1.compute_ns``).

Config is read once into :class:`IngressConfig`: command line over
``PIPELINE_INGRESS_*`` environment over the topology over defaults.

Shutdown (SIGTERM/SIGINT): health NOT_SERVING, stop accepting calls, let the
calls in flight finish within ``drain_s`` (3 s), end what is left with
UNAVAILABLE, close the sockets with linger 0, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import os
import random
import signal
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import zmq
import zmq.asyncio
from zmq.utils import monitor as zmq_monitor
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from structlog.contextvars import bound_contextvars

from pipeline import colocation
from pipeline import replicas
from pipeline import topology as topo
from pipeline.errors import (
    ComputeError,
    DeadlineExceeded,
    PipelineError,
    ResourceExhausted,
    Unavailable,
    UsageError,
)
from pipeline.log import configure, get_logger
from pipeline.pb import envelope_pb2 as pb
from pipeline.pb import grpc_service_pb2 as kpb
from pipeline.pb import grpc_service_pb2_grpc as kpb_grpc
from pipeline.serving import admin, kserve, parse_guard
from pipeline.serving import metrics as prom
from pipeline.serving.pending import PendingTable
from pipeline.security import tls
from pipeline.wire import codec, security, sockets
from pipeline.wire import deadline as dl

log = get_logger("pipeline.ingress")

SERVICE_NAME = "inference.GRPCInferenceService"
#: health service that is SERVING while this process serves gRPC (whatever the shards' state), NOT_SERVING
#: from the start of a graceful shutdown: what a supervisor's readiness and liveness probes ask
#: (``""`` and SERVICE_NAME say whether the whole pipeline is ready).
PROCESS_SERVICE = "pipeline.ingress"
#: ``/live`` on the metrics port fails when the event loop has not run the liveness task for this long.
LIVE_STALL_S = 10.0
SERVER_NAME = "keras-pipeline"
PLATFORM = "keras_pipeline"
EXTENSIONS = ("model_configuration", "statistics", "parameters")
MIB = 1 << 20

_STATUS_BY_CODE: dict[int, grpc.StatusCode] = {s.value[0]: s for s in grpc.StatusCode}


class ShardLost(Unavailable):
    """A request lost because a shard died, restarted or stopped while holding it: the one kind retried."""


# -------------------------------------------------------------------- config
@dataclass(frozen=True)
class IngressConfig:
    """Every knob of the ingress, resolved once at start.

    Environment names: ``PIPELINE_INGRESS_ADDRESS``, ``_BIND``, ``_TIMEOUT``,
    ``_MAX_INFLIGHT``, ``_MAX_MESSAGE_BYTES``, ``_MAX_BATCH_SIZE``, ``_DRAIN`` (each
    under the ``PIPELINE_INGRESS`` prefix), and ``PIPELINE_HEARTBEAT_INTERVAL_S``,
    shared with the workers so both sides agree on the interval.
    """

    address: str = topo.DEFAULT_GRPC_ADDRESS  # gRPC host:port (port 0: any free port)
    results_bind: str = ""  # ZeroMQ endpoint the results PULL binds ("" -> the topology's)
    timeout_s: float = 30.0  # deadline of a request whose client sets none
    max_inflight: int = 1024  # requests in flight before RESOURCE_EXHAUSTED
    max_message_bytes: int = 64 * MIB  # gRPC send and receive limit
    max_batch_size: int = 1024  # largest first axis accepted (and advertised in ModelConfig)
    heartbeat_interval_s: float = 0.5  # the workers' heartbeat period (topology)
    down_after_beats: float = 3.0  # a shard is down after this many silent intervals
    drain_s: float = 3.0  # time the calls in flight get to finish at shutdown
    send_hwm: int = sockets.DEFAULT_BOUNDS.send_hwm  # messages queued per entry shard
    send_wait_s: float = 0.1  # a full or reconnecting PUSH gets this long before the request fails
    recv_hwm: int = 4096  # messages queued on the results socket
    retries: int = 1  # resends of a request lost to a shard that died (after it is up again, within the deadline)
    record: str = ""  # replay file to record served requests into ("" -> no recording)
    record_max_count: int = 1000  # requests recorded before the recording stops
    record_max_bytes: int = 256 * MIB  # tensor bytes recorded before the recording stops
    keys_dir: str = ""  # CURVE secret keys (PIPELINE_KEYS_DIR; "" -> DIR/keys), read with security: curve
    tls_cert: str = ""  # PEM certificate chain: serve gRPC over TLS ("" -> plaintext)
    tls_key: str = ""  # PEM private key of tls_cert
    tls_client_ca: str = ""  # PEM CA bundle: require client certificates signed by it (mutual TLS)
    metrics: str = ""  # Prometheus endpoint host:port ("" or none: off)

    @property
    def down_after_s(self) -> float:
        return self.down_after_beats * self.heartbeat_interval_s

    @classmethod
    def resolve(
        cls, topology: topo.Topology, args: argparse.Namespace | None = None, env: Mapping[str, str] | None = None
    ) -> IngressConfig:
        """Command line (``args``, ``None`` values unset) over ``PIPELINE_INGRESS_*`` over topology over defaults."""
        env = os.environ if env is None else env
        given = vars(args) if args is not None else {}

        def pick(name: str, cast: Any, topology_value: Any, default: Any, env_name: str = "") -> Any:
            value = given.get(name)
            if value is not None:
                return cast(value)
            env_name = env_name or f"PIPELINE_INGRESS_{name.upper()}"
            if env.get(env_name):
                try:
                    return cast(env[env_name])
                except ValueError:
                    raise UsageError(f"{env_name}={env[env_name]!r} is not a valid {cast.__name__}") from None
            return topology_value if topology_value not in (None, "") else default

        d = cls()
        config = cls(
            address=pick("address", str, topology.ingress.grpc, d.address),
            results_bind=pick("bind", str, topology.ingress.bind, topology.ingress.results),
            timeout_s=pick("timeout", float, None, d.timeout_s),
            max_inflight=pick("max_inflight", int, None, d.max_inflight),
            max_message_bytes=pick("max_message_bytes", int, None, d.max_message_bytes),
            max_batch_size=pick("max_batch_size", int, None, d.max_batch_size),
            heartbeat_interval_s=pick(
                "heartbeat_interval_s",
                float,
                topology.heartbeat_interval_s,
                d.heartbeat_interval_s,
                env_name="PIPELINE_HEARTBEAT_INTERVAL_S",  # shared with the workers, so both sides agree
            ),
            drain_s=pick("drain", float, None, d.drain_s),
            retries=pick("retries", int, None, d.retries),
            record=pick("record", str, None, d.record),
            record_max_count=pick("record_max_count", int, None, d.record_max_count),
            record_max_bytes=pick("record_max_bytes", int, None, d.record_max_bytes),
            keys_dir=pick("keys_dir", str, None, d.keys_dir, env_name=security.ENV_KEYS_DIR),
            tls_cert=pick("tls_cert", str, None, d.tls_cert),
            tls_key=pick("tls_key", str, None, d.tls_key),
            tls_client_ca=pick("tls_client_ca", str, None, d.tls_client_ca),
            metrics=pick("metrics", str, topology.ingress.metrics, d.metrics),
        )
        prom.parse_address(config.metrics)  # a bad address fails here, at start
        if config.retries < 0:
            raise UsageError(f"ingress retries must be >= 0, received {config.retries}")
        for name in ("record_max_count", "record_max_bytes", "timeout_s", "max_inflight", "max_message_bytes", "max_batch_size", "heartbeat_interval_s"):
            if getattr(config, name) <= 0:
                raise UsageError(f"ingress {name} must be > 0, received {getattr(config, name)}")
        return config


# --------------------------------------------------------------------- stats
@dataclass
class _Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += max(0, ns)

    def pb(self) -> kpb.StatisticDuration:
        return kpb.StatisticDuration(count=self.count, ns=self.ns)


@dataclass
class _BatchStats:
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)


@dataclass
class Stats:
    """Cumulative counts and times of the served model, reported through ``ModelStatistics``.

    Triton's fields, measured in the pipeline: ``success``/``fail`` the
    end-to-end time of each request; ``queue`` the sum of the shards'
    ``.queue`` spans (join and batching wait); ``compute_infer`` the sum of the
    shards' ``.compute`` spans; ``compute_input`` the ingress decoding and
    sending the inputs; ``compute_output`` the ingress encoding the response.
    Hops and the ingress's wait are what perf_analyzer shows as overhead.
    """

    success: _Duration = field(default_factory=_Duration)
    fail: _Duration = field(default_factory=_Duration)
    queue: _Duration = field(default_factory=_Duration)
    compute_input: _Duration = field(default_factory=_Duration)
    compute_infer: _Duration = field(default_factory=_Duration)
    compute_output: _Duration = field(default_factory=_Duration)
    inference_count: int = 0
    execution_count: int = 0
    last_inference_ms: int = 0
    batch: dict[int, _BatchStats] = field(default_factory=dict)
    codes: Counter[str] = field(default_factory=Counter)

    def record_success(
        self, duration_ns: int, batch_size: int, spans: list[pb.Span], *, input_ns: int = 0, output_ns: int = 0
    ) -> None:
        self.success.add(duration_ns)
        self.inference_count += batch_size
        self.execution_count += 1
        self.last_inference_ms = time.time_ns() // 1_000_000
        queue = sum(s.end_ns - s.start_ns for s in spans if s.name.endswith(".queue"))
        compute = sum(s.end_ns - s.start_ns for s in spans if s.name.endswith(".compute"))
        by_size = self.batch.setdefault(batch_size, _BatchStats())
        self.queue.add(queue)
        for total, one, ns in (
            (self.compute_input, by_size.compute_input, input_ns),
            (self.compute_infer, by_size.compute_infer, compute),
            (self.compute_output, by_size.compute_output, output_ns),
        ):
            total.add(ns)
            one.add(ns)
        self.codes["OK"] += 1

    def record_failure(self, duration_ns: int, code: grpc.StatusCode) -> None:
        self.fail.add(duration_ns)
        self.last_inference_ms = time.time_ns() // 1_000_000
        self.codes[code.name] += 1

    def pb(self, name: str) -> kpb.ModelStatistics:
        stats = kpb.ModelStatistics(
            name=name,
            version=kserve.MODEL_VERSION,
            last_inference=self.last_inference_ms,
            inference_count=self.inference_count,
            execution_count=self.execution_count,
        )
        s = stats.inference_stats
        for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output"):
            getattr(s, key).CopyFrom(getattr(self, key).pb())
        for size in sorted(self.batch):
            b = self.batch[size]
            stats.batch_stats.add(
                batch_size=size,
                compute_input=b.compute_input.pb(),
                compute_infer=b.compute_infer.pb(),
                compute_output=b.compute_output.pb(),
            )
        return stats


# ------------------------------------------------------------------- ingress
#: at a stop, requests still in flight this long before the drain's grace ends get UNAVAILABLE (seconds).
END_BEFORE_GRACE_S = 0.1
#: a call cancelled this close to its deadline (or later) ended because the deadline passed.
CANCEL_AT_DEADLINE_SLACK_NS = 2_000_000


def cancelled_as(time_remaining: float | None, started_ns: int, now_ns: int) -> grpc.StatusCode:
    """The code a cancelled call ended with: DEADLINE_EXCEEDED when the caller's deadline had passed, else CANCELLED.

    gRPC cancels the handler when the caller's deadline passes, and that races the ingress's own timer for the
    same deadline: on a loaded machine the cancellation can come first. The metrics and statistics then still
    count what happened, a deadline exceeded, not a caller that gave up. ``started_ns`` and ``now_ns`` are
    monotonic (``pipeline.wire.deadline.now_ns``); ``time_remaining`` is gRPC's at ``started_ns`` (None: none).
    """
    if time_remaining is not None and now_ns >= started_ns + round(time_remaining * 1e9) - CANCEL_AT_DEADLINE_SLACK_NS:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return grpc.StatusCode.CANCELLED


class Ingress:
    """The ingress's state: sockets, pending table, liveness, stats, and the gRPC server."""

    def __init__(self, topology: topo.Topology, config: IngressConfig) -> None:
        self.topology = topology
        self.config = config
        self.routes = topology.entry_routes()
        self.output_specs = {s.name: s for s in topology.outputs}
        self.table = PendingTable(config.max_inflight)
        # per replica (shard2@1; a shard with one replica keeps its name), a shard up while one replica is
        self.liveness = replicas.liveness(topology, config.down_after_s)
        self.processes = admin.ProcessTable(list(replicas.replica_processes(topology)))  # latest heartbeats, for the admin RPC
        #: entry shard -> its replicas' process names and the router that picks one per request (pipeline.replicas)
        self._replicas = {s: replicas.process_names(topology.shard(s)) for s in self.routes}
        self._routers = {s: replicas.Router(names) for s, names in self._replicas.items()}
        #: every replicated shard's router: the ingress picks ids whose replicas are up and less loaded
        self._replicated = [replicas.Router(replicas.process_names(s)) for s in topology.shards if s.extra_replicas]
        self._sent_since_beat: collections.Counter[str] = collections.Counter()  # requests routed since its heartbeat
        #: shards whose replicas are found by DNS: the ingress learns them from their heartbeats and picks one per
        #: request, written into the envelope's routes (pipeline.discovery)
        self._discovered = [s.name for s in topology.shards if s.discovered]
        self.retried = 0
        self.recorder: Any = None  # a pipeline.soak.replay.ReplayRecorder with --record
        self.stats = Stats()
        self.metrics = prom.IngressMetrics(self)
        self.drops = codec.DropCounter()
        self.port = 0
        self.results_endpoint = ""
        self.closing = False
        self._ids = itertools.count(random.getrandbits(48) + 1)
        self._ctx: zmq.asyncio.Context | None = None
        self._pulls: list[Any] = []  # results and heartbeats: TCP from other processes, inproc from its own
        self._push: dict[str, Any] = {}
        self.links: security.Links | None = None  # CURVE keys and ZAP allow-list (security: curve)
        self._monitors: dict[str, Any] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._server: grpc.aio.Server | None = None
        self._health = health.aio.HealthServicer()
        self._serving: bool | None = None
        self._stopped = asyncio.Event()
        self._loop_turned = time.monotonic()  # the liveness task's last run, for ``/live``

    # ------------------------------------------------------------- lifecycle
    async def start(self) -> int:
        """Bind the sockets and the gRPC port, start the background tasks; return the bound port."""
        cfg = self.config
        credentials = tls.server_credentials(cfg.tls_cert, cfg.tls_key, cfg.tls_client_ca)
        self._ctx = zmq.asyncio.Context(zmq.Context.instance())
        self.links = security.open_links(self._ctx, self.topology, topo.INGRESS, cfg.keys_dir or None, self.drops)
        bounds = sockets.SocketBounds(send_hwm=cfg.send_hwm, recv_hwm=cfg.recv_hwm)
        binds = colocation.ingress_binds(self.topology, cfg.results_bind)
        try:
            if binds.tcp:
                self._pulls.append(sockets.pull(self._ctx, binds.tcp, bounds, configure=self.links.server))
            if binds.inproc:  # shards of the process that serves the ingress: never leaves it, no CURVE
                self._pulls.append(sockets.pull(self._ctx, binds.inproc, bounds))
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise UsageError(f"cannot bind the results endpoint {binds.tcp or binds.inproc!r}: {exc}") from None
        self.results_endpoint = ", ".join(p.getsockopt(zmq.LAST_ENDPOINT).decode() for p in self._pulls)
        for shard in self.routes:
            if self.topology.shard(shard).discovered:
                continue  # sockets to its replicas open as their heartbeats arrive (_add_discovered)
            for name, replica in zip(self._replicas[shard], self.topology.shard(shard).replicas):
                self._open_monitored(shard, name, replica.endpoint)

        server = grpc.aio.server(
            options=[
                ("grpc.max_send_message_length", cfg.max_message_bytes),
                ("grpc.max_receive_message_length", cfg.max_message_bytes),
                ("grpc.so_reuseport", 0),
            ]
        )
        parse_guard.add_guarded(
            kpb_grpc.add_GRPCInferenceServiceServicer_to_server,
            InferenceServicer(self),
            server,
            parsers={"ModelInfer": kserve.parse_infer_request},  # the tensors stay in the received bytes
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        admin_service = admin.add_to_server(self, server)
        reflection.enable_server_reflection(
            (
                kpb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
                admin_service,
                health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
                reflection.SERVICE_NAME,
            ),
            server,
        )
        try:
            port = tls.add_port(server, cfg.address, credentials)
        except RuntimeError as exc:
            port = 0
            reason = str(exc)
        else:
            reason = "the port is taken or the address is not valid"
        if not port:
            self._close_sockets()
            raise UsageError(f"cannot bind the gRPC address {cfg.address!r}: {reason}")
        self._server = server
        self.port = port
        if cfg.record:
            from pipeline.soak.replay import ReplayRecorder

            self.recorder = ReplayRecorder(
                cfg.record,
                self.topology.name,
                [(t.name, t.dtype) for t in self.topology.inputs],
                [(t.name, t.dtype) for t in self.topology.outputs],
                max_count=cfg.record_max_count,
                max_bytes=cfg.record_max_bytes,
            )
        self.metrics.start(cfg.metrics)
        await self._set_serving(False)
        await self._health.set(PROCESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        await server.start()
        self._tasks = [
            *(asyncio.create_task(self._read_results(p), name=f"ingress-results-{i}") for i, p in enumerate(self._pulls)),
            asyncio.create_task(self._watch_liveness(), name="ingress-liveness"),
            *(asyncio.create_task(self._watch_connection(s), name=f"ingress-monitor-{s}") for s in self._monitors),
        ]
        log.info(
            "ingress_started",
            model=self.topology.name,
            address=cfg.address,
            port=port,
            results=self.results_endpoint,
            shards=[s.name for s in self.topology.shards],
        )
        return port

    def _open_monitored(self, shard: str, name: str, endpoint: str) -> None:
        """The PUSH socket to replica ``name`` of ``shard``, down until its monitor reports a handshake."""
        assert self._ctx is not None and self.links is not None
        bounds = sockets.SocketBounds(send_hwm=self.config.send_hwm, recv_hwm=self.config.recv_hwm)
        if colocation.same_process(self.topology, topo.INGRESS, name):
            # a shard of the process that serves the ingress: an inproc link has no handshake to watch and no
            # CURVE; it is connected while the process runs, and the shard's heartbeats say when it is up
            self.liveness.set_connected(name, True)
            self._push[name] = sockets.push(self._ctx, colocation.inproc_endpoint(name), bounds)
            return
        secure = self.links.client(shard)

        def configure(sock: zmq.Socket) -> None:
            # the monitor is attached before the factory connects, so the handshake with a shard that is
            # already up cannot happen before anyone listens for it
            if secure is not None:
                secure(sock)
            self._monitors[name] = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)

        self.liveness.set_connected(name, False)
        self._push[name] = sockets.push(self._ctx, endpoint, bounds, configure=configure)

    def _add_discovered(self, shard: str, name: str, address: str) -> None:
        """A replica found by its heartbeat (``shard@address``): follow its liveness; for an entry shard, connect to
        it (its socket's monitor says when it is reachable, as for a listed replica)."""
        self.liveness.add(shard, name)
        if name not in self.processes.shards:
            self.processes.shards.append(name)
        if shard not in self.routes or name in self._push or self._ctx is None or self.links is None:
            return
        from pipeline import discovery

        endpoint = discovery.endpoint_at(self.topology.shard(shard).endpoint, address)
        self._open_monitored(shard, name, endpoint)
        self._tasks.append(asyncio.get_running_loop().create_task(self._watch_connection(name), name=f"ingress-monitor-{name}"))
        log.info("replica_discovered", shard=shard, replica=name, endpoint=endpoint)

    def _forget_discovered(self, now: float) -> None:
        """Drop replicas found by DNS that have not been heard from for FORGET_AFTER_S (a replaced pod's address)."""
        from pipeline import discovery

        for shard in self._discovered:
            for name in list(self.liveness.groups.get(shard, [])):
                if self.liveness.down_since(name, now) < discovery.FORGET_AFTER_S:
                    continue
                self.liveness.forget(name)
                if name in self.processes.shards:
                    self.processes.shards.remove(name)
                monitor = self._monitors.pop(name, None)
                push = self._push.pop(name, None)
                if push is not None:
                    if monitor is not None:
                        push.disable_monitor()
                        monitor.close(linger=0)
                    push.close(linger=0)
                for task in [t for t in self._tasks if t.get_name() == f"ingress-monitor-{name}"]:
                    task.cancel()
                    self._tasks.remove(task)
                log.info("replica_forgotten", shard=shard, replica=name)

    def _choose_routes(self) -> dict[str, str]:
        """For every shard found by DNS, the replica this request goes to: of those up, and reached by every
        producer of the shard (their heartbeats say so), the least loaded; its address, by shard."""
        from pipeline import discovery

        routes: dict[str, str] = {}
        for shard in self._discovered:
            up = [n for n in self.liveness.groups.get(shard, []) if self.liveness.is_up(n)]
            producers = [p for p in self.topology.producers(shard) if p != topo.INGRESS]
            stats = {
                name: seen.heartbeat.stats
                for p in producers
                for name in (self.liveness.groups.get(p) or [p])
                if self.liveness.is_up(name) and (seen := self.processes.get(name)) is not None
            }
            reached = [n for n in up if discovery.reachable(stats, n)] or up
            if not reached:
                raise ShardLost(f"shard {shard!r}: none of its replicas is up ({self.liveness.replicas_not_up()})")
            name = min(reached, key=lambda n: (self._replica_load(n), random.random()))
            self._sent_since_beat[name] += 1
            routes[shard] = name.partition(replicas.SEPARATOR)[2]
        return routes

    async def stop(self, grace: float | None = None) -> None:
        """Shut down in order: NOT_SERVING, stop accepting, drain within ``grace``, end the rest, close."""
        if self.closing:
            await self._stopped.wait()
            return
        self.closing = True
        grace = self.config.drain_s if grace is None else grace
        await self._health.enter_graceful_shutdown()
        log.info("ingress_stopping", in_flight=len(self.table), grace_s=grace)
        def shut_down() -> Unavailable:
            return Unavailable("the ingress shut down before the request completed")

        left = 0
        if self._server is not None:
            stopping = asyncio.ensure_future(self._server.stop(grace))
            # gRPC cancels what is still running when the grace ends (the caller sees CANCELLED): end it just
            # before, with UNAVAILABLE, which tells the caller to retry elsewhere.
            await asyncio.wait({stopping}, timeout=max(0.0, grace - END_BEFORE_GRACE_S))
            left = self.table.fail_all(shut_down)
            await stopping
        left += self.table.fail_all(shut_down)  # any that reached the table after the pass above
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        self._close_sockets()
        self.metrics.close()
        if self.recorder is not None:
            self.recorder.close(timeout_s=2.0)  # within honcho's 5 s budget
        log.info("ingress_stopped", ended_unfinished=left, stats=dict(self.stats.codes), dropped=self.drops.snapshot())
        self._stopped.set()

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def _close_sockets(self) -> None:
        for shard, monitor in self._monitors.items():
            self._push[shard].disable_monitor()
            monitor.close(linger=0)
        for sock in [*self._pulls, *self._push.values()]:
            if sock is not None:
                sock.close(linger=0)
        self._pulls = []
        self._push = {}
        self._monitors = {}
        if self.links is not None:
            self.links.close()
            self.links = None

    # ------------------------------------------------------------- readiness
    def ready(self) -> bool:
        return not self.closing and self.liveness.all_up()

    def probe_ready(self) -> tuple[bool, str]:
        """``/ready`` on the metrics port: this process serves gRPC (the pipeline may still be starting)."""
        if self.closing:
            return False, "the ingress is stopping"
        if self._server is None:
            return False, "the ingress is starting"
        return True, "the ingress serves gRPC" + ("" if self.ready() else f"; shards not up: {self.liveness.not_up()}")

    def probe_live(self) -> tuple[bool, str]:
        """``/live`` on the metrics port: the event loop runs."""
        idle = time.monotonic() - self._loop_turned
        if idle > LIVE_STALL_S:
            return False, f"the ingress's event loop has not run for {idle:.1f} s"
        return True, "the ingress is live"

    async def _set_serving(self, serving: bool) -> None:
        if serving == self._serving or self.closing:
            return
        self._serving = serving
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self._health.set(service, status)
        log.info("health_changed", serving=serving, not_up=self.liveness.not_up())

    # ----------------------------------------------------------------- infer
    async def infer(
        self, request: kpb.ModelInferRequest, time_remaining: float | None, raw: Sequence[memoryview] | None = None
    ) -> kpb.ModelInferResponse:
        """Run one request through the pipeline; raise a :class:`PipelineError` for every failure.

        ``raw``: its ``raw_input_contents``, when they were kept apart from it (:func:`kserve.parse_infer_request`).
        """
        t0 = time.time_ns()  # wall clock, for spans and durations
        started = dl.now_ns()  # monotonic, for the deadline
        rid = self._new_id()
        code = grpc.StatusCode.INTERNAL  # until it ends otherwise (for the metrics)
        self.metrics.request_started(request.model_name)
        with bound_contextvars(request_id=rid):
            try:
                decoded = kserve.decode_request(self.topology, request, self.config.max_batch_size, raw)
                response = await self._run(rid, request, decoded, t0, time_remaining, started)
                code = grpc.StatusCode.OK
                return response
            except PipelineError as exc:
                code = exc.status
                if request.model_name == self.topology.name:
                    self.stats.record_failure(time.time_ns() - t0, exc.status)
                log.info("request_failed", code=exc.status.name, detail=exc.message)
                raise
            except asyncio.CancelledError:
                code = cancelled_as(time_remaining, started, dl.now_ns())
                if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                    if request.model_name == self.topology.name:
                        self.stats.record_failure(time.time_ns() - t0, code)
                    log.info("request_failed", code=code.name, detail="the caller's deadline passed")
                else:
                    log.debug("request_cancelled")
                raise
            finally:
                self.metrics.request_ended(request.model_name, code, time.time_ns() - t0)

    async def _run(
        self,
        rid: int,
        request: kpb.ModelInferRequest,
        decoded: kserve.DecodedRequest,
        t0: int,
        time_remaining: float | None,
        started: int,
    ) -> kpb.ModelInferResponse:
        if self.closing:
            raise Unavailable("the ingress is shutting down")
        not_up = self.liveness.not_up()
        if not_up:
            detail = ", ".join(f"{name!r} ({why})" for name, why in not_up.items())
            raise Unavailable(f"expected every shard up; not up: {detail}")
        if self.table.full:
            raise ResourceExhausted(
                f"expected at most {self.table.capacity} requests in flight (max_inflight), received one more"
            )
        timeout_s = self.config.timeout_s if time_remaining is None else max(0.0, time_remaining)
        # on this host's monotonic clock; each message carries what is left of it (pipeline.wire.deadline)
        deadline_ns = dl.deadline_after(timeout_s, started)
        t_decoded = time.time_ns()
        for attempt in itertools.count():
            try:
                outcome, t_sent = await self._attempt(rid, decoded, deadline_ns, timeout_s)
                break
            except ShardLost as exc:
                if attempt >= self.config.retries or not await self._wait_up(deadline_ns):
                    raise
                self.retried += 1
                rid = self._new_id()  # a fresh id: late parts of the lost attempt are ignored, never mixed in
                log.info("request_retry", attempt=attempt + 1, new_request_id=rid, reason=exc.message)
        t_result = time.time_ns()
        if self.recorder is not None:
            self.recorder.offer(decoded.inputs, outcome.outputs)
        response = kpb.ModelInferResponse(model_name=self.topology.name, model_version=kserve.MODEL_VERSION, id=request.id)
        kserve.encode_outputs(self.topology, outcome.outputs, decoded.requested_outputs, response)
        t_encoded = time.time_ns()
        if decoded.timing:
            spans = [(s.name, s.start_ns, s.end_ns) for s in outcome.spans] + [
                ("ingress.decode", t0, t_decoded),
                ("ingress.send", t_decoded, t_sent),
                ("ingress.wait", t_sent, t_result),
                ("ingress.encode", t_result, t_encoded),
            ]
            _put_timing(response, spans, t_encoded - t0)
        self.stats.record_success(
            t_encoded - t0, decoded.batch_size, outcome.spans, input_ns=t_sent - t0, output_ns=t_encoded - t_result
        )
        log.debug("request_done", batch=decoded.batch_size, ms=round((t_encoded - t0) / 1e6, 3))
        return response

    def _new_id(self) -> int:
        """A fresh request id; with replicated shards, one whose replicas are up and less loaded (pipeline.replicas)."""
        if not self._replicated:
            return next(self._ids)
        rid = replicas.choose_id(lambda: next(self._ids), self._replicated, self.liveness.is_up, self._replica_load)
        for router in self._replicated:
            self._sent_since_beat[router.names[router.order(rid)[0]]] += 1
        return rid

    def _replica_load(self, name: str) -> float:
        """Requests a replica holds by its last heartbeat (queued, computing, waiting for parts) plus those routed
        to it since."""
        seen = self.processes.get(name)
        stats = seen.heartbeat.stats if seen is not None else {}
        held = sum(stats.get(k, 0.0) for k in ("queued", "in_flight", "pending_joins"))
        return held + self._sent_since_beat[name]

    async def _attempt(
        self, rid: int, decoded: kserve.DecodedRequest, deadline_ns: int, timeout_s: float
    ) -> tuple[Any, int]:
        """Send one attempt of a request and wait for its outputs; return them and the time it was sent."""
        future = self.table.add(rid, self.topology.output_names, decoded.batch_size, deadline_ns)
        try:
            await self._send(rid, decoded, deadline_ns)
            t_sent = time.time_ns()
            remaining = (deadline_ns - dl.now_ns()) / 1e9
            try:
                return await asyncio.wait_for(future, timeout=max(0.0, remaining)), t_sent
            except TimeoutError:
                entry = self.table.get(rid)
                waiting = sorted(entry.expected) if entry else []
                raise DeadlineExceeded(
                    f"expected the outputs within the {timeout_s:.3f} s deadline; still waiting for {waiting}"
                ) from None
        finally:
            self.table.discard(rid)

    async def _wait_up(self, deadline_ns: int) -> bool:
        """Wait until every shard is up again; False when the deadline (or shutdown) comes first."""
        period = min(0.05, self.config.heartbeat_interval_s / 4)
        while not self.closing and dl.now_ns() + period * 1e9 < deadline_ns:
            if self.liveness.all_up():
                return True
            await asyncio.sleep(period)
        return False

    async def _send(self, rid: int, decoded: kserve.DecodedRequest, deadline_ns: int) -> None:
        routes = self._choose_routes() if self._discovered else {}
        for shard, names in self.routes.items():
            envelope = pb.Envelope(
                kind=pb.REQUEST,
                request_id=rid,
                model=self.topology.name,
                budget_ns=dl.budget(deadline_ns, dl.now_ns()),
                sender=topo.INGRESS,
                sent_ns=time.time_ns(),
            )
            envelope.routes.update(routes)
            frames = codec.encode(envelope, {n: decoded.inputs[n] for n in names})
            if shard in routes:  # found by DNS: the replica chosen above
                shard = replicas.discovered_name(shard, routes[shard])
            else:  # the id's first rendezvous choice, as every producer after the ingress routes (pipeline.replicas)
                replica_names = self._replicas[shard]
                router = self._routers[shard]
                pick = router.order(rid)[0]
                router.sent[pick] += 1
                shard = replica_names[pick]
            sock = self._push.get(shard)
            if sock is None:
                raise ShardLost(f"shard {shard!r} is not connected")
            try:
                try:
                    await sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    # a queue that is full, or a peer that is reconnecting, gets one bounded wait
                    if not await sock.poll(int(self.config.send_wait_s * 1000), zmq.POLLOUT):
                        raise
                    await sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                if self.liveness.is_up(shard):
                    raise ResourceExhausted(
                        f"shard {shard!r} is saturated: its queue of {self.config.send_hwm} messages is full"
                    ) from None
                raise ShardLost(f"shard {shard!r} is not connected") from None

    # ------------------------------------------------------- background tasks
    async def _read_results(self, pull: Any) -> None:
        while True:
            message = await codec.arecv(pull, self.drops, on_drop=self._on_dropped_result)
            if message is None:
                continue
            try:
                self._handle(message)
            except Exception:  # a bad message must never stop the reader
                log.exception("result_handling_failed", request_id=message.envelope.request_id)

    def _handle(self, message: codec.Message) -> None:
        env = message.envelope
        self.metrics.received(env)
        if env.kind == pb.HEARTBEAT:
            self._on_heartbeat(env)
        elif env.kind == pb.RESULT:
            self._on_result(env, message.tensors)
        elif env.kind == pb.ERROR:
            self._on_error(env)
        else:
            self.drops.inc("unexpected_kind")
            log.debug("message_ignored", reason="unexpected_kind", kind=pb.Kind.Name(env.kind), sender=env.sender)

    def _on_dropped_result(self, exc: PipelineError) -> None:
        """A result part dropped by the decoder: end the request it names now, rather than at its deadline."""
        env = getattr(exc, "envelope", None)
        if env is None or env.kind not in (pb.RESULT, pb.ERROR) or env.model != self.topology.name:
            return
        error = PipelineError(f"{env.sender or 'a shard'} sent a result the ingress could not accept: {exc.message}")
        error.status = exc.status
        self.table.finish(env.request_id, error)

    def _on_heartbeat(self, env: pb.Envelope) -> None:
        shard = env.heartbeat.process or env.sender
        found = replicas.discovered_shard(self.topology, shard) if not self.liveness.knows(shard) else None
        if found is not None:
            from pipeline import discovery

            problem = discovery.admissible(found[1], len(self.liveness.groups.get(found[0], [])), self.topology.shard(found[0]).discovered)
            if problem:
                self.drops.inc("bad_replica")
                log.warning("heartbeat_ignored", reason="bad_replica", process=shard, detail=problem)
                return
            self._add_discovered(found[0], shard, found[1])
        if not self.liveness.knows(shard):
            self.drops.inc("unknown_process")
            log.debug("heartbeat_ignored", reason="unknown_process", process=shard)
            return
        if not self.liveness.admit(shard, env.heartbeat.host, env.heartbeat.pid, env.heartbeat.ready):
            log.debug("heartbeat_standby", shard=shard, host=env.heartbeat.host, pid=env.heartbeat.pid, ready=env.heartbeat.ready)
            return  # another instance (a rolling update's new pod) while the followed one is up
        old_pid = self.liveness.pid_of(shard)
        self._sent_since_beat.pop(shard, None)  # its heartbeat now counts what it holds
        restarted = self.liveness.beat(shard, env.heartbeat.ready, env.heartbeat.pid)
        self.processes.beat(shard, env.heartbeat, restarted)
        if restarted:
            ended = self.table.fail_all(
                lambda: ShardLost(
                    f"shard {shard!r} restarted (pid {old_pid} -> {env.heartbeat.pid}); requests in flight were lost"
                )
            )
            log.warning("shard_restarted", shard=shard, old_pid=old_pid, pid=env.heartbeat.pid, ended=ended)
        self._check_liveness()

    def _on_result(self, env: pb.Envelope, tensors: dict[str, Any]) -> None:
        rid = env.request_id
        entry = self.table.get(rid)
        if entry is None or env.model != self.topology.name:
            self.table.ignored["unknown_request"] += 1
            log.debug("result_ignored", reason="late_or_unknown", request_id=rid, sender=env.sender)
            return
        for name, value in tensors.items():
            spec = self.output_specs.get(name)
            problem = (
                f"{env.sender or 'a shard'} sent {name!r}, which is not a model output {list(self.output_specs)}"
                if spec is None
                else kserve.check_output(spec, value, entry.batch_size, env.sender or "a shard")
            )
            if problem:
                log.warning("bad_result", request_id=rid, detail=problem)
                self.table.finish(rid, ComputeError(problem))
                return
        spans = list(env.spans)
        if env.sent_ns:  # as a worker records the hop of each part it receives
            spans.append(codec.hop_span(env, topo.INGRESS, time.time_ns()))
        reason = self.table.part(rid, tensors, spans)
        if reason:
            log.debug("result_ignored", reason=reason, request_id=rid, sender=env.sender)

    def _on_error(self, env: pb.Envelope) -> None:
        status = _STATUS_BY_CODE.get(env.error.code, grpc.StatusCode.INTERNAL)
        if status == grpc.StatusCode.OK:
            status = grpc.StatusCode.INTERNAL
        origin = env.error.origin or env.sender or "a shard"
        # a shard answers UNAVAILABLE when it stops or cannot reach a consumer that died: retryable
        kind = ShardLost if status == grpc.StatusCode.UNAVAILABLE else PipelineError
        unreachable = replicas.unreachable_in(env.error.message)
        if unreachable is not None:  # a producer could not reach that replica: route around it (pipeline.replicas)
            self.liveness.suspect(unreachable)
        error = kind(f"{origin}: {env.error.message}")
        error.status = status
        if not self.table.finish(env.request_id, error):
            self.table.ignored["unknown_request"] += 1
            log.debug("error_ignored", reason="late_or_unknown", request_id=env.request_id, origin=origin)
        else:
            log.info("shard_error", request_id=env.request_id, origin=origin, code=status.name, detail=env.error.message)

    def _check_liveness(self) -> None:
        down = self.liveness.went_down()
        if down:
            reasons = self.liveness.not_up()
            detail = ", ".join(f"{name!r} ({reasons.get(name, 'down')})" for name in down)
            ended = self.table.fail_all(lambda: ShardLost(f"shard went down: {detail}; requests in flight were lost"))
            log.warning("shard_down", shards=down, reasons=reasons, ended=ended)
        serving = self.liveness.all_up()
        if serving != self._serving and not self.closing:
            asyncio.get_running_loop().create_task(self._set_serving(serving))

    async def _watch_connection(self, shard: str) -> None:
        """Follow the PUSH socket's monitor: a shard is not up while the ingress cannot reach it."""
        monitor = self._monitors[shard]
        while True:
            event = zmq_monitor.parse_monitor_message(await monitor.recv_multipart())
            connected = event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
            self.liveness.set_connected(shard, connected)
            log.debug("shard_connection", shard=shard, connected=connected, endpoint=event.get("endpoint"))
            self._check_liveness()

    async def _watch_liveness(self) -> None:
        period = min(0.1, self.config.heartbeat_interval_s / 2)
        while True:
            self._loop_turned = time.monotonic()
            self._check_liveness()
            if self._discovered:
                self._forget_discovered(self._loop_turned)
            await asyncio.sleep(period)


def _put_timing(response: kpb.ModelInferResponse, spans: list[tuple[str, int, int]], total_ns: int) -> None:
    body = {
        "spans": [{"name": n, "start_ns": s, "end_ns": e, "duration_ns": e - s} for n, s, e in spans],
        "total_ns": total_ns,
    }
    response.parameters["timing"].string_param = json.dumps(body, separators=(",", ":"))
    sums: Counter[str] = Counter()
    for name, start, end in spans:
        sums[name] += end - start
    for name, ns in sums.items():
        response.parameters[f"timing.{name}_ns"].int64_param = ns


# ------------------------------------------------------------------ servicer
class InferenceServicer(kpb_grpc.GRPCInferenceServiceServicer):
    """The gRPC face of :class:`Ingress`: every failure is a :class:`PipelineError` mapped by its status."""

    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress
        self.topology = ingress.topology

    async def ServerLive(self, request: kpb.ServerLiveRequest, context: grpc.aio.ServicerContext) -> kpb.ServerLiveResponse:
        return kpb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: kpb.ServerReadyRequest, context: grpc.aio.ServicerContext) -> kpb.ServerReadyResponse:
        return kpb.ServerReadyResponse(ready=self.ingress.ready())

    async def ModelReady(self, request: kpb.ModelReadyRequest, context: grpc.aio.ServicerContext) -> kpb.ModelReadyResponse:
        return await _guard(context, lambda: kpb.ModelReadyResponse(ready=self._model(request) and self.ingress.ready()))

    async def ServerMetadata(
        self, request: kpb.ServerMetadataRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ServerMetadataResponse:
        return kpb.ServerMetadataResponse(name=SERVER_NAME, version=_version(), extensions=list(EXTENSIONS))

    async def ModelMetadata(
        self, request: kpb.ModelMetadataRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelMetadataResponse:
        # An empty name means "the model served here", so `pipeline infer` works without --model.
        return await _guard(context, lambda: self._model(request, allow_empty=True) and kserve.model_metadata(self.topology, PLATFORM))

    async def ModelConfig(self, request: kpb.ModelConfigRequest, context: grpc.aio.ServicerContext) -> kpb.ModelConfigResponse:
        return await _guard(
            context,
            lambda: self._model(request)
            and kpb.ModelConfigResponse(
                config=kserve.model_config(self.topology, PLATFORM, self.ingress.config.max_batch_size)
            ),
        )

    async def ModelStatistics(
        self, request: kpb.ModelStatisticsRequest, context: grpc.aio.ServicerContext
    ) -> kpb.ModelStatisticsResponse:
        # An empty name asks for every model (Triton's rule), i.e. ours.
        return await _guard(
            context,
            lambda: self._model(request, allow_empty=True)
            and kpb.ModelStatisticsResponse(model_stats=[self.ingress.stats.pb(self.topology.name)]),
        )

    async def ModelInfer(self, received: kserve.ReceivedRequest, context: grpc.aio.ServicerContext) -> kpb.ModelInferResponse:
        try:
            return await self.ingress.infer(received.request, context.time_remaining(), received.raw)
        except PipelineError as exc:
            await context.abort(exc.status, exc.message)
            raise  # unreachable: abort raises
        except Exception as exc:
            log.exception("request_crashed")
            await context.abort(grpc.StatusCode.INTERNAL, f"the ingress failed: {type(exc).__name__}: {exc}")
            raise

    def _model(self, request: Any, allow_empty: bool = False) -> bool:
        if not (allow_empty and request.name == ""):
            kserve.check_model(self.topology, request.name, request.version)
        return True


async def _guard(context: grpc.aio.ServicerContext, build: Any) -> Any:
    try:
        return build()
    except PipelineError as exc:
        await context.abort(exc.status, exc.message)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("keras-pipeline")
    except Exception:
        return "0"


# ------------------------------------------------------------------- factory
async def create_server(topology: topo.Topology, config: IngressConfig) -> tuple[Ingress, int]:
    """Build, bind and start an ingress in the running loop; return it and the bound gRPC port."""
    ingress = Ingress(topology, config)
    port = await ingress.start()
    return ingress, port


# ----------------------------------------------------------------------- cli
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="topology directory (holds topology.yaml)")
    parser.add_argument("--address", help="gRPC host:port (default: the topology's ingress.grpc, else 127.0.0.1:8001; port 0 picks one)")
    parser.add_argument("--bind", help="ZeroMQ endpoint to bind for results (default: the topology's ingress.bind)")
    parser.add_argument("--timeout", type=float, help="deadline in seconds for requests that set none (default 30)")
    parser.add_argument("--max-inflight", type=int, help="requests in flight before RESOURCE_EXHAUSTED (default 1024)")
    parser.add_argument("--max-message-bytes", type=int, help="gRPC message size limit, both ways (default 64 MiB)")
    parser.add_argument("--max-batch-size", type=int, help="largest batch accepted and advertised (default 1024)")
    parser.add_argument("--drain", type=float, help="seconds in-flight requests get at shutdown (default 3)")
    parser.add_argument(
        "--retries",
        type=int,
        help="resends of a request lost because a shard died or restarted, once it is up again and within the "
        "request's deadline (default 1; 0: answer UNAVAILABLE at once)",
    )
    parser.add_argument("--record", metavar="FILE", help="record the requests served and their answers into a replay file")
    parser.add_argument("--record-max-count", type=int, help="requests to record before stopping (default 1000)")
    parser.add_argument("--record-max-bytes", type=int, help="tensor bytes to record before stopping (default 256 MiB)")
    parser.add_argument("--keys-dir", help="folder of CURVE secret keys (env PIPELINE_KEYS_DIR; default DIR/keys)")
    parser.add_argument("--tls-cert", metavar="PEM", help="serve gRPC over TLS with this certificate chain (env PIPELINE_INGRESS_TLS_CERT)")
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert (env PIPELINE_INGRESS_TLS_KEY)")
    parser.add_argument(
        "--tls-client-ca",
        metavar="PEM",
        help="require client certificates signed by this CA: mutual TLS (env PIPELINE_INGRESS_TLS_CLIENT_CA)",
    )
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics here (env PIPELINE_INGRESS_METRICS; default: the topology's ingress.metrics; '' or none: off)",
    )


def run(args: argparse.Namespace) -> int:
    configure(process=topo.INGRESS)
    # The ingress reads no shard file, so it can run where the shard files are not.
    topology = topo.load(args.directory, check_files=False)
    host = colocation.ingress_process(topology)
    if host is not None:
        raise UsageError(
            f"the ingress of {topology.name!r} runs in worker process {host.name!r} (ingress: true in its 'processes'); "
            f"start it with: pipeline worker {args.directory} --process {host.name}"
        )
    config = IngressConfig.resolve(topology, args)
    return asyncio.run(_serve(topology, config))


async def _serve(topology: topo.Topology, config: IngressConfig) -> int:
    ingress, _ = await create_server(topology, config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await ingress.stop(config.drain_s)
    return 0


if __name__ == "__main__":  # `python -m pipeline.serving.ingress DIR`, without the other sub-commands
    import sys

    _parser = argparse.ArgumentParser(prog="pipeline ingress")
    add_arguments(_parser)
    try:
        sys.exit(run(_parser.parse_args()))
    except PipelineError as _exc:
        print(f"pipeline ingress: error: {_exc.message}", file=sys.stderr)
        sys.exit(_exc.exit_code)
