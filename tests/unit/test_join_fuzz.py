"""Property test of a worker's receive loop (decoder, join buffer, error answers) with socket doubles.

Any bytes in: every message is either a decoded part handed to the join
buffer, or a counted drop (answered with an ERROR when its envelope names a
request); nothing raises out of the loop, the buffer keeps its bound, and it
empties once the deadlines pass. ``tests/unit/test_join.py`` checks the join
buffer's own bookkeeping against a model; this checks what reaches it.
"""

from __future__ import annotations

import time
from collections import deque
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import topology as topo
from pipeline.errors import DecodeError
from pipeline.pb import envelope_pb2 as pb
from pipeline.serving.join import Status
from pipeline.serving.worker import Worker, WorkerConfig
from pipeline.topology import IngressSpec, ShardOutput, ShardSpec, TensorSpec, Topology
from pipeline.wire import codec

MAX_PENDING = 3
#: drop labels the worker adds on top of the decoder's (not decode failures).
WORKER_LABELS = {"unexpected_kind", "duplicate_part", "unexpected_tensors"}


def join_topology() -> Topology:
    """``x`` -> p -> ``a`` and ``x`` -> q -> ``b``; the join ``j`` takes (a, b) and makes ``y``."""
    specs = {
        "x": TensorSpec("x", "float32", (-1, 2)),
        "a": TensorSpec("a", "float32", (-1, 2)),
        "b": TensorSpec("b", "int32", (-1, 3)),
        "y": TensorSpec("y", "float32", (-1, 1)),
    }

    def shard(name: str, inputs: tuple[str, ...], outputs: dict[str, tuple[str, ...]]) -> ShardSpec:
        endpoint = f"ipc:///nonexistent/{name}"
        return ShardSpec(name, f"{name}.keras", inputs, tuple(ShardOutput(o, c) for o, c in outputs.items()), endpoint, "127.0.0.1", endpoint)

    return Topology(
        name="fuzz",
        inputs=(specs["x"],),
        outputs=(specs["y"],),
        tensors=specs,
        shards=(shard("p", ("x",), {"a": ("j",)}), shard("q", ("x",), {"b": ("j",)}), shard("j", ("a", "b"), {"y": (topo.INGRESS,)})),
        ingress=IngressSpec("127.0.0.1:0", "ipc:///nonexistent/ingress", "127.0.0.1", "ipc:///nonexistent/ingress"),
    )


class FakePull:
    """Hands out queued multipart messages, then ``zmq.Again`` (as a non-blocking PULL does)."""

    def __init__(self) -> None:
        self.queue: deque[list[bytes]] = deque()
        self.closed = False

    def recv_multipart(self, flags: int = 0, copy: bool = True) -> list[bytes]:
        if not self.queue:
            raise zmq.Again()
        return self.queue.popleft()

    def getsockopt(self, option: int) -> int:
        assert option == zmq.EVENTS
        return zmq.POLLIN if self.queue else 0

    def close(self, linger: int | None = None) -> None:
        self.closed = True


class FakePush:
    """Keeps every message sent (as bytes), like a peer that is always there."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []
        self.closed = False

    def send_multipart(self, frames: list[Any], flags: int = 0, copy: bool = True) -> None:
        self.sent.append([bytes(f) for f in frames])

    def close(self, linger: int | None = None) -> None:
        self.closed = True


def part(sender: str, rid: int, budget_ns: int, good: bool) -> list[bytes]:
    env = pb.Envelope(kind=pb.REQUEST, request_id=rid, model="fuzz", sender=sender, budget_ns=budget_ns)
    if sender == "p":
        tensors = {"a": np.ones((2, 2), np.float32) if good else np.ones((2, 5), np.float64)}
    else:
        tensors = {"b": np.ones((2, 3), np.int32) if good else np.ones((4,), np.int32)}
    return [bytes(f) for f in codec.encode(env, tensors)]


@st.composite
def messages(draw: st.DrawFn) -> list[bytes]:
    kind = draw(st.sampled_from(["part", "part", "part", "raw", "mutated", "other_kind"]))
    if kind == "raw":
        return draw(st.lists(st.binary(max_size=64), max_size=4))
    budget = draw(st.sampled_from([0, -1_000_000, 60_000_000_000]))  # none, spent, 60 s
    frames = part(draw(st.sampled_from(["p", "q"])), draw(st.integers(0, 6)), budget, draw(st.booleans()))
    if kind == "other_kind":
        env = pb.Envelope.FromString(frames[0])
        env.kind = draw(st.sampled_from([pb.RESULT, pb.ERROR, pb.HEARTBEAT, 77]))
        frames[0] = env.SerializeToString()
    elif kind == "mutated":
        how = draw(st.sampled_from(["cut", "extra", "flip", "drop"]))
        if how == "cut":
            frames[1] = frames[1][: draw(st.integers(0, len(frames[1]) - 1))]
        elif how == "extra":
            frames.append(draw(st.binary(max_size=16)))
        elif how == "drop":
            frames.pop()
        else:
            head = bytearray(frames[0])
            head[draw(st.integers(0, len(head) - 1))] ^= draw(st.integers(1, 255))
            frames[0] = bytes(head)
    return frames


def decode_failure(frames: list[bytes]) -> DecodeError | None:
    try:
        codec.decode(frames)
    except DecodeError as exc:
        return exc
    return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(st.lists(messages(), max_size=8), max_size=8))
def test_any_messages_are_joined_or_counted_and_the_loop_never_raises(turns: list[list[list[bytes]]]) -> None:
    t = join_topology()
    worker = Worker(WorkerConfig(directory=Path("."), shard="j", bind="inproc://unused", max_pending=MAX_PENDING, max_queued=4), t)
    pull, ingress = FakePull(), FakePush()
    worker.pull, worker.push = pull, {topo.INGRESS: ingress}  # type: ignore[assignment]
    fed = 0
    must_answer: set[int] = set()  # requests named by a part the decoder dropped
    try:
        for batch in turns:
            pull.queue.extend(batch)
            fed += len(batch)
            for frames in batch:
                exc = decode_failure(frames)
                if exc is not None and exc.envelope is not None and exc.envelope.kind == pb.REQUEST:
                    must_answer.add(exc.envelope.request_id)
            worker._read_messages(pull)  # the loop body under test: must not raise
            worker._sweep(time.monotonic_ns())
            assert len(worker.join) <= MAX_PENDING
        assert not pull.queue
        assert worker.stats.messages_in == fed
        drops = worker.drops.snapshot()
        decoder_drops = sum(n for reason, n in drops.items() if reason not in WORKER_LABELS)
        joined = sum(worker.join.counts[s.value] for s in Status)
        assert decoder_drops + drops.get("unexpected_kind", 0) + joined == fed, (drops, worker.join.counts)
        answers = [codec.decode(m) for m in ingress.sent]
        assert all(a.envelope.kind == pb.ERROR and a.envelope.error.code for a in answers)
        assert must_answer <= {a.envelope.request_id for a in answers}
        # nothing is held past the deadlines: a flipped envelope byte can make any budget, and budgets are
        # capped at 2**62 ns (a drawn one is 60 s; without one, part_timeout_s applies)
        worker._sweep(2**63 - 1)
        assert len(worker.join) == 0
    finally:
        worker._close()


def test_batch_announcements_wait_at_most_max_delay_and_any_sender_names_cannot_grow_the_table() -> None:
    t = join_topology()
    worker = Worker(WorkerConfig(directory=Path("."), shard="j", bind="inproc://unused", max_delay_ms=1.0), t)
    worker.pull, worker.push = FakePull(), {topo.INGRESS: FakePush()}  # type: ignore[assignment]
    delay = worker.batcher.max_delay_ns
    try:
        now = time.monotonic_ns()

        def announce(sender: str, followers: int, at: int) -> None:
            env = pb.Envelope(kind=pb.REQUEST, request_id=at, model="fuzz", sender=sender, followers=followers)
            message = codec.decode([bytes(f) for f in codec.encode(env, {"a": np.ones((1, 2), np.float32)})])
            worker._on_message(message, at)

        announce("p", 2, now)
        assert worker._more_waiting(now)  # two more of p's batch are on the way
        assert not worker._more_waiting(now + delay + 1)  # ... but not waited for past max_delay
        announce("p", 0, now + 10)
        assert not worker._more_waiting(now + 10)  # the last of the batch: nothing more to wait for
        for i in range(500):  # ever new sender names, each announcing more, 2 ms apart
            announce(f"sender-{i}", 5, now + (i + 1) * 2 * delay)
        assert len(worker._followers) <= 2
    finally:
        worker._close()


class CloggedPush(FakePush):
    """A queue toward the ingress that is full (``zmq.Again``) until ``clogged`` is cleared."""

    def __init__(self) -> None:
        super().__init__()
        self.clogged = True

    def send_multipart(self, frames: list[Any], flags: int = 0, copy: bool = True) -> None:
        if self.clogged:
            raise zmq.Again()
        super().send_multipart(frames, flags, copy)


def test_errors_wait_in_order_for_room_toward_the_ingress_and_the_wait_is_bounded(monkeypatch) -> None:
    # A burst of expiries can pass the send high-water mark while ZeroMQ's I/O thread is starved:
    # the ERRORs wait (bounded) and leave in order once there is room, instead of being dropped.
    from pipeline.serving import worker as worker_mod

    monkeypatch.setattr(worker_mod, "MAX_ERROR_BACKLOG", 30)
    t = join_topology()
    worker = Worker(WorkerConfig(directory=Path("."), shard="j", bind="inproc://unused"), t)
    ingress = CloggedPush()
    worker.pull, worker.push = FakePull(), {topo.INGRESS: ingress}  # type: ignore[assignment]
    try:
        for rid in range(35):
            worker._fail(rid, "fuzz", grpc.StatusCode.DEADLINE_EXCEEDED, f"expired {rid}")
        assert not ingress.sent and worker.stats_snapshot()["error_backlog"] == 30  # 5 beyond the bound dropped
        assert worker._poll_timeout_ms(time.monotonic_ns()) <= worker_mod.BACKLOG_RETRY_MS  # the loop comes back soon
        ingress.clogged = False
        worker._flush_errors()
        answers = [codec.decode(m).envelope for m in ingress.sent]
        assert [a.request_id for a in answers] == list(range(30))
        assert {a.kind for a in answers} == {pb.ERROR} and answers[0].error.message == "expired 0"
        assert worker.stats_snapshot()["error_backlog"] == 0
    finally:
        worker._close()
