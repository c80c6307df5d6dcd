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

Lifecycle: the shards load one at a time and each reports ready on its own.
SIGTERM/SIGINT drain every shard at once (each as a single worker does).
When one shard fails (its file does not load, its loop raises), the others
are stopped and the process exits with that shard's error: a process is up
with all its shards or not at all, and the ingress reports each of them down.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import replace

import zmq

from pipeline import colocation
from pipeline import log as plog
from pipeline import topology as topo
from pipeline.errors import PipelineError, UsageError
from pipeline.serving import metrics as prom
from pipeline.serving.runtime import configure_tensorflow, quiet_tensorflow
from pipeline.serving.worker import ENV_PREFIX, EXIT_OK, Worker, WorkerConfig, load_config

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
    """The shards of one process: a :class:`Worker` per shard, each served on its own thread."""

    def __init__(self, name: str, configs: Sequence[WorkerConfig], topology: topo.Topology, ctx: zmq.Context | None = None) -> None:
        self.name = name
        self.ctx = ctx or zmq.Context.instance()
        self.workers = [Worker(c, topology, self.ctx) for c in configs]
        self.errors: dict[str, BaseException] = {}
        self.codes: dict[str, int] = {}
        self._threads = [
            threading.Thread(target=self._serve, args=(w,), name=f"loop-{w.name}", daemon=True) for w in self.workers
        ]
        self._stopping = False

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
        """Signal handler: drain every shard (a second signal cuts the drains short)."""
        self._stopping = True
        for w in self.workers:
            w.request_stop()

    def serve(self) -> int:
        """Run every shard until stopped; the exit status, or the first shard error raised."""
        log.info("process_starting", process=self.name, shards=[w.name for w in self.workers])
        for t in self._threads:
            t.start()
        while not self._stopping:
            time.sleep(WATCH_INTERVAL_S)
        drain = max(w.config.drain_timeout_s for w in self.workers)
        deadline = time.monotonic() + drain + JOIN_MARGIN_S
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        stuck = [t.name for t in self._threads if t.is_alive()]
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
    def busy(self) -> bool:
        """A shard's thread (its loop or its compute) is still running."""
        return any(t.is_alive() for t in self._threads) or any(w.compute.is_alive() for w in self.workers)


def run(args: argparse.Namespace) -> int:
    """``pipeline worker DIR --process NAME``: serve the process's shards until SIGTERM/SIGINT; 0 on a clean stop."""
    quiet_tensorflow()
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(line_buffering=True)
    spec, configs, topology = load_configs(args)
    first = configs[0]
    if first.cpus:
        os.sched_setaffinity(0, first.cpus)  # before any thread starts
    plog.configure(first.log_level, process=spec.name)
    configure_tensorflow(first.threads, first.inter_threads)  # one runtime, its pools shared by the shards
    log.info("tensorflow_threads", process=spec.name, intra_op=first.threads, inter_op=first.inter_threads)
    group = Group(spec.name, configs, topology)
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
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
