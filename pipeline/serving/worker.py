"""``pipeline worker DIR --shard NAME``: one shard worker process.

Two threads, joined by bounded queues (dramatiq style):

- the **network loop** (main thread) owns every ZeroMQ socket. It pulls
  parts, joins them (:mod:`pipeline.serving.join`), checks ready requests
  against the topology's tensor specs, queues them for batching
  (:mod:`pipeline.serving.batcher`), hands one batch at a time to the compute
  thread, sends the outputs to their consumers, and sends errors and
  heartbeats to the ingress. It never blocks on a peer: every send is
  non-blocking, and ``zmq.Again`` (peer absent or full) becomes an
  ``UNAVAILABLE`` error for that request.
- the **compute thread** loads the shard (:mod:`pipeline.serving.runtime`),
  warms it up, then runs batches. TensorFlow releases the GIL while it
  computes, so heartbeats keep flowing during a long batch and during the
  model load (with ``ready=false`` until the warm-up has finished).

The compute thread wakes the network loop through a pipe that the loop polls
beside its socket, so a finished batch is sent at once.

Shutdown on SIGTERM or SIGINT (honcho kills after 5 s):

1. stop intake: answer ``UNAVAILABLE`` for the messages already queued in the
   PULL socket, then close it;
2. answer ``UNAVAILABLE`` for the requests still waiting for parts;
3. drain: finish the batch being computed and the ready requests, within
   ``drain_timeout_s`` (2.5 s by default);
4. answer ``UNAVAILABLE`` for anything left, send a last heartbeat with
   ``ready=false``;
5. close the sockets it receives on at once, and those it sends on with a
   short linger (``sockets.CLOSE_LINGER_MS``) so that those answers and the
   last heartbeat still leave; exit 0.

A missing peer never makes the worker exit: ZeroMQ reconnects by itself.
Only a configuration error (bad topology, shard file that does not load)
does, with the error's exit code.
"""

from __future__ import annotations

import argparse
import itertools
import os
import queue
import signal
import socket
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psutil
import zmq

from pipeline import colocation, discovery
from pipeline import replicas
from pipeline import log as plog
from pipeline import topology as topo
from pipeline.errors import ComputeError, InvalidInput, PipelineError, UsageError
from pipeline.pb import envelope_pb2 as pb
from pipeline.serving import batcher as batching
from pipeline.serving import metrics as prom
from pipeline.serving.join import DEFAULT_MAX_PENDING, DEFAULT_PART_TIMEOUT_S, JoinBuffer, Ready, Status
from pipeline.serving.runtime import (
    DEFAULT_INTER_OP_THREADS,
    DEFAULT_INTRA_OP_THREADS,
    DEFAULT_WARMUP_CALLS,
    check_inputs,
    quiet_tensorflow,
)
from pipeline.wire import codec, security, sockets
from pipeline.wire import deadline as dl

EXIT_OK = 0
#: time to finish held work after SIGTERM; honcho kills at 5 s, and the process needs some to exit.
DEFAULT_DRAIN_TIMEOUT_S = 2.5
#: messages read per loop turn before timers (heartbeat, expiry, dispatch) are looked at.
MAX_RECV_PER_TURN = 256
#: longest poll, so that flags set outside the loop are seen promptly.
MAX_POLL_MS = 100
#: a warm shard reports ready once it reaches its consumers, or after this long without them (seconds).
CONSUMERS_GRACE_S = 10.0
#: how often queued (ready, not yet computed) requests are checked against their deadlines.
SWEEP_INTERVAL_NS = 10_000_000
#: ERRORs waiting for room in the queue toward the ingress (a burst of expiries can pass its high-water
#: mark while the I/O thread is starved); beyond this many, an error is dropped and logged.
MAX_ERROR_BACKLOG = 8192
#: while ERRORs wait for room, the loop tries again this often.
BACKLOG_RETRY_MS = 1
#: compute times kept for the p50/p99 in heartbeats.
STATS_WINDOW = 256
#: ``/live`` fails when the network loop has not turned for this long (it turns at least every MAX_POLL_MS).
LIVE_STALL_S = 10.0
#: wait for the compute thread to end after the drain.
COMPUTE_JOIN_TIMEOUT_S = 0.3
#: shards of one process load and warm up one at a time (Keras's loading and tracing keep global state).
_LOAD_LOCK = threading.Lock()

ENV_PREFIX = "PIPELINE_"

log = plog.get_logger("pipeline.worker")


# ----------------------------------------------------------------- configuration
@dataclass(frozen=True)
class WorkerConfig:
    """Everything a worker reads at start: command line over ``PIPELINE_*`` over the topology over defaults."""

    directory: Path
    shard: str
    bind: str
    threads: int = DEFAULT_INTRA_OP_THREADS
    inter_threads: int = DEFAULT_INTER_OP_THREADS
    unsafe: bool = False
    max_pending: int = DEFAULT_MAX_PENDING
    part_timeout_s: float = DEFAULT_PART_TIMEOUT_S
    max_batch: int = topo.Batching.max_batch
    max_delay_ms: float = topo.Batching.max_delay_ms
    max_queued: int = batching.DEFAULT_MAX_QUEUED
    heartbeat_interval_s: float = 0.5
    drain_timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S
    warmup_calls: int = DEFAULT_WARMUP_CALLS
    log_level: str = "info"
    keys_dir: str = ""  # CURVE secret keys ("" -> DIR/keys); read only with security: curve
    cpus: tuple[int, ...] = ()
    metrics: str = ""  # Prometheus endpoint host:port ("" or none: off)
    replica: int = 0  # which replica of the shard this process is (pipeline.replicas)
    replica_address: str = ""  # this replica's address, for a shard whose replicas are found by DNS (pipeline.discovery)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", type=Path, help="topology directory (holding topology.yaml)")
    parser.add_argument("--shard", metavar="NAME", help="the shard to serve (env PIPELINE_SHARD)")
    parser.add_argument(
        "--replica",
        type=int,
        metavar="K",
        help="serve replica K of the shard (0..N-1 of its 'replicas'; env PIPELINE_REPLICA; default 0)",
    )
    parser.add_argument(
        "--replica-address",
        metavar="ADDRESS",
        help="this replica's own address (the pod IP), for a shard whose replicas are found by DNS (replicas: "
        "{discover: dns}); its process name is SHARD@ADDRESS (env PIPELINE_REPLICA_ADDRESS)",
    )
    parser.add_argument(
        "--process",
        metavar="NAME",
        help="serve every shard of this process of the topology's 'processes' section, one thread each (env PIPELINE_PROCESS)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        metavar="N",
        help=f"TensorFlow intra-op threads (env PIPELINE_THREADS; default {DEFAULT_INTRA_OP_THREADS}, "
        "so several workers on a small machine do not oversubscribe it)",
    )
    parser.add_argument(
        "--inter-threads",
        type=int,
        metavar="N",
        help=f"TensorFlow inter-op threads (env PIPELINE_INTER_THREADS; default {DEFAULT_INTER_OP_THREADS})",
    )
    parser.add_argument(
        "--unsafe",
        action="store_const",
        const=True,
        help="allow shard files that need unsafe deserialization (Python code in the file; env PIPELINE_UNSAFE=1)",
    )
    parser.add_argument("--bind", metavar="ENDPOINT", help="where to bind the PULL socket (env PIPELINE_BIND; default: the topology's)")
    parser.add_argument(
        "--max-pending",
        type=int,
        metavar="N",
        help=f"requests waiting for parts at once (env PIPELINE_MAX_PENDING; default {DEFAULT_MAX_PENDING})",
    )
    parser.add_argument(
        "--part-timeout",
        type=float,
        metavar="S",
        help=f"longest wait for the parts of a request without deadline (env PIPELINE_PART_TIMEOUT_S; default {DEFAULT_PART_TIMEOUT_S})",
    )
    parser.add_argument("--max-batch", type=int, metavar="ROWS", help="rows per compute call (env PIPELINE_MAX_BATCH; default: the topology's)")
    parser.add_argument(
        "--max-delay-ms", type=float, metavar="MS", help="longest wait to fill a batch (env PIPELINE_MAX_DELAY_MS; default: the topology's)"
    )
    parser.add_argument(
        "--max-queued",
        type=int,
        metavar="N",
        help=f"ready requests waiting for compute (env PIPELINE_MAX_QUEUED; default {batching.DEFAULT_MAX_QUEUED})",
    )
    parser.add_argument(
        "--heartbeat-interval", type=float, metavar="S", help="env PIPELINE_HEARTBEAT_INTERVAL_S; default: the topology's"
    )
    parser.add_argument(
        "--drain-timeout",
        type=float,
        metavar="S",
        help=f"time to finish held work on SIGTERM (env PIPELINE_DRAIN_TIMEOUT_S; default {DEFAULT_DRAIN_TIMEOUT_S})",
    )
    parser.add_argument(
        "--warmup-calls", type=int, metavar="N", help=f"env PIPELINE_WARMUP_CALLS; default {DEFAULT_WARMUP_CALLS}"
    )
    parser.add_argument("--log-level", metavar="LEVEL", help="env PIPELINE_LOG_LEVEL; default info")
    parser.add_argument(
        "--keys-dir", metavar="PATH", help="folder of CURVE secret keys (env PIPELINE_KEYS_DIR; default DIR/keys)"
    )
    parser.add_argument(
        "--cpus",
        type=parse_cpus,
        metavar="LIST",
        help="pin the worker to these CPUs, e.g. 0 or 0,1 or 0-3 (env PIPELINE_CPUS; default: no pinning)",
    )
    parser.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        help="serve Prometheus metrics here (env PIPELINE_METRICS; default: the topology's shards[].metrics; '' or none: off)",
    )


def parse_cpus(text: str) -> tuple[int, ...]:
    """``"0,2-3"`` -> ``(0, 2, 3)``; raise :class:`UsageError` naming the bad value."""
    cpus: list[int] = []
    try:
        for part in str(text).split(","):
            part = part.strip()
            if not part:
                continue
            lo, _, hi = part.partition("-")
            cpus.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UsageError(f"--cpus {text!r}: expected a list of CPU numbers like 0 or 0,1 or 0-3") from None
    available = sorted(os.sched_getaffinity(0))
    unknown = [c for c in cpus if c not in available]
    if unknown:
        raise UsageError(f"--cpus {text!r}: CPUs {unknown} are not available; this machine offers {available}")
    return tuple(cpus)


def load_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> tuple[WorkerConfig, topo.Topology]:
    """Read the configuration once; raise :class:`UsageError` naming a bad value."""
    env = os.environ if environ is None else environ
    topology = topo.load(args.directory)
    shard_name = _pick(getattr(args, "shard", None), env, "SHARD", None, str)
    if not shard_name:
        raise UsageError(f"no shard named: pass --shard NAME (one of {[s.name for s in topology.shards]})")
    topology.shard(shard_name)  # a clear error for an unknown shard
    replica = _pick(getattr(args, "replica", None), env, "REPLICA", 0, int)
    topology = replicas.for_replica(topology, shard_name, replica)  # its endpoint, bind and metrics are the replica's
    spec = topology.shard(shard_name)
    replica_address = str(_pick(getattr(args, "replica_address", None), env, "REPLICA_ADDRESS", "", str)).strip()
    if spec.discovered and not replica_address:
        raise UsageError(
            f"shard {shard_name!r} has replicas found by DNS (replicas: {{count: {spec.discovered}, discover: dns}}); "
            "expected --replica-address ADDRESS (this replica's own address, e.g. the pod IP; env PIPELINE_REPLICA_ADDRESS)"
        )
    if replica_address and not spec.discovered:
        raise UsageError(
            f"--replica-address {replica_address!r}: shard {shard_name!r} has no replicas found by DNS; expected "
            "--replica K for a listed replica, or replicas: {count: N, discover: dns} in the topology"
        )

    def pick(attr: str, var: str, fallback: Any, parse: Callable[[str], Any]) -> Any:
        return _pick(getattr(args, attr, None), env, var, fallback, parse)

    config = WorkerConfig(
        directory=Path(args.directory),
        shard=shard_name,
        bind=pick("bind", "BIND", spec.bind, str),
        threads=pick("threads", "THREADS", DEFAULT_INTRA_OP_THREADS, int),
        inter_threads=pick("inter_threads", "INTER_THREADS", DEFAULT_INTER_OP_THREADS, int),
        unsafe=pick("unsafe", "UNSAFE", False, _parse_bool),
        max_pending=pick("max_pending", "MAX_PENDING", DEFAULT_MAX_PENDING, int),
        part_timeout_s=pick("part_timeout", "PART_TIMEOUT_S", DEFAULT_PART_TIMEOUT_S, float),
        max_batch=pick("max_batch", "MAX_BATCH", spec.batching.max_batch, int),
        max_delay_ms=pick("max_delay_ms", "MAX_DELAY_MS", spec.batching.max_delay_ms, float),
        max_queued=pick("max_queued", "MAX_QUEUED", batching.DEFAULT_MAX_QUEUED, int),
        heartbeat_interval_s=pick("heartbeat_interval", "HEARTBEAT_INTERVAL_S", topology.heartbeat_interval_s, float),
        drain_timeout_s=pick("drain_timeout", "DRAIN_TIMEOUT_S", DEFAULT_DRAIN_TIMEOUT_S, float),
        warmup_calls=pick("warmup_calls", "WARMUP_CALLS", DEFAULT_WARMUP_CALLS, int),
        log_level=pick("log_level", "LOG_LEVEL", "info", str),
        keys_dir=pick("keys_dir", "KEYS_DIR", "", str),
        cpus=pick("cpus", "CPUS", (), parse_cpus),
        metrics=pick("metrics", "METRICS", spec.metrics, str),
        replica=replica,
        replica_address=replica_address,
    )
    prom.parse_address(config.metrics)  # a bad address fails here, at start
    checks = {
        "threads": config.threads >= 1,
        "inter_threads": config.inter_threads >= 1,
        "max_pending": config.max_pending >= 1,
        "part_timeout_s": config.part_timeout_s > 0,
        "max_batch": config.max_batch >= 1,
        "max_delay_ms": config.max_delay_ms >= 0,
        "max_queued": config.max_queued >= 1,
        "heartbeat_interval_s": config.heartbeat_interval_s > 0,
        "drain_timeout_s": config.drain_timeout_s >= 0,
        "warmup_calls": config.warmup_calls >= 1,
    }
    bad = [f"{k}={getattr(config, k)!r}" for k, ok in checks.items() if not ok]
    if bad:
        raise UsageError(f"worker settings out of range: {', '.join(bad)}; expected positive values (delays may be 0)")
    return config, topology


def _pick(cli: Any, env: Mapping[str, str], var: str, fallback: Any, parse: Callable[[str], Any]) -> Any:
    if cli is not None:
        return cli
    raw = env.get(ENV_PREFIX + var)
    if raw is None or raw == "":
        return fallback
    try:
        return parse(raw)
    except ValueError:
        raise UsageError(f"{ENV_PREFIX}{var}={raw!r} is not valid; expected a {getattr(parse, '__name__', 'value')}") from None


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


_parse_bool.__name__ = "boolean (1/0, true/false)"


# ----------------------------------------------------------------- compute thread
@dataclass
class _Done:
    """A computed batch: per request, its outputs or its error."""

    requests: list[Ready]
    outputs: list[dict[str, Any] | None]
    errors: list[PipelineError | None]
    start_ns: int  # monotonic (``dl.now_ns``), like ``Ready.first_ns``
    end_ns: int
    rows: int
    traces: int


#: a batch runs in the network loop (not the compute thread) while recent batches took less than this
#: fraction of a heartbeat interval, so heartbeats are never late by more than that.
INLINE_COMPUTE_FRACTION = 0.2


class _ComputeThread(threading.Thread):
    """Loads and warms the shard, then computes one batch at a time."""

    def __init__(self, config: WorkerConfig, topology: topo.Topology, wake: Callable[[], None]) -> None:
        super().__init__(name=f"compute-{config.shard}", daemon=True)
        self.config = config
        self.topology = topology
        self.wake = wake
        self.jobs: queue.Queue[list[Ready] | None] = queue.Queue(maxsize=1)
        self.done: queue.Queue[_Done] = queue.Queue()
        self.ready = threading.Event()
        self.failure: BaseException | None = None
        self.runtime: Any = None
        self.traces = 0  # the runtime's tracing count, as of the last call (read by the network loop)

    def run(self) -> None:
        import structlog

        from pipeline.serving.runtime import ShardRuntime, configure_tensorflow

        structlog.contextvars.bind_contextvars(process=self.config.shard)  # threads do not inherit context
        started = time.monotonic()
        try:
            configure_tensorflow(self.config.threads, self.config.inter_threads)
            with _LOAD_LOCK:
                self.runtime = ShardRuntime.load(self.topology, self.config.shard, unsafe=self.config.unsafe)
                loaded = time.monotonic()
                self.runtime.warm_up(self.config.warmup_calls, self.config.max_batch)
        except BaseException as exc:  # reported by the network loop, which exits with the error's code
            self.failure = exc
            self.wake()
            return
        self.traces = self.runtime.tracing_count
        log.info(
            "worker_ready",
            shard=self.config.shard,
            load_s=round(loaded - started, 3),
            warmup_s=round(time.monotonic() - loaded, 3),
            traces=self.traces,
        )
        self.ready.set()
        self.wake()
        while True:
            job = self.jobs.get()
            if job is None:
                return
            self.done.put(self.run_batch(job))
            self.wake()

    def run_batch(self, requests: list[Ready]) -> _Done:
        """Compute one batch; the network loop calls this itself for short batches (see _inline_ok)."""
        sizes = [batching.rows(r.tensors) for r in requests]
        start = dl.now_ns()  # monotonic, like every time in the loop; spans are made wall-clock when sent
        outputs: list[dict[str, Any] | None]
        errors: list[PipelineError | None]
        try:
            outputs = list(batching.split(self.runtime(batching.concat([r.tensors for r in requests])), sizes))
            errors = [None] * len(requests)
        except Exception as exc:
            if len(requests) == 1:
                outputs, errors = [None], [_as_compute_error(exc)]
            else:  # one bad request must not fail the others: run each alone
                outputs, errors = [], []
                for r in requests:
                    try:
                        outputs.append(self.runtime(r.tensors))
                        errors.append(None)
                    except Exception as one:
                        outputs.append(None)
                        errors.append(_as_compute_error(one))
        self.traces = self.runtime.tracing_count
        return _Done(
            requests=requests,
            outputs=outputs,
            errors=errors,
            start_ns=start,
            end_ns=dl.now_ns(),
            rows=sum(sizes),
            traces=self.traces,
        )


def _as_compute_error(exc: BaseException) -> PipelineError:
    if isinstance(exc, PipelineError):
        return exc
    return ComputeError(f"{type(exc).__name__}: {exc}")


# ----------------------------------------------------------------- network loop
@dataclass
class _Stats:
    messages_in: int = 0
    messages_out: int = 0
    computed: int = 0
    batches: int = 0
    last_batch_size: int = 0
    last_batch_rows: int = 0
    heartbeats_undelivered: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    compute_ms: deque[float] = field(default_factory=lambda: deque(maxlen=STATS_WINDOW))


class Worker:
    """One shard worker: the network loop, its sockets, its join buffer and batcher, and the compute thread."""

    def __init__(self, config: WorkerConfig, topology: topo.Topology, ctx: zmq.Context | None = None) -> None:
        self.config = config
        self.topology = topology
        self.spec = topology.shard(config.shard)
        self.name = config.shard
        #: this replica's process name in heartbeats and metrics (the shard's name when it has one replica)
        self.process_name = (
            replicas.discovered_name(self.name, config.replica_address)
            if config.replica_address
            else replicas.process_name(self.spec, config.replica)
        )
        self.model = topology.name
        # shards first, the ingress last: when a shard cannot be reached, the request fails before
        # the ingress holds part of an answer
        self.routes = dict(sorted(topology.routes(self.name).items(), key=lambda kv: kv[0] == topo.INGRESS))
        self.input_specs = {n: topology.tensors[n] for n in self.spec.inputs}
        #: mask tensor -> its tensor, checked together in every received message (masks across cuts)
        self.masks = {m: of for m, of in topology.masks.items() if m in self.input_specs}
        self.join = JoinBuffer(
            topology.producers(self.name),
            max_pending=config.max_pending,
            part_timeout_s=config.part_timeout_s,
            shard=self.name,
        )
        self.batcher: batching.Batcher[Ready] = batching.Batcher(config.max_batch, config.max_delay_ms, config.max_queued)
        self.drops = codec.DropCounter()
        self.stats = _Stats()
        self.metrics = prom.WorkerMetrics(self)
        self.ctx = ctx or zmq.Context.instance()
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self._process = psutil.Process(self.pid)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.compute = _ComputeThread(config, topology, self._wake)
        self._in_flight: list[Ready] = []
        self._stop_requested = False
        self._consumers_reached = False  # once true, stays (see _reached_consumers)
        self._warm_at: float | None = None
        self._draining = False
        self._draining_deadline_ns = 0
        self._error_backlog: deque[list[Any]] = deque()  # encoded ERRORs, oldest first
        # sender -> (messages of its last computed batch still to come, until when to expect them)
        self._followers: dict[str, tuple[int, int]] = {}
        self._next_heartbeat_ns = 0
        self._next_sweep_ns = 0
        self._last_turn = time.monotonic()  # for the liveness probe
        self._ingress_reachable = True
        self.pull: zmq.Socket | None = None  # the first of ``pulls``
        #: PULL sockets: TCP for producers in other processes, inproc for shards of this one (pipeline.colocation)
        self.pulls: list[zmq.Socket] = []
        self.push: dict[str, zmq.Socket] = {}
        #: consumers with several replicas: one PUSH socket per replica and the router that picks one per request
        self.replica_push: dict[str, list[zmq.Socket]] = {}
        self.routers: dict[str, replicas.Router] = {}
        #: consumers whose replicas are found by DNS: one PUSH socket per resolved address (pipeline.discovery)
        self.peers: dict[str, discovery.Peers] = {}
        self.watcher: discovery.Watcher | None = None
        self._dns_version = -1
        #: a replicated shard binds its TCP endpoint once warm, so producers route to it only when it can compute
        self._bind_when_warm: str | None = None
        #: replicated consumers this shard alone feeds (no join: it may fall back to another replica)
        self._sole_consumer = {c for c in self.routes if c != topo.INGRESS and list(topology.producers(c)) == [self.name]}
        self._target = ""  # the process a message is being sent to (for the error when it cannot be)
        self.links: security.Links | None = None  # CURVE keys and ZAP allow-list (security: curve)
        self.poller = zmq.Poller()

    # -------------------------------------------------------------- lifecycle
    def request_stop(self, *_: Any) -> None:
        """Signal handler: stop intake and drain (a second signal cuts the drain short)."""
        if self._stop_requested:
            self._draining_deadline_ns = 0
        self._stop_requested = True
        self._wake()

    def serve(self) -> int:
        """Run until stopped; return the exit status (raise a :class:`PipelineError` on a config error)."""
        self._open()
        self.metrics.start(self.config.metrics)
        self.compute.start()
        log.info(
            "worker_listening",
            shard=self.name,
            bind=[p.getsockopt(zmq.LAST_ENDPOINT).decode() for p in self.pulls],
            consumers=sorted(self.routes),
        )
        try:
            while not self._stop_requested:
                self._turn()
            self._drain()
            return EXIT_OK
        finally:
            self._close()

    def _open(self) -> None:
        try:
            self.links = security.open_links(self.ctx, self.topology, self.name, self.config.keys_dir or None, self.drops)
            binds = colocation.binds(self.topology, self.name, self.config.bind)
            if binds.tcp and (self.spec.extra_replicas or self.spec.discovered):
                self._bind_when_warm = binds.tcp
            elif binds.tcp:
                self.pulls.append(sockets.pull(self.ctx, binds.tcp, configure=self.links.server))
            if binds.inproc:  # never leaves the process: no CURVE (docs/SECURITY.md)
                self.pulls.append(sockets.pull(self.ctx, binds.inproc))
            self.pull = self.pulls[0] if self.pulls else None
            for consumer in [*self.routes, *([] if topo.INGRESS in self.routes else [topo.INGRESS])]:
                endpoint = colocation.link_endpoint(self.topology, self.name, consumer)
                configure = None if colocation.is_inproc(endpoint) else self.links.client(consumer)
                if consumer != topo.INGRESS and self.topology.shard(consumer).discovered:
                    self.peers[consumer] = discovery.Peers(
                        consumer,
                        self.topology.shard(consumer).endpoint,
                        lambda e, c=_reconnect_fast(configure): sockets.push(self.ctx, e, configure=c),  # type: ignore[misc]
                    )
                    continue
                if consumer != topo.INGRESS and self.topology.shard(consumer).extra_replicas:
                    target = self.topology.shard(consumer)
                    self.replica_push[consumer] = [
                        sockets.push(self.ctx, r.endpoint, configure=_reconnect_fast(configure)) for r in target.replicas
                    ]
                    self.routers[consumer] = replicas.Router(replicas.process_names(target))
                    self.push[consumer] = self.replica_push[consumer][0]
                    continue
                self.push[consumer] = sockets.push(self.ctx, endpoint, configure=configure)
            if self.peers:
                names = [(p.host, p.port) for p in self.peers.values()]
                # resolves at once, then every heartbeat interval, in its own thread (a lookup may block)
                self.watcher = discovery.Watcher(names, self.config.heartbeat_interval_s)
                self.watcher.start()
        except BaseException:
            self._close()
            raise
        for pull in self.pulls:
            self.poller.register(pull, zmq.POLLIN)
        self.poller.register(self._wake_r, zmq.POLLIN)

    def _follow_dns(self) -> None:
        """Apply the DNS watcher's latest views to the discovered consumers' sockets (pipeline.discovery)."""
        if self.watcher is None:
            return
        version, views = self.watcher.latest()
        if version == self._dns_version:
            return
        self._dns_version = version
        for peers in self.peers.values():
            view = views.get((peers.host, peers.port))
            if view is not None:
                peers.apply(view)

    def _close(self) -> None:
        self.metrics.close()
        if self.watcher is not None:
            self.watcher.stop()
        for peers in self.peers.values():
            peers.close()
        for sock in self.pulls:
            if sock is not None and not sock.closed:
                sock.close(linger=0)
        for sock in [*self.push.values(), *(s for socks in self.replica_push.values() for s in socks)]:
            if sock is not None and not sock.closed:
                sock.close(linger=sockets.CLOSE_LINGER_MS)  # the errors and last heartbeat just sent still leave
        if self.links is not None:
            self.links.close()
            self.links = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):  # pipe full (a wake-up is pending anyway) or closed at exit
            pass

    # -------------------------------------------------------------- one turn
    def probe_ready(self) -> tuple[bool, str]:
        """``/ready``: true only once the shard is loaded and warm, and until a stop is requested."""
        if self._stop_requested:
            return False, f"shard {self.name!r} is stopping"
        if self.compute.failure is not None:
            return False, f"shard {self.name!r} failed to load"
        if not self.compute.ready.is_set():
            return False, f"shard {self.name!r} is loading or warming up"
        return True, f"shard {self.name!r} is ready"

    def probe_live(self) -> tuple[bool, str]:
        """``/live``: true while the network loop turns (it wakes at least every MAX_POLL_MS)."""
        idle = time.monotonic() - self._last_turn
        if idle > LIVE_STALL_S:
            return False, f"shard {self.name!r}: the network loop has not turned for {idle:.1f} s"
        return True, f"shard {self.name!r} is live"

    def _bind_if_warm(self) -> None:
        """A replicated shard's TCP endpoint, bound once the shard is loaded and warm (pipeline.replicas)."""
        if self._bind_when_warm is None or not self.compute.ready.is_set() or self._stop_requested:
            return
        assert self.links is not None
        pull = sockets.pull(self.ctx, self._bind_when_warm, configure=self.links.server)
        self._bind_when_warm = None
        self.pulls.insert(0, pull)
        self.pull = pull
        self.poller.register(pull, zmq.POLLIN)
        log.info("replica_listening", shard=self.name, replica=self.config.replica, bind=pull.getsockopt(zmq.LAST_ENDPOINT).decode())

    def _turn(self) -> None:
        self._last_turn = time.monotonic()
        self._bind_if_warm()
        events = dict(self.poller.poll(self._poll_timeout_ms(dl.now_ns())))
        if self._wake_r in events:
            self._drain_wake_pipe()
        if self.compute.failure is not None:
            raise self._load_failure()
        self._flush_errors()
        self._follow_dns()
        self._collect_done()
        for pull in self.pulls:
            if pull in events:
                self._read_messages(pull)
        now = dl.now_ns()
        self._sweep(now)
        self._dispatch(now)
        self._maybe_heartbeat(dl.now_ns())

    def _poll_timeout_ms(self, now: int) -> int:
        wait_ns = [self._next_heartbeat_ns - now, (BACKLOG_RETRY_MS if self._error_backlog else MAX_POLL_MS) * 1_000_000]
        expiry = self.join.next_expiry_ns
        if expiry is not None:
            wait_ns.append(expiry - now)
        if self._compute_idle():
            due = self.batcher.due_in_ns(now)
            if due is not None:
                wait_ns.append(due)
        return max(0, -(-min(wait_ns) // 1_000_000))  # round up, so the timer has passed on waking

    def _inline_ok(self) -> bool:
        """Compute in the network loop while recent batches stay well under a heartbeat interval."""
        recent = self.stats.compute_ms
        if not recent:
            return False
        return max(itertools.islice(reversed(recent), 16)) < INLINE_COMPUTE_FRACTION * self.config.heartbeat_interval_s * 1e3

    def _more_waiting(self, now: int) -> bool:
        """Messages wait on the socket, or an upstream shard said more of its batch is on the way."""
        if any(not p.closed and p.getsockopt(zmq.EVENTS) & zmq.POLLIN for p in self.pulls):
            return True
        return any(n > 0 and until > now for n, until in self._followers.values())

    def _compute_idle(self) -> bool:
        return self.compute.ready.is_set() and not self._in_flight

    def _drain_wake_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _load_failure(self) -> PipelineError:
        exc = self.compute.failure
        log.error("worker_load_failed", shard=self.name, error=str(exc))
        if isinstance(exc, PipelineError):
            return exc
        return UsageError(f"shard {self.name!r} could not be loaded: {type(exc).__name__}: {exc}")

    # -------------------------------------------------------------- intake
    def _read_messages(self, pull: zmq.Socket) -> None:
        for _ in range(MAX_RECV_PER_TURN):
            try:
                message = codec.recv(pull, self.drops, flags=zmq.NOBLOCK, on_drop=self._on_drop, masks=self.masks)
            except zmq.Again:
                return
            self.stats.messages_in += 1
            if message is not None:
                self._on_message(message, dl.now_ns())

    def _on_message(self, message: codec.Message, now: int) -> None:
        """Take one received message; ``now`` is monotonic (``dl.now_ns``), like the deadlines it makes."""
        env = message.envelope
        if env.kind != pb.REQUEST:
            self.drops.inc("unexpected_kind")
            log.warning("message_dropped", reason="unexpected_kind", kind=pb.Kind.Name(env.kind), sender=env.sender)
            return
        rid = env.request_id
        spans = list(env.spans)
        if env.followers or env.sender in self._followers:
            # the latest message from a sender says how many more of its batch follow (bounded wait); a new
            # sender first drops the expired entries, so messages naming ever new senders cannot grow the table
            if env.sender not in self._followers:
                self._followers = {k: v for k, v in self._followers.items() if v[1] > now}
            self._followers[env.sender] = (min(env.followers, self.batcher.max_batch), now + self.batcher.max_delay_ns)
        if env.sent_ns:  # wall clocks of two processes: across hosts, off by their clocks' skew
            received = time.time_ns()
            spans.append(codec.hop_span(env, self.name, received))
            self.metrics.hopped(env.sender, received - env.sent_ns)
        outcome = self.join.add(
            rid,
            message.tensors,
            now_ns=now,
            deadline_ns=dl.deadline(env.budget_ns, now),  # the sender's budget, on this host's monotonic clock
            sender=env.sender,
            model=env.model,
            spans=spans,
            attempt=env.attempt,
            routes=env.routes,
        )
        status = outcome.status
        if status is Status.COMPLETE:
            assert outcome.ready is not None
            self._on_ready(outcome.ready, now)
        elif status is Status.EXPIRED:
            self._fail(rid, env.model, grpc.StatusCode.DEADLINE_EXCEEDED, f"shard {self.name!r}: deadline passed before the request could be computed", spans=spans)
        elif status is Status.REFUSED:
            self._fail(
                rid,
                env.model,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"shard {self.name!r}: {self.join.max_pending} requests already wait for their parts (max_pending)",
                spans=spans,
            )
        elif status is Status.DUPLICATE:
            self.drops.inc("duplicate_part")
        elif status is Status.UNEXPECTED:
            self.drops.inc("unexpected_tensors")

    def _on_drop(self, exc: PipelineError) -> None:
        """A dropped REQUEST part whose envelope names its request: tell the ingress at once, not at the deadline."""
        env = getattr(exc, "envelope", None)
        if env is None or env.kind != pb.REQUEST:
            return
        self.join.discard(env.request_id)
        self._fail(env.request_id, env.model, exc.status, f"shard {self.name!r} dropped a part from {env.sender or '?'!r}: {exc.message}")

    def _on_ready(self, ready: Ready, now: int) -> None:
        try:
            check_inputs(self.name, self.input_specs, ready.tensors)
        except InvalidInput as exc:
            self._fail(ready.request_id, ready.model, exc.status, exc.message, spans=ready.spans)
            return
        queued = self.batcher.put(
            ready, rows=batching.rows(ready.tensors), key=batching.batch_key(ready.tensors), now_ns=now
        )
        if not queued:
            self._fail(
                ready.request_id,
                ready.model,
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"shard {self.name!r}: {self.batcher.max_queued} ready requests already wait for compute (max_queued)",
                spans=ready.spans,
            )

    # -------------------------------------------------------------- timers
    def _sweep(self, now: int) -> None:
        for rid in self.join.expire(now):
            self._fail(rid, self.model, grpc.StatusCode.DEADLINE_EXCEEDED, f"shard {self.name!r}: deadline passed while waiting for the other parts of the request")
        if now >= self._next_sweep_ns:
            self._next_sweep_ns = now + SWEEP_INTERVAL_NS
            for r in self.batcher.drop(lambda r: dl.expired(r.deadline_ns, now)):
                self._fail_deadline(r)

    def _fail_deadline(self, r: Ready) -> None:
        self._fail(
            r.request_id,
            r.model,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            f"shard {self.name!r}: deadline passed before the request was computed",
            spans=r.spans,
        )

    def _dispatch(self, now: int) -> None:
        # Nothing more waiting on the socket: run what is ready now instead of waiting out max_delay,
        # so a lone request pays no batching delay; under load, requests that arrive during a compute
        # form the next batch (max_delay only bounds the wait while messages keep streaming in).
        force = self._draining or not self._more_waiting(now)
        while self._compute_idle():
            batch = self.batcher.take(now, force=force)
            if not batch:
                return
            live = []
            for r in batch:
                if dl.expired(r.deadline_ns, now):
                    self._fail_deadline(r)
                else:
                    live.append(r)
            if live:
                self._in_flight = live
                if self._inline_ok():
                    # Short batches run right here: no hand-off to the compute thread and back (two thread
                    # wake-ups, a few hundred microseconds a shard). Heartbeats wait at most one batch.
                    self.compute.done.put(self.compute.run_batch(live))
                    self._collect_done()
                    continue
                self.compute.jobs.put_nowait(live)
                return

    def _maybe_heartbeat(self, now: int) -> None:
        if now < self._next_heartbeat_ns:
            return
        interval = int(self.config.heartbeat_interval_s * 1e9)
        self._next_heartbeat_ns = max(self._next_heartbeat_ns + interval, now + interval // 2)
        self.send_heartbeat(ready=self.compute.ready.is_set() and not self._stop_requested and self._reached_consumers())

    def _reached_consumers(self) -> bool:
        """Whether this shard has once reached every (single-replica) consumer, or waited long enough for them.

        Warm is not enough to be ready: a CURVE or TCP handshake toward the next shard may still be under way,
        and the first request would then be refused ("cannot reach"). Once every consumer's socket has taken a
        peer (or ``CONSUMERS_GRACE_S`` after warm-up, so a consumer that is down does not hold this shard back:
        its own liveness says so), the shard reports ready for good.
        """
        if self._consumers_reached:
            return True
        if self._warm_at is None:
            self._warm_at = time.monotonic()
        waiting = [
            c for c, sock in self.push.items()
            if c != topo.INGRESS and c not in self.replica_push and c not in self.peers and not sockets.takes_message(sock)
        ]  # fmt: skip
        if not waiting or time.monotonic() - self._warm_at > CONSUMERS_GRACE_S:
            if waiting:
                log.warning("consumers_not_reached", shard=self.name, consumers=waiting, after_s=CONSUMERS_GRACE_S)
            self._consumers_reached = True
        return self._consumers_reached

    def send_heartbeat(self, *, ready: bool) -> None:
        env = pb.Envelope(kind=pb.HEARTBEAT, model=self.model, sender=self.process_name)
        hb = env.heartbeat
        hb.process = self.process_name
        hb.ready = ready
        hb.pid = self.pid
        hb.host = self.host
        hb.metrics = self.metrics.server.address  # the address bound ("" when off)
        try:
            hb.rss_bytes = self._process.memory_info().rss
        except psutil.Error:
            pass
        for key, value in self.stats_snapshot().items():
            hb.stats[key] = float(value)
        env.sent_ns = time.time_ns()
        try:
            codec.send(self.push[topo.INGRESS], env, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.stats.heartbeats_undelivered += 1
            if self._ingress_reachable and not self._stop_requested:  # at a stop, the ingress may be gone first
                log.warning("ingress_unreachable", shard=self.name, endpoint=colocation.link_endpoint(self.topology, self.name, topo.INGRESS))
            self._ingress_reachable = False
            return
        if not self._ingress_reachable:
            log.info("ingress_reachable", shard=self.name)
        self._ingress_reachable = True

    def stats_snapshot(self) -> dict[str, float]:
        """Counters and gauges for heartbeats (names are stable: the ingress shows them)."""
        s = self.stats
        window = sorted(s.compute_ms)
        drops = self.drops.snapshot()
        out: dict[str, float] = {
            "messages_in": s.messages_in,
            "messages_out": s.messages_out,
            "dropped": sum(drops.values()),
            "pending_joins": len(self.join),
            "error_backlog": len(self._error_backlog),
            "queued": len(self.batcher),
            "in_flight": len(self._in_flight),
            "computed": s.computed,
            "batches": s.batches,
            "errors": sum(s.errors.values()),
            "last_batch_size": s.last_batch_size,
            "last_batch_rows": s.last_batch_rows,
            "compute_ms_p50": _percentile(window, 0.50),
            "compute_ms_p99": _percentile(window, 0.99),
            "traces": self.compute.traces,
            "join_expired": self.join.counts["swept"],
            "join_refused": self.join.counts[Status.REFUSED.value],
            "heartbeats_undelivered": s.heartbeats_undelivered,
        }
        out.update({f"dropped.{reason}": n for reason, n in drops.items()})
        out.update({f"errors.{code}": n for code, n in s.errors.items()})
        for router in self.routers.values():  # messages sent to each replica of a replicated consumer
            out.update({f"routed.{name}": n for name, n in zip(router.names, router.sent)})
        for peers in self.peers.values():  # replicas found by DNS: where this worker sent, which it reaches now
            out.update({f"routed.{peers.name(a)}": n for a, n in peers.sent.items()})
            out.update(peers.reach())
        out.update(self.metrics.heartbeat_stats())
        return out

    # -------------------------------------------------------------- results
    def _collect_done(self) -> None:
        while True:
            try:
                done = self.compute.done.get_nowait()
            except queue.Empty:
                return
            self._in_flight = []
            s = self.stats
            s.batches += 1
            s.last_batch_size = len(done.requests)
            s.last_batch_rows = done.rows
            s.compute_ms.append((done.end_ns - done.start_ns) / 1e6)
            self.metrics.computed(done)
            ok = []
            for r, outputs, error in zip(done.requests, done.outputs, done.errors):
                if error is not None or outputs is None:
                    err = error or ComputeError("no outputs")
                    self._fail(r.request_id, r.model, err.status, f"shard {self.name!r}: {err.message}", spans=r.spans)
                    continue
                ok.append((r, outputs))
            for i, (r, outputs) in enumerate(ok):
                s.computed += 1
                self._send_outputs(r, outputs, done.start_ns, done.end_ns, followers=len(ok) - 1 - i)

    def _send_outputs(
        self, r: Ready, outputs: Mapping[str, Any], start_ns: int, end_ns: int, *, followers: int = 0
    ) -> None:
        queued_ns, start_wall, end_wall = dl.wall_ns(r.first_ns), dl.wall_ns(start_ns), dl.wall_ns(end_ns)
        spans = [
            *r.spans,
            pb.Span(name=f"{self.name}.queue", start_ns=queued_ns, end_ns=start_wall),
            pb.Span(name=f"{self.name}.compute", start_ns=start_wall, end_ns=end_wall),
        ]
        for consumer, names in self.routes.items():
            kind = pb.RESULT if consumer == topo.INGRESS else pb.REQUEST
            env = pb.Envelope(
                kind=kind,
                request_id=r.request_id,
                model=r.model or self.model,
                sender=self.name,
                attempt=r.attempt,
                followers=followers if kind == pb.REQUEST else 0,
            )
            env.spans.extend(spans)
            if kind == pb.REQUEST and r.routes:
                env.routes.update(r.routes)  # the ingress's choice of replicas travels with the request
            env.budget_ns = dl.budget(r.deadline_ns, dl.now_ns())  # what is left of it, as the next hop's budget
            env.sent_ns = time.time_ns()
            self._target = consumer
            try:
                codec.send(self._socket_for(consumer, r.request_id, r.routes), env, {n: outputs[n] for n in names}, flags=zmq.NOBLOCK)
            except zmq.Again:
                target = (
                    f"{consumer!r} at {self.topology.endpoint_of(consumer)}"
                    if self._target == consumer
                    else replicas.UNREACHABLE.format(name=self._target).removeprefix("cannot reach ")
                )
                self._fail(
                    r.request_id,
                    r.model,
                    grpc.StatusCode.UNAVAILABLE,
                    f"shard {self.name!r} cannot reach {target}: not connected, or its queue is full",
                    spans=spans,
                )
                return
            self.stats.messages_out += 1

    def _socket_for(self, consumer: str, request_id: int, routes: Mapping[str, str] | None = None) -> zmq.Socket:
        """The PUSH socket toward ``consumer``; for a replicated one, the replica rendezvous hashing picks among those
        whose socket takes a message now (connected, queue not full); for one found by DNS, the replica the ingress
        chose (``routes``); raise ``zmq.Again`` when none does."""
        peers = self.peers.get(consumer)
        if peers is not None:
            return self._peer_socket(peers, consumer, request_id, (routes or {}).get(consumer, ""))
        socks = self.replica_push.get(consumer)
        if socks is None:
            return self.push[consumer]
        router = self.routers[consumer]
        order = router.order(request_id)
        i = order[0]  # the ingress chose the id so that this replica is up (replicas.choose_id)
        if not sockets.takes_message(socks[i]) and consumer in self._sole_consumer:
            # this worker is the shard's only producer: no other part to meet, the next live replica will do
            i = next((k for k in order if sockets.takes_message(socks[k])), i)
        self._target = router.names[i]
        router.sent[i] += 1
        return socks[i]

    def _peer_socket(self, peers: discovery.Peers, consumer: str, request_id: int, routed: str) -> zmq.Socket:
        """The socket to the replica the ingress chose; a sole producer (no join to meet) may take another connected
        one; without a route (a request not routed by an ingress), the id's rendezvous choice over this view."""
        address = routed
        if not address or (consumer in self._sole_consumer and not peers.connected(address)):
            address = peers.pick(request_id, prefer=address) or address
        if not address:
            self._target = replicas.discovered_name(consumer, "?")
            raise zmq.Again()  # nothing resolved, nothing routed: UNAVAILABLE for this request
        self._target = peers.name(address)
        peers.sent[address] = peers.sent.get(address, 0) + 1
        return peers.socket(address)

    def _fail(
        self, request_id: int, model: str, status: grpc.StatusCode, message: str, *, spans: Sequence[Any] = ()
    ) -> None:
        """Send an ERROR for one request to the ingress (never blocking) and count it."""
        code_value, code_name = status.value
        self.stats.errors[status.name] += 1
        log.warning("request_failed", request_id=request_id, code=status.name, detail=message)
        env = codec.error_envelope(request_id, model or self.model, self.name, code_value, message)
        env.spans.extend(spans)
        env.sent_ns = time.time_ns()
        if len(self._error_backlog) >= MAX_ERROR_BACKLOG:
            log.warning("error_undeliverable", request_id=request_id, code=status.name, backlog=len(self._error_backlog))
            return
        self._error_backlog.append(codec.encode(env, {}))
        self._flush_errors()

    def _flush_errors(self) -> None:
        """Send the ERRORs that wait for room toward the ingress, in order, without blocking."""
        sock = self.push[topo.INGRESS]
        while self._error_backlog:
            try:
                sock.send_multipart(self._error_backlog[0], flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._error_backlog.popleft()
            self.stats.messages_out += 1

    # -------------------------------------------------------------- shutdown
    def _drain(self) -> None:
        started = dl.now_ns()
        self._draining_deadline_ns = started + int(self.config.drain_timeout_s * 1e9)
        log.info("worker_stopping", shard=self.name, pending_joins=len(self.join), queued=len(self.batcher), in_flight=len(self._in_flight))
        # 1. stop intake; answer what is already queued in the socket
        refused: set[int] = set()
        for pull in self.pulls:
            for _ in range(sockets.DEFAULT_BOUNDS.recv_hwm * 2):
                try:
                    message = codec.recv(pull, self.drops, flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                self.stats.messages_in += 1
                if message is not None and message.envelope.kind == pb.REQUEST:
                    refused.add(message.envelope.request_id)
            self.poller.unregister(pull)
            pull.close(linger=0)
        # 2. requests still waiting for parts cannot complete now
        refused.update(self.join.clear())
        for rid in sorted(refused):
            self._fail(rid, self.model, grpc.StatusCode.UNAVAILABLE, f"shard {self.name!r} is stopping")
        # 3. finish held work within the budget
        self._draining = True
        while (self.batcher or self._in_flight) and self.compute.ready.is_set() and dl.now_ns() < self._draining_deadline_ns:
            self._last_turn = time.monotonic()
            now = dl.now_ns()
            wait_ms = max(0, min(self._draining_deadline_ns - now, self._next_heartbeat_ns - now) // 1_000_000) + 1
            events = dict(self.poller.poll(min(wait_ms, MAX_POLL_MS)))
            if self._wake_r in events:
                self._drain_wake_pipe()
            self._collect_done()
            self._dispatch(dl.now_ns())
            self._maybe_heartbeat(dl.now_ns())
        # 4. what is left
        for r in [*self._in_flight, *self.batcher.clear()]:
            self._fail(r.request_id, r.model, grpc.StatusCode.UNAVAILABLE, f"shard {self.name!r} stopped before computing it")
        while self._error_backlog and dl.now_ns() < self._draining_deadline_ns:
            time.sleep(BACKLOG_RETRY_MS / 1000)
            self._flush_errors()
        if self._error_backlog:
            log.warning("errors_undeliverable", count=len(self._error_backlog))
        self.send_heartbeat(ready=False)
        try:
            self.compute.jobs.put_nowait(None)
        except queue.Full:
            pass
        self.compute.join(COMPUTE_JOIN_TIMEOUT_S)
        log.info("worker_stopped", shard=self.name, drain_ms=round((dl.now_ns() - started) / 1e6, 1))


def _reconnect_fast(configure: Callable[[zmq.Socket], None] | None) -> Callable[[zmq.Socket], None]:
    """``configure`` plus a short reconnect interval (a replica binds once warm: pipeline.replicas.RECONNECT_MS)."""

    def apply(sock: zmq.Socket) -> None:
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, replicas.RECONNECT_MS)
        if configure is not None:
            configure(sock)

    return apply


def _percentile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return 0.0
    return float(ordered[min(len(ordered) - 1, int(q * len(ordered)))])


# ----------------------------------------------------------------- command
def run(args: argparse.Namespace) -> int:
    """``pipeline worker``: serve one shard until SIGTERM/SIGINT; 0 on a clean stop."""
    quiet_tensorflow()
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)  # unbuffered enough for honcho's interleaved output
    if getattr(args, "process", None) or os.environ.get(ENV_PREFIX + "PROCESS"):
        from pipeline.serving import group

        return group.run(args)
    config, topology = load_config(args)
    owner = colocation.process_of(topology, config.shard)
    if len(owner.shards) > 1 or owner.ingress:
        raise UsageError(
            f"shard {config.shard!r} runs in process {owner.name!r} with {list(owner.shards)}"
            f"{' and the ingress' if owner.ingress else ''} (the topology's 'processes'); "
            f"its links to them are inproc, so start them together: pipeline worker {args.directory} --process {owner.name}"
        )
    if config.cpus:
        os.sched_setaffinity(0, config.cpus)  # before any thread starts: TensorFlow's and ZeroMQ's inherit it
    plog.configure(
        config.log_level,
        process=replicas.discovered_name(config.shard, config.replica_address)
        if config.replica_address
        else replicas.process_name(topology.shard(config.shard), config.replica),
    )
    # the modules the shard file needs (custom layers), before any socket opens: a host without them fails here
    from pipeline.custom_objects import prepare_topology

    prepare_topology(topology, needed_by=f"shard {config.shard!r}")
    worker = Worker(config, topology)
    previous = {sig: signal.signal(sig, worker.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = worker.serve()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if worker.compute.is_alive():
        # still inside TensorFlow (loading, or a batch past the drain budget): do not wait on it at exit
        log.warning("worker_exit_forced", shard=config.shard)
    # Let what the closed sockets still hold (the last heartbeat, errors) leave, within their linger.
    if not sockets.term_within(worker.ctx):
        log.warning("sockets_not_flushed", shard=config.shard)
    # Every socket is closed and every answer sent: skip the interpreter's teardown, which collects
    # TensorFlow's objects and took 5 to 45 s after a 5 ms drain on a busy 2-core machine, past honcho's
    # 5 s and a supervisor's grace period (SIGKILL, a failed stop).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m pipeline.serving.worker DIR --shard NAME`` (same as ``pipeline worker``)."""
    parser = argparse.ArgumentParser(prog="pipeline worker", description="run one shard worker")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except PipelineError as exc:
        sys.stderr.write(f"pipeline worker: error: {exc.message}\n")
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
