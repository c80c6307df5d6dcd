"""``pipeline worker DIR --process NAME``: the shards of one process, each on threads of its own.

Each shard is a whole :class:`~pipeline.serving.worker.Worker` (its network
loop, join buffer, batcher, compute thread, heartbeats, metrics endpoint and
sockets), run on a thread of its own; they share the process's one
``zmq.Context`` and its one TensorFlow runtime. Links between them are
``inproc://`` (:mod:`pipeline.colocation`), links to other processes TCP.

TensorFlow's thread pools belong to the process, not to a shard. The
inter-op pool has one thread per shard, at most one per CPU: each shard's
graph runs on a thread of its own, so the shards compute at once. The
intra-op pool is sized once (``--threads`` over ``PIPELINE_THREADS`` over the
process's ``threads`` in the topology over the CPUs divided among the shards,
at least one) and shared by every shard: the shards fill the cores by running
at once rather than by splitting each kernel (measured with two
MobileNetV3Large shards on 2 CPUs: 2.36 shards' worth of work at once with
one intra-op thread, 1.43 with two; docs/BENCHMARKS.md).

A process with ``ingress: true`` in the topology serves the ingress too: its
gRPC server and asyncio loop run on a thread of their own, configured from the
``PIPELINE_INGRESS_*`` environment and the topology (as ``pipeline ingress``
without options), and its links to the shards here are ``inproc://``. It
starts before the shards load (a gRPC port that is taken fails the process at
once) and drains with them.

Lifecycle: the shards load one at a time and each reports ready on its own.
SIGTERM/SIGINT drain every shard at once (each as a single worker does).
When one shard fails (its file does not load, its loop raises), the others
are stopped and the process exits with that shard's error: a process is up
with all its shards or not at all, and the ingress reports each of them down.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import zmq

from pipeline import colocation
from pipeline import log as plog
from pipeline import topology as topo
from pipeline.errors import PipelineError, UsageError
from pipeline.serving import metrics as prom
from pipeline.serving.runtime import configure_tensorflow, quiet_tensorflow
from pipeline.serving.worker import ENV_PREFIX, EXIT_OK, Worker, WorkerConfig, load_config
from pipeline.wire import sockets

if TYPE_CHECKING:
    from pipeline.serving.ingress import IngressConfig

#: a shard thread's loop must end this long after its drain budget, or the process exits without it.
JOIN_MARGIN_S = 2.0
#: how often the main thread looks at its shards' threads.
WATCH_INTERVAL_S = 0.1

log = plog.get_logger("pipeline.group")


def default_threads(shards: int) -> int:
    """The CPUs this process may run on divided among its shards (:func:`colocation.default_intra_threads`)."""
    return colocation.default_intra_threads(shards, len(os.sched_getaffinity(0)))


def default_inter_threads(shards: int) -> int:
    """One inter-op thread per shard, at most one per CPU: each shard's graph needs a thread to run on at once."""
    return max(1, min(shards, len(os.sched_getaffinity(0))))


def load_configs(args: argparse.Namespace, environ: dict[str, str] | None = None) -> tuple[topo.ProcessSpec, list[WorkerConfig], topo.Topology]:
    """The process's spec and one :class:`WorkerConfig` per shard; :class:`UsageError` for options that name one shard."""
    env = dict(os.environ if environ is None else environ)
    topology = topo.load(args.directory)
    name = getattr(args, "process", None) or env.get(ENV_PREFIX + "PROCESS", "")
    spec = colocation.group(topology, name)
    if getattr(args, "shard", None):
        raise UsageError(f"--shard {args.shard!r} and --process {name!r}: pass one (process {name!r} serves {list(spec.shards)})")
    if getattr(args, "bind", None):
        raise UsageError(f"--bind names one shard's endpoint; process {name!r} serves {list(spec.shards)}, each binds the topology's")
    metrics = getattr(args, "metrics", None)
    if metrics is not None and metrics.strip().lower() not in prom.DISABLED:
        raise UsageError(
            f"--metrics {metrics!r}: each shard of process {name!r} serves its own metrics at the topology's "
            "shards[].metrics; pass --metrics none to turn them all off"
        )
    env.pop(ENV_PREFIX + "SHARD", None)
    env.pop(ENV_PREFIX + "BIND", None)
    configs = []
    for shard in spec.shards:
        one = argparse.Namespace(**{**vars(args), "shard": shard, "bind": None})
        config, _ = load_config(one, env)
        configs.append(config)
    threads = configs[0].threads if (getattr(args, "threads", None) or env.get(ENV_PREFIX + "THREADS")) else (spec.threads or default_threads(len(spec.shards)))
    # One inter-op thread runs every graph of the process in turn: the shards would only take turns
    # (measured: 1.24 shards' worth of work at once with 1 inter-op thread, 2.04 with 2, on 2 CPUs).
    inter = configs[0].inter_threads if (getattr(args, "inter_threads", None) or env.get(ENV_PREFIX + "INTER_THREADS")) else default_inter_threads(len(spec.shards))
    configs = [replace(c, threads=threads, inter_threads=inter) for c in configs]
    return spec, configs, topology


class Group:
    """The shards of one process: a :class:`Worker` per shard, each served on its own thread (and the ingress on
    one more, when ``ingress`` is given)."""

    def __init__(
        self,
        name: str,
        configs: Sequence[WorkerConfig],
        topology: topo.Topology,
        ctx: zmq.Context | None = None,
        ingress: IngressConfig | None = None,
    ) -> None:
        self.name = name
        self.ctx = ctx or zmq.Context.instance()  # the ingress's asyncio context shadows the same instance
        self.topology = topology
        self.workers = [Worker(c, topology, self.ctx) for c in configs]
        self.errors: dict[str, BaseException] = {}
        self.codes: dict[str, int] = {}
        self._threads = [
            threading.Thread(target=self._serve, args=(w,), name=f"loop-{w.name}", daemon=True) for w in self.workers
        ]
        self._stopping = False
        self.ingress_config = ingress
        self.ingress: Any = None  # the running Ingress, once started
        self._ingress_loop: asyncio.AbstractEventLoop | None = None
        self._ingress_stop: asyncio.Event | None = None
        self._ingress_started = threading.Event()
        self._ingress_thread = (
            threading.Thread(target=self._serve_ingress, name="ingress", daemon=True) if ingress is not None else None
        )

    def _serve_ingress(self) -> None:
        import structlog

        structlog.contextvars.bind_contextvars(process=topo.INGRESS)
        try:
            asyncio.run(self._ingress_main())
        except BaseException as exc:  # noqa: BLE001 -- a gRPC port that is taken, a bad TLS file: the whole process exits with it
            self.errors[topo.INGRESS] = exc
            log.error("ingress_failed", process=self.name, error=str(exc))
            if not self._stopping:
                self.request_stop()
        finally:
            self._ingress_started.set()

    async def _ingress_main(self) -> None:
        from pipeline.serving import ingress

        assert self.ingress_config is not None
        self._ingress_stop = asyncio.Event()
        self._ingress_loop = asyncio.get_running_loop()
        self.ingress, _ = await ingress.create_server(self.topology, self.ingress_config)
        self._ingress_started.set()
        if not self._stopping:
            await self._ingress_stop.wait()
        await self.ingress.stop(self.ingress_config.drain_s)

    def _serve(self, worker: Worker) -> None:
        import structlog

        structlog.contextvars.bind_contextvars(process=worker.name)  # threads do not inherit the context
        try:
            self.codes[worker.name] = worker.serve()
        except BaseException as exc:  # reported by serve(): the whole process exits with it
            self.errors[worker.name] = exc
            log.error("shard_failed", process=self.name, shard=worker.name, error=str(exc))
        if not self._stopping:
            self.request_stop()  # a process is up with all its shards or not at all

    def request_stop(self, *_: object) -> None:
        """Signal handler: drain every shard (a second signal cuts the drains short). With the ingress here, it
        drains first (:meth:`serve` stops the shards once it has): the requests it still holds need them."""
        again = self._stopping
        self._stopping = True
        loop, stop = self._ingress_loop, self._ingress_stop
        if loop is not None and stop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop.set)
            except RuntimeError:  # the loop closed in between: the ingress has stopped already
                pass
        if again or self._ingress_thread is None or not self._ingress_thread.is_alive():
            self._stop_workers()

    def _stop_workers(self) -> None:
        for w in self.workers:
            w.request_stop()

    def serve(self) -> int:
        """Run every shard until stopped; the exit status, or the first shard error raised."""
        log.info("process_starting", process=self.name, shards=[w.name for w in self.workers], ingress=self.ingress_config is not None)
        ingress = self._ingress_thread
        if ingress is not None:
            # the ingress first: a gRPC port that is taken fails the process before any shard loads
            ingress.start()
            self._ingress_started.wait()
        if ingress is None or not self._stopping:
            for t in self._threads:
                t.start()
        while not self._stopping:
            time.sleep(WATCH_INTERVAL_S)
        if ingress is not None and self.ingress_config is not None:
            # the ingress's calls in flight finish on the shards before they drain; then the shards stop
            ingress.join(self.ingress_config.drain_s + JOIN_MARGIN_S)
            self._stop_workers()
        drain = max(w.config.drain_timeout_s for w in self.workers)
        deadline = time.monotonic() + drain + JOIN_MARGIN_S
        started = [t for t in self._every_thread if t.ident is not None]
        for t in started:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in started if t.is_alive()]
        if stuck:
            log.warning("process_exit_forced", process=self.name, threads=stuck)
        if self.errors:
            first = next(iter(self.errors.values()))
            if isinstance(first, PipelineError):
                raise first
            raise UsageError(f"process {self.name!r}: {type(first).__name__}: {first}")
        log.info("process_stopped", process=self.name)
        return EXIT_OK if not stuck else 1

    @property
    def _every_thread(self) -> list[threading.Thread]:
        """The ingress's thread (when it is here) and each shard's loop thread."""
        return [*([self._ingress_thread] if self._ingress_thread else []), *self._threads]

    @property
    def busy(self) -> bool:
        """A shard's thread (its loop or its compute), or the ingress's, is still running."""
        return any(t.is_alive() for t in self._every_thread) or any(w.compute.is_alive() for w in self.workers)


def run(args: argparse.Namespace) -> int:
    """``pipeline worker DIR --process NAME``: serve the process's shards until SIGTERM/SIGINT; 0 on a clean stop."""
    quiet_tensorflow()
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    spec, configs, topology = load_configs(args)
    ingress_config = None
    if spec.ingress:
        from pipeline.serving.ingress import IngressConfig

        ingress_config = IngressConfig.resolve(topology)  # PIPELINE_INGRESS_* over the topology, as `pipeline ingress`
    first = configs[0]
    if first.cpus:
        os.sched_setaffinity(0, first.cpus)  # before any thread starts
    plog.configure(first.log_level, process=spec.name)
    configure_tensorflow(first.threads, first.inter_threads)  # one runtime, its pools shared by the shards
    log.info("tensorflow_threads", process=spec.name, intra_op=first.threads, inter_op=first.inter_threads)
    group = Group(spec.name, configs, topology, ingress=ingress_config)
    previous = {sig: signal.signal(sig, group.request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = group.serve()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    # Every socket is closed and every shard drained: leave at once. A normal interpreter exit tears down
    # every loaded model and TensorFlow's runtime first, which took 3.5 s for two tiny shards and more than
    # honcho's 5 s for MobileNetV3Large's four (it then kills the process; measured).
    if group.busy:
        log.warning("process_exit_forced", process=spec.name)
    # Let what the closed sockets still hold (the shards' last heartbeats, errors) leave, within their linger.
    if not sockets.term_within(group.ctx):
        log.warning("sockets_not_flushed", process=spec.name)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
