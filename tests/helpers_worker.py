"""Helpers for tests that run real shard workers: processes, a fake ingress, and senders.

Every wait has a deadline and fails the test instead of hanging; every process
started here is meant to be stopped by the caller in a ``finally``.
"""

from __future__ import annotations

import os
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq

from pipeline import process
from pipeline.pb import envelope_pb2 as pb
from pipeline.topology import Batching, IngressSpec, ShardOutput, ShardSpec, TensorSpec, Topology
from pipeline.wire import codec

#: a worker's cold start imports TensorFlow; on a busy 2-core machine several at once take a while.
WORKER_START_TIMEOUT_S = 180.0
#: one message through a warm worker.
REPLY_TIMEOUT_S = 10.0
#: bound on a test's own sends, so a missing peer fails the test instead of hanging it.
SEND_TIMEOUT_MS = 5_000


def worker_command(directory: Path, shard: str, *extra: str) -> list[str]:
    """``python -m pipeline.cli worker DIR --shard NAME`` (the CLI imports only the chosen command's module)."""
    return process.pipeline_command("worker", str(directory), "--shard", shard, *extra)


#: a started worker (the one launcher of ``pipeline.process``; ``name`` is the shard).
WorkerProcess = process.Process


def start_worker(
    directory: Path,
    shard: str,
    log_dir: Path,
    *extra: str,
    env: Mapping[str, str] | None = None,
    netns: str | None = None,
    wrap: Sequence[str] = (),
) -> WorkerProcess:
    """Start one worker (in ``netns``, behind ``wrap``: e.g. ``faketime``), its output in a log under ``log_dir``."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PIPELINE_LOG_LEVEL": "info", **(env or {})}
    # a session of its own only behind a wrapper (whose child must get the signals too): as before, a plain
    # worker stays in the test's session
    return process.start(
        shard, worker_command(directory, shard, *extra), log_dir, env=full_env, netns=netns, wrap=wrap, group=bool(wrap)
    )


def stop_worker(worker: WorkerProcess, timeout_s: float = 5.0) -> int | None:
    """SIGTERM, then SIGKILL after ``timeout_s``; return the exit status."""
    return worker.stop(timeout_s=timeout_s)


def stop_workers(workers: Sequence[WorkerProcess], timeout_s: float = 5.0) -> dict[str, int | None]:
    """SIGTERM them all at once, then wait (SIGKILL after ``timeout_s``); return their exit statuses."""
    return process.stop_all(workers, timeout_s=timeout_s)


def wait_until(predicate: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.02) -> Any:
    """``predicate()`` once it is true; fails the test naming ``what`` after ``timeout_s`` (the soak tests' wait)."""
    from soak.helpers_soak import wait_for

    return wait_for(predicate, timeout_s, what, interval_s=interval_s)


@dataclass
class FakeIngress:
    """Plays the ingress (or a downstream shard): a bound PULL read by a thread into per-kind stores."""

    ctx: zmq.Context
    endpoint: str = ""
    results: dict[int, list[codec.Message]] = field(default_factory=lambda: defaultdict(list))
    requests: dict[int, list[codec.Message]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[int, list[codec.Message]] = field(default_factory=lambda: defaultdict(list))
    heartbeats: dict[str, list[tuple[int, pb.Heartbeat]]] = field(default_factory=lambda: defaultdict(list))
    _seq: int = 0
    drops: codec.DropCounter = field(default_factory=codec.DropCounter)
    _cond: threading.Condition = field(default_factory=threading.Condition)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self, bind: str = "tcp://127.0.0.1:0") -> FakeIngress:
        """Bind (again, after ``close``: same endpoint) and start reading."""
        self._stop.clear()
        sock = self.ctx.socket(zmq.PULL)
        sock.setsockopt(zmq.LINGER, 0)
        sock.bind(bind)
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._thread = threading.Thread(target=self._loop, args=(sock,), daemon=True, name="fake-ingress")
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop reading and unbind (a peer sending here then finds nobody)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None

    def _loop(self, sock: zmq.Socket) -> None:
        try:
            while not self._stop.is_set():
                if not sock.poll(50):
                    continue
                message = codec.recv(sock, self.drops)
                if message is None:
                    continue
                env = message.envelope
                with self._cond:
                    if env.kind == pb.HEARTBEAT:
                        self._seq += 1
                        history = self.heartbeats[env.sender]
                        history.append((self._seq, env.heartbeat))
                        del history[:-10_000]
                    elif env.kind == pb.RESULT:
                        self.results[env.request_id].append(message)
                    elif env.kind == pb.REQUEST:  # when it plays a shard
                        self.requests[env.request_id].append(message)
                    elif env.kind == pb.ERROR:
                        self.errors[env.request_id].append(message)
                    self._cond.notify_all()
        finally:
            sock.close(linger=0)

    def wait(self, predicate: Callable[[], Any], timeout_s: float, what: str, *, fail: bool = True) -> Any:
        """Wait for ``predicate`` to hold; fail the test on timeout (or return ``None`` with ``fail=False``)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while True:
                value = predicate()
                if value:
                    return value
                left = deadline - time.monotonic()
                if left <= 0:
                    if not fail:
                        return None
                    pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
                self._cond.wait(min(left, 0.1))

    def result_tensors(self, request_id: int, names: Sequence[str], timeout_s: float = REPLY_TIMEOUT_S) -> dict[str, np.ndarray]:
        """Wait for RESULT parts carrying ``names`` for a request; fail on an ERROR for it instead."""

        def gathered() -> dict[str, np.ndarray] | None:
            if self.errors.get(request_id):
                err = self.errors[request_id][0].envelope.error
                pytest.fail(f"request {request_id} failed: code {err.code}: {err.message}")
            have = {k: v for m in self.results.get(request_id, []) for k, v in m.tensors.items()}
            return have if set(names) <= set(have) else None

        return self.wait(gathered, timeout_s, f"result {list(names)} of request {request_id}")

    def error(self, request_id: int, timeout_s: float = REPLY_TIMEOUT_S) -> pb.Error:
        messages = self.wait(lambda: self.errors.get(request_id), timeout_s, f"an error for request {request_id}")
        return messages[0].envelope.error

    def heartbeat(
        self, sender: str, predicate: Callable[[pb.Heartbeat], bool] = lambda hb: True, timeout_s: float = REPLY_TIMEOUT_S
    ) -> pb.Heartbeat:
        """The first heartbeat from ``sender`` that arrives from now on and satisfies ``predicate``."""
        with self._cond:
            seen = self._seq

        def found() -> pb.Heartbeat | None:
            return next((hb for seq, hb in self.heartbeats.get(sender, []) if seq > seen and predicate(hb)), None)

        return self.wait(found, timeout_s, f"a heartbeat from {sender!r} that fits")

    def latest(self, sender: str) -> pb.Heartbeat | None:
        with self._cond:
            history = self.heartbeats.get(sender)
            return history[-1][1] if history else None

    def history(self, sender: str) -> list[pb.Heartbeat]:
        with self._cond:
            return [hb for _, hb in self.heartbeats.get(sender, [])]


def pusher(ctx: zmq.Context, endpoint: str) -> zmq.Socket:
    """A test's PUSH socket: queues until the worker is there, but never blocks a test for long."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
    sock.connect(endpoint)
    return sock


def send_part(
    sock: zmq.Socket,
    request_id: int,
    tensors: Mapping[str, np.ndarray],
    *,
    model: str,
    sender: str = "ingress",
    budget_ns: int = 0,
    spans: Sequence[tuple[str, int, int]] = (),
    followers: int = 0,
) -> None:
    """Send one REQUEST part; ``budget_ns`` is the time left for it (0: no deadline, negative: spent)."""
    env = pb.Envelope(
        kind=pb.REQUEST, request_id=request_id, model=model, sender=sender, budget_ns=budget_ns, followers=followers
    )
    for name, start, end in spans:
        env.spans.add(name=name, start_ns=start, end_ns=end)
    env.sent_ns = time.time_ns()
    try:
        codec.send(sock, env, tensors)
    except zmq.Again:
        pytest.fail(f"could not send request {request_id} within {SEND_TIMEOUT_MS} ms: is the worker up?")


def budget_of(seconds: float) -> int:
    """The ``budget_ns`` of a request with ``seconds`` left."""
    return int(seconds * 1e9)


# ------------------------------------------------------------------ hand-built topologies
#: the batching of the small test shards: up to 8 rows, gathered for at most 1 ms.
SMALL_BATCHES = Batching(max_batch=8, max_delay_ms=1.0)


def ipc_shard(
    name: str, inputs: Sequence[str], outputs: Mapping[str, Sequence[str]], endpoint: str, *, batching: Batching | None = None, file: str = ""
) -> ShardSpec:
    """A shard of a hand-built topology bound and reached at ``endpoint`` (an ipc path), ``outputs`` tensor -> consumers."""
    return ShardSpec(
        name=name,
        file=file or f"{name}.keras",
        inputs=tuple(inputs),
        outputs=tuple(ShardOutput(o, tuple(c)) for o, c in outputs.items()),
        endpoint=endpoint,
        host="127.0.0.1",
        bind=endpoint,
        batching=batching or Batching(),
    )


def played_topology(
    name: str,
    directory: Path,
    *,
    inputs: Sequence[TensorSpec],
    outputs: Sequence[TensorSpec],
    tensors: Mapping[str, TensorSpec],
    shards: Sequence[ShardSpec],
    results: str,
    heartbeat_s: float,
) -> Topology:
    """A hand-built topology whose ingress the test plays (a :class:`FakeIngress` on ``results``), written to ``directory``."""
    topology = Topology(
        name=name,
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        tensors=dict(tensors),
        shards=tuple(shards),
        ingress=IngressSpec(grpc="127.0.0.1:0", results=results, host="127.0.0.1", bind=results),
        directory=directory,
        heartbeat_interval_s=heartbeat_s,
    )
    topology.write(directory)
    return topology


def wait_workers_ready(ingress: FakeIngress, names: Sequence[str], alive: Callable[[str], Any]) -> None:
    """Until every worker in ``names`` has sent ``ingress`` a ready heartbeat; ``alive(name)`` fails the test if one exited."""
    for name in names:
        wait_until(
            lambda: alive(name) or (ingress.latest(name) or pb.Heartbeat()).ready,
            WORKER_START_TIMEOUT_S,
            f"worker {name} to report ready",
            interval_s=0.1,
        )
