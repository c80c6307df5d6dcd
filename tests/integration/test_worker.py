"""Real shard worker processes on hand-built topologies; the test plays the ingress (and, once, a shard).

Three topologies, all workers started together once per module (each cold start
imports TensorFlow, which is the slow part on a small machine):

- ``tiny``: ``s1: x -> a = 2x+1`` feeds ``s2: a -> c:0 = 3a`` (a chain, ``c:0`` is a
  model output) and ``s4``; ``s3: x -> d = x-1``; ``s4: (a, c:0, d) -> out = a+c+d``
  joins three producers.
- ``edge``: ``w: x -> y = x @ K + b`` (to the ingress) and ``z = x/2`` (to a shard
  ``sink`` the test plays); its input spec is ``[-1, -1]``, so a 5-wide ``x``
  passes the spec check and fails in the model.
- ``solo``: two one-shard workers to stop with SIGTERM and SIGINT, and ``slow``,
  whose one call takes about a second of one core.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/helpers_worker.py

from helpers_worker import (  # noqa: E402
    REPLY_TIMEOUT_S,
    FakeIngress,
    WorkerProcess,
    budget_of,
    pusher,
    send_part,
    SMALL_BATCHES,
    ipc_shard,
    played_topology,
    start_worker,
    stop_workers,
    wait_until,
    wait_workers_ready,
)

from pipeline.pb import envelope_pb2 as pb  # noqa: E402
from pipeline.topology import INGRESS, Batching, ShardSpec, TensorSpec, Topology  # noqa: E402

HEARTBEAT_S = 0.2
EDGE_MAX_DELAY_MS = 100.0
S4_MAX_PENDING = 40
SLOW_N, SLOW_MATMULS = 1024, 60
KERNEL = (np.arange(8, dtype=np.float32).reshape(4, 2) - 3.5) / 4
BIAS = np.array([0.5, -1.0], np.float32)
ids = itertools.count(1_000)


def code(status: grpc.StatusCode) -> int:
    return status.value[0]


# ------------------------------------------------------------------- building
def _save(model: object, path: Path) -> str:
    model.save(path)  # type: ignore[attr-defined]
    return path.name


def build_tiny(directory: Path, sockets: Path, results: str) -> Topology:
    import keras

    def rescale(in_name: str, out_name: str, scale: float, offset: float, file: str) -> str:
        inp = keras.Input(shape=(4,), name=in_name)
        out = keras.layers.Rescaling(scale, offset=offset)(inp)
        return _save(keras.Model({in_name: inp}, {out_name: out}), directory / file)

    rescale("x", "a", 2.0, 1.0, "s1.keras")
    rescale("a", "c:0", 3.0, 0.0, "s2.keras")
    rescale("x", "d", 1.0, -1.0, "s3.keras")
    ins = {n: keras.Input(shape=(4,), name=n) for n in ("a", "c:0", "d")}
    _save(keras.Model(ins, {"out": keras.layers.Add()(list(ins.values()))}), directory / "s4.keras")

    f32 = lambda n: TensorSpec(n, "float32", (-1, 4))  # noqa: E731
    tensors = {n: f32(n) for n in ("x", "a", "c:0", "d", "out")}

    def shard(name: str, inputs: tuple[str, ...], outputs: dict[str, tuple[str, ...]]) -> ShardSpec:
        return ipc_shard(name, inputs, outputs, f"ipc://{sockets}/tiny-{name}", batching=SMALL_BATCHES)

    return played_topology(
        "tiny",
        directory,
        inputs=(tensors["x"],),
        outputs=(tensors["c:0"], tensors["out"]),
        tensors=tensors,
        shards=(
            shard("s1", ("x",), {"a": ("s2", "s4")}),
            shard("s2", ("a",), {"c:0": ("s4", INGRESS)}),
            shard("s3", ("x",), {"d": ("s4",)}),
            shard("s4", ("a", "c:0", "d"), {"out": (INGRESS,)}),
        ),
        results=results,
        heartbeat_s=HEARTBEAT_S,
    )


def build_edge(directory: Path, sockets: Path, results: str) -> Topology:
    import keras

    x = keras.Input(shape=(4,), name="x")
    dense = keras.layers.Dense(2)
    y = dense(x)
    dense.set_weights([KERNEL, BIAS])
    z = keras.layers.Rescaling(0.5)(x)
    _save(keras.Model({"x": x}, {"y": y, "z": z}), directory / "w.keras")
    tensors = {
        "x": TensorSpec("x", "float32", (-1, -1)),
        "y": TensorSpec("y", "float32", (-1, 2)),
        "z": TensorSpec("z", "float32", (-1, -1)),
    }
    w_end, sink_end = f"ipc://{sockets}/edge-w", f"ipc://{sockets}/edge-sink"
    return played_topology(
        "edge",
        directory,
        inputs=(tensors["x"],),
        outputs=(tensors["y"],),
        tensors=tensors,
        shards=(
            ipc_shard("w", ("x",), {"y": (INGRESS,), "z": ("sink",)}, w_end, batching=Batching(max_batch=16, max_delay_ms=EDGE_MAX_DELAY_MS)),
            ipc_shard("sink", ("z",), {}, sink_end, file="w.keras"),  # played by the test; its file only has to exist
        ),
        results=results,
        heartbeat_s=HEARTBEAT_S,
    )


def build_solo(directory: Path, sockets: Path, results: str) -> Topology:
    import keras

    for name, out in (("t1", "y1"), ("t2", "y2")):
        x = keras.Input(shape=(4,), name="x")
        _save(keras.Model({"x": x}, {out: keras.layers.Rescaling(2.0)(x)}), directory / f"{name}.keras")
    # slow: about a second of one core per call (chained batched matmuls, no weights)
    big = keras.Input(shape=(SLOW_N, SLOW_N), name="big")
    acc = big
    for _ in range(SLOW_MATMULS):
        acc = keras.layers.Dot(axes=(2, 1))([acc, big])
    _save(keras.Model({"big": big}, {"slow": keras.layers.GlobalAveragePooling1D()(acc)}), directory / "slow.keras")
    tensors = {n: TensorSpec(n, "float32", (-1, 4)) for n in ("x", "y1", "y2")}
    tensors["big"] = TensorSpec("big", "float32", (-1, SLOW_N, SLOW_N))
    tensors["slow"] = TensorSpec("slow", "float32", (-1, SLOW_N))
    shards = [ipc_shard(name, ("x",), {out: (INGRESS,)}, f"ipc://{sockets}/solo-{name}") for name, out in (("t1", "y1"), ("t2", "y2"))]
    shards.append(ipc_shard("slow", ("big",), {"slow": (INGRESS,)}, f"ipc://{sockets}/solo-slow"))
    return played_topology(
        "solo",
        directory,
        inputs=(tensors["x"], tensors["big"]),
        outputs=(tensors["y1"], tensors["y2"], tensors["slow"]),
        tensors=tensors,
        shards=shards,
        results=results,
        heartbeat_s=HEARTBEAT_S,
    )


# ------------------------------------------------------------------- the fleet
@dataclass
class Fleet:
    ctx: zmq.Context
    topologies: dict[str, Topology]
    ingress: dict[str, FakeIngress]
    sink: FakeIngress
    workers: dict[str, WorkerProcess]
    sockets: dict[str, zmq.Socket] = field(default_factory=dict)

    def push(self, topology: str, shard: str) -> zmq.Socket:
        endpoint = self.topologies[topology].shard(shard).endpoint
        if endpoint not in self.sockets:
            self.sockets[endpoint] = pusher(self.ctx, endpoint)
        return self.sockets[endpoint]

    def alive(self, shard: str) -> None:
        worker = self.workers[shard]
        if worker.proc.poll() is not None:
            pytest.fail(f"worker {shard} exited with {worker.proc.returncode}:\n{worker.tail()}")

    def stats(self, topology: str, shard: str, predicate=lambda s: True, timeout_s: float = REPLY_TIMEOUT_S) -> dict:
        self.alive(shard)
        hb = self.ingress[topology].heartbeat(shard, lambda hb: predicate(dict(hb.stats)), timeout_s)
        return dict(hb.stats)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    base = tmp_path_factory.mktemp("workers")
    sockdir = Path(tempfile.mkdtemp(prefix="pw-", dir="/tmp"))  # ipc paths must stay short
    ctx = zmq.Context()
    ingress: dict[str, FakeIngress] = {}
    workers: dict[str, WorkerProcess] = {}
    sink = FakeIngress(ctx)
    fleet = None
    try:
        for name in ("tiny", "edge", "solo"):
            ingress[name] = FakeIngress(ctx).start()
        sink.start(f"ipc://{sockdir}/edge-sink")
        topologies = {}
        for name, build in (("tiny", build_tiny), ("edge", build_edge), ("solo", build_solo)):
            (base / name).mkdir()
            topologies[name] = build(base / name, sockdir, ingress[name].endpoint)
        env = {"s4": {"PIPELINE_MAX_PENDING": str(S4_MAX_PENDING)}, "slow": {"PIPELINE_WARMUP_CALLS": "1"}}
        placement = {"tiny": ("s1", "s2", "s3", "s4"), "edge": ("w",), "solo": ("t1", "t2", "slow")}
        for topology, shards in placement.items():
            for shard in shards:
                workers[shard] = start_worker(base / topology, shard, base, env=env.get(shard))
        fleet = Fleet(ctx, topologies, ingress, sink, workers)
        for topology, shards in placement.items():
            wait_workers_ready(fleet.ingress[topology], shards, fleet.alive)
        yield fleet
    finally:
        stop_workers(list(workers.values()))
        if fleet is not None:
            for sock in fleet.sockets.values():
                sock.close(linger=0)
        sink.close()
        for ing in ingress.values():
            ing.close()
        ctx.term()
        shutil.rmtree(sockdir, ignore_errors=True)


def run_tiny(fleet: Fleet, x: np.ndarray, rid: int, **kw: object) -> None:
    for shard in ("s1", "s3"):  # the ingress's entry routes: x to s1 and s3
        send_part(fleet.push("tiny", shard), rid, {"x": x}, model="tiny", **kw)


def span_names(message) -> list[str]:
    return [s.name for s in message.envelope.spans]


# ------------------------------------------------------------------- tests
def test_heartbeats_say_not_ready_until_warm_then_ready_with_process_facts(fleet: Fleet) -> None:
    for topology, shard in (("tiny", "s1"), ("tiny", "s4"), ("edge", "w")):
        history = fleet.ingress[topology].history(shard)
        first_ready = next(i for i, hb in enumerate(history) if hb.ready)
        # heartbeats flow while TensorFlow loads (it holds the GIL for long stretches), saying not ready
        assert first_ready >= 3, f"{shard}: {first_ready} heartbeats before ready"
        assert all(hb.ready for hb in history[first_ready:])
        hb = fleet.ingress[topology].heartbeat(shard)
        assert hb.ready and hb.process == shard
        assert hb.pid == fleet.workers[shard].proc.pid
        assert hb.rss_bytes > 10 << 20 and hb.host
        for key in ("messages_in", "messages_out", "dropped", "pending_joins", "computed", "errors",
                    "last_batch_size", "compute_ms_p50", "compute_ms_p99"):
            assert key in hb.stats, key
        assert hb.stats["traces"] == 1  # traced once, at warm-up


def test_chain_of_two_workers_gives_the_chained_models_numbers(fleet: Fleet) -> None:
    rid = next(ids)
    x = np.array([[0.5, -1.0, 2.0, 3.25], [0.0, 1.0, -2.5, 100.0]], np.float32)
    run_tiny(fleet, x, rid)
    got = fleet.ingress["tiny"].result_tensors(rid, ["c:0"])
    np.testing.assert_array_equal(got["c:0"], (2 * x + 1) * 3)
    message = next(m for m in fleet.ingress["tiny"].results[rid] if "c:0" in m.tensors)
    assert message.envelope.sender == "s2" and list(message.tensors) == ["c:0"]
    names = span_names(message)
    for expected in ("ingress->s1.hop", "s1.queue", "s1.compute", "s1->s2.hop", "s2.queue", "s2.compute"):
        assert expected in names, names
    for span in message.envelope.spans:
        assert 0 < span.start_ns <= span.end_ns


def test_join_of_three_producers_gives_the_sum_and_merges_their_spans(fleet: Fleet) -> None:
    rid = next(ids)
    x = np.random.default_rng(1).standard_normal((3, 4)).astype(np.float32)
    run_tiny(fleet, x, rid)
    got = fleet.ingress["tiny"].result_tensors(rid, ["c:0", "out"])
    a, c, d = 2 * x + 1, (2 * x + 1) * 3, x - 1
    np.testing.assert_allclose(got["out"], a + c + d, rtol=1e-6)
    message = next(m for m in fleet.ingress["tiny"].results[rid] if "out" in m.tensors)
    names = span_names(message)
    for expected in ("s1->s4.hop", "s2->s4.hop", "s3->s4.hop", "s1.compute", "s2.compute", "s3.compute", "s4.compute"):
        assert expected in names, names
    assert names.count("s1.compute") == 1  # s1's spans reach s4 by two paths, and are merged
    assert not fleet.ingress["tiny"].errors.get(rid)


def test_batched_and_concurrent_requests_each_get_their_own_answer_without_retracing(fleet: Fleet) -> None:
    rng = np.random.default_rng(2)
    requests = {next(ids): rng.standard_normal((int(rng.integers(1, 4)), 4)).astype(np.float32) for _ in range(12)}
    for rid, x in requests.items():
        send_part(fleet.push("edge", "w"), rid, {"x": x}, model="edge")
    for rid, x in requests.items():
        got = fleet.ingress["edge"].result_tensors(rid, ["y"])
        np.testing.assert_allclose(got["y"], x @ KERNEL + BIAS, rtol=1e-5, atol=1e-6)
        sunk = fleet.sink.wait(lambda: fleet.sink.requests.get(rid), REPLY_TIMEOUT_S, f"z of request {rid} at the sink")
        assert list(sunk[0].tensors) == ["z"]  # exactly what the sink takes from w
        np.testing.assert_allclose(sunk[0].tensors["z"], x / 2, rtol=1e-6)
    stats = fleet.stats("edge", "w", lambda s: s["computed"] >= 12)
    assert stats["batches"] < stats["computed"], stats  # some requests shared a call
    assert stats["traces"] == 1, stats


def test_a_batch_announced_by_the_upstream_shard_is_computed_together(fleet: Fleet) -> None:
    # An upstream shard sends the rows of one computed batch as separate messages, each saying how many
    # more follow. Spaced 5 ms apart (w computes one in well under that), w waits for the announced ones
    # (within its max_delay) and computes them in one call; unannounced, each is computed on arrival.
    def send_spaced(followers: bool) -> tuple[float, float]:
        before = fleet.stats("edge", "w")  # a heartbeat sent after every earlier request was answered
        rng = np.random.default_rng(7)
        sent = {next(ids): rng.standard_normal((1, 4)).astype(np.float32) for _ in range(4)}
        for i, (rid, x) in enumerate(sent.items()):
            send_part(fleet.push("edge", "w"), rid, {"x": x}, model="edge", sender="up", followers=3 - i if followers else 0)
            time.sleep(0.005)
        for rid, x in sent.items():
            np.testing.assert_allclose(fleet.ingress["edge"].result_tensors(rid, ["y"])["y"], x @ KERNEL + BIAS, rtol=1e-5, atol=1e-6)
            fleet.sink.wait(lambda: fleet.sink.requests.get(rid), REPLY_TIMEOUT_S, f"z of request {rid} at the sink")
        after = fleet.stats("edge", "w", lambda s: s["computed"] >= before["computed"] + 4)
        return after["batches"] - before["batches"], after["computed"] - before["computed"]

    assert send_spaced(followers=True) == (1, 4)
    batches, computed = send_spaced(followers=False)
    assert computed == 4 and batches >= 2


def test_compute_failures_become_errors_and_the_worker_goes_on(fleet: Fleet) -> None:
    push = fleet.push("edge", "w")
    cases = [
        ({"x": np.ones((2, 4), np.int32)}, grpc.StatusCode.INVALID_ARGUMENT, "expected float32[-1, -1], received int32[2, 4]"),
        ({"x": np.ones((2, 4, 1), np.float32)}, grpc.StatusCode.INVALID_ARGUMENT, "received float32[2, 4, 1]"),
        ({"x": np.ones((2, 5), np.float32)}, grpc.StatusCode.INTERNAL, "failed"),  # fits the spec, not the model
        ({"x": np.ones((2, 4), np.float32), "junk": np.ones(1, np.float32)}, None, None),  # extra tensor: ignored
    ]
    for tensors, status, text in cases:
        rid = next(ids)
        send_part(push, rid, tensors, model="edge")
        if status is None:
            fleet.ingress["edge"].result_tensors(rid, ["y"])
            continue
        error = fleet.ingress["edge"].error(rid)
        assert error.code == code(status), error
        assert text in error.message and error.origin == "w"
        assert not fleet.ingress["edge"].results.get(rid)
    rid = next(ids)
    x = np.full((1, 4), 2.0, np.float32)
    send_part(push, rid, {"x": x}, model="edge")
    np.testing.assert_allclose(fleet.ingress["edge"].result_tensors(rid, ["y"])["y"], x @ KERNEL + BIAS, rtol=1e-6)
    fleet.alive("w")


def test_malformed_messages_are_dropped_counted_and_the_worker_goes_on(fleet: Fleet) -> None:
    from pipeline.wire import codec

    push = fleet.push("edge", "w")
    before = fleet.stats("edge", "w")
    good = pb.Envelope(kind=pb.REQUEST, request_id=next(ids), model="edge", sender="ingress")
    frames = codec.encode(good, {"x": np.ones((2, 4), np.float32)})
    header = bytes(frames[0])
    bad_nbytes = pb.Envelope.FromString(header)
    bad_nbytes.tensors[0].nbytes = 7
    bad_dtype = pb.Envelope.FromString(header)
    bad_dtype.tensors[0].dtype = "object"
    garbage = [
        [os.urandom(64)],
        [b""],
        [b"", b""],
        [header],  # declares a tensor, sends no frame
        [header, b"\0" * 31],  # frame one byte short
        [header, b"\0" * 32, b"\0" * 32],  # one frame too many
        [bad_nbytes.SerializeToString(), b"\0" * 32],
        [bad_dtype.SerializeToString(), b"\0" * 32],
        [os.urandom(16), os.urandom(4096)],
    ]
    for message in garbage:
        push.send_multipart(message)
    heartbeat = pb.Envelope(kind=pb.HEARTBEAT, sender="nobody")  # a valid message of the wrong kind
    codec.send(push, heartbeat)
    rid = next(ids)
    x = np.full((1, 4), -1.5, np.float32)
    send_part(push, rid, {"x": x}, model="edge")
    np.testing.assert_allclose(fleet.ingress["edge"].result_tensors(rid, ["y"])["y"], x @ KERNEL + BIAS, rtol=1e-6)
    after = fleet.stats("edge", "w", lambda s: s["dropped"] >= before["dropped"] + len(garbage) + 1)
    assert after["dropped"] - before["dropped"] == len(garbage) + 1
    for reason in ("bad_envelope", "bad_version", "frame_count", "size_mismatch", "bad_dtype", "unexpected_kind"):
        assert after.get(f"dropped.{reason}", 0) > before.get(f"dropped.{reason}", 0), reason
    fleet.alive("w")


def test_request_past_its_deadline_is_not_computed(fleet: Fleet) -> None:
    before = fleet.stats("tiny", "s3")
    rid = next(ids)
    send_part(fleet.push("tiny", "s3"), rid, {"x": np.ones((1, 4), np.float32)}, model="tiny", budget_ns=-1)
    error = fleet.ingress["tiny"].error(rid)
    assert error.code == code(grpc.StatusCode.DEADLINE_EXCEEDED) and error.origin == "s3"
    after = fleet.stats("tiny", "s3", lambda s: s["errors"] > before["errors"])
    assert after["computed"] == before["computed"]


def test_join_parts_past_their_deadline_are_expired_and_the_buffer_empties(fleet: Fleet) -> None:
    push = fleet.push("tiny", "s4")
    fleet.stats("tiny", "s4", lambda s: s["pending_joins"] == 0)
    rids = [next(ids) for _ in range(5)]
    for rid in rids:  # only a and d: c:0 never comes
        send_part(push, rid, {"a": np.ones((1, 4), np.float32)}, model="tiny", sender="s1", budget_ns=budget_of(1.5))
        send_part(push, rid, {"d": np.ones((1, 4), np.float32)}, model="tiny", sender="s3", budget_ns=budget_of(1.5))
    fleet.stats("tiny", "s4", lambda s: s["pending_joins"] == 5)
    for rid in rids:
        error = fleet.ingress["tiny"].error(rid, timeout_s=5)
        assert error.code == code(grpc.StatusCode.DEADLINE_EXCEEDED) and "other parts" in error.message
    fleet.stats("tiny", "s4", lambda s: s["pending_joins"] == 0)


def test_a_full_join_buffer_refuses_new_requests(fleet: Fleet) -> None:
    push = fleet.push("tiny", "s4")
    fleet.stats("tiny", "s4", lambda s: s["pending_joins"] == 0)
    rids = [next(ids) for _ in range(S4_MAX_PENDING + 10)]
    for rid in rids:
        send_part(push, rid, {"a": np.ones((1, 4), np.float32)}, model="tiny", sender="s1", budget_ns=budget_of(3.0))
    codes = [fleet.ingress["tiny"].error(rid, timeout_s=10).code for rid in rids]
    assert codes.count(code(grpc.StatusCode.RESOURCE_EXHAUSTED)) == 10
    assert codes.count(code(grpc.StatusCode.DEADLINE_EXCEEDED)) == S4_MAX_PENDING
    assert all(c == code(grpc.StatusCode.RESOURCE_EXHAUSTED) for c in codes[S4_MAX_PENDING:])
    fleet.stats("tiny", "s4", lambda s: s["pending_joins"] == 0)


def test_worker_memory_returns_to_base_after_a_burst_of_incomplete_requests(fleet: Fleet) -> None:
    push = fleet.push("tiny", "s4")
    fleet.stats("tiny", "s4", lambda s: s["pending_joins"] == 0)
    base = fleet.ingress["tiny"].heartbeat("s4").rss_bytes
    burst, rows = 30, 1 << 18  # 30 parts of 4 MiB
    part = np.ones((rows, 4), np.float32)
    rids = [next(ids) for _ in range(burst)]
    for rid in rids:
        send_part(push, rid, {"a": part}, model="tiny", sender="s1", budget_ns=budget_of(4.0))
    full = fleet.ingress["tiny"].heartbeat("s4", lambda hb: hb.stats["pending_joins"] == burst, timeout_s=10)
    assert full.rss_bytes > base + burst * part.nbytes * 0.6, (base, full.rss_bytes)  # the burst is visible
    for rid in rids:
        assert fleet.ingress["tiny"].error(rid, timeout_s=10).code == code(grpc.StatusCode.DEADLINE_EXCEEDED)
    settled = fleet.ingress["tiny"].heartbeat(
        "s4", lambda hb: hb.stats["pending_joins"] == 0 and hb.rss_bytes < base + (24 << 20), timeout_s=10
    )
    assert settled.rss_bytes < base + (24 << 20)


def test_missing_peer_becomes_unavailable_and_the_worker_stays_up(fleet: Fleet) -> None:
    push = fleet.push("edge", "w")
    ingress = fleet.ingress["edge"]

    def answer(rid: int) -> str | None:
        """Send one request; 'result', 'error' or None (lost on a connection that was going away)."""
        send_part(push, rid, {"x": np.ones((1, 4), np.float32)}, model="edge")
        ingress.wait(lambda: ingress.results.get(rid) or ingress.errors.get(rid), 1.0, "an answer", fail=False)
        return "error" if ingress.errors.get(rid) else "result" if ingress.results.get(rid) else None

    fleet.sink.close()
    try:
        rid = wait_until(lambda: (lambda r: r if answer(r) == "error" else None)(next(ids)), 15, "an error for w's output")
        error = ingress.errors[rid][0].envelope.error
        assert error.code == code(grpc.StatusCode.UNAVAILABLE) and "'sink'" in error.message, error
        assert not ingress.results.get(rid)  # the ingress got no half answer
        fleet.alive("w")
    finally:
        fleet.sink.start(fleet.topologies["edge"].shard("sink").endpoint)
    wait_until(lambda: answer(next(ids)) == "result", 15, "w to reconnect to the sink by itself")


def test_heartbeats_keep_flowing_while_the_worker_computes(fleet: Fleet) -> None:
    ingress = fleet.ingress["solo"]
    rid = next(ids)
    send_part(fleet.push("solo", "slow"), rid, {"big": np.zeros((1, SLOW_N, SLOW_N), np.float32)}, model="solo")
    ingress.heartbeat("slow", lambda hb: hb.stats["in_flight"] == 1, timeout_s=5)
    got = ingress.result_tensors(rid, ["slow"], timeout_s=60)
    np.testing.assert_array_equal(got["slow"], np.zeros((1, SLOW_N), np.float32))
    busy = [hb for hb in ingress.history("slow") if hb.stats["in_flight"] == 1]
    stats = fleet.stats("solo", "slow")
    assert stats["compute_ms_p50"] > 500, stats  # the call was long enough to need heartbeats during it
    assert len(busy) >= 2 and all(hb.ready for hb in busy), [dict(hb.stats) for hb in busy]


@pytest.mark.parametrize("shard, signum", [("t1", signal.SIGTERM), ("t2", signal.SIGINT)])
def test_signal_stops_the_worker_cleanly_within_3_s(fleet: Fleet, shard: str, signum: int) -> None:
    worker = fleet.workers[shard]
    rid = next(ids)
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    send_part(fleet.push("solo", shard), rid, {"x": x}, model="solo")
    out = "y1" if shard == "t1" else "y2"
    np.testing.assert_array_equal(fleet.ingress["solo"].result_tensors(rid, [out])[out], x * 2)
    started = time.monotonic()
    worker.proc.send_signal(signum)
    try:
        rc = worker.proc.wait(3.0)
    except Exception:
        pytest.fail(f"{shard} did not exit within 3 s of {signal.Signals(signum).name}:\n{worker.tail()}")
    assert rc == 0, worker.tail()
    assert time.monotonic() - started < 3.0
    last = fleet.ingress["solo"].wait(lambda: fleet.ingress["solo"].latest(shard), 1, "a heartbeat")
    fleet.ingress["solo"].wait(lambda: not fleet.ingress["solo"].latest(shard).ready, 2, f"a last heartbeat from {shard} with ready=false")
    assert last is not None
    assert "worker_stopped" in worker.text()


# ------------------------------------------------------------------- runtime, in process
def test_runtime_refuses_unsafe_models_unless_asked_and_never_retraces(tmp_path: Path) -> None:
    import keras

    from pipeline.errors import UsageError
    from pipeline.serving.runtime import ShardRuntime, load_model

    x = keras.Input(shape=(4,), name="x")
    keras.Model({"x": x}, {"y": keras.layers.Lambda(lambda t: t * 2)(x)}).save(tmp_path / "lambda.keras")
    with pytest.raises(UsageError, match="--unsafe"):
        load_model(tmp_path / "lambda.keras")
    model = load_model(tmp_path / "lambda.keras", unsafe=True)
    runtime = ShardRuntime("lam", model, {"x": TensorSpec("x", "float32", (-1, 4))}, ("y",))
    runtime.warm_up()
    for batch in (1, 3, 7, 2):
        x_in = np.full((batch, 4), batch, np.float32)
        np.testing.assert_array_equal(runtime({"x": x_in})["y"], x_in * 2)
    assert runtime.tracing_count == 1


def test_runtime_takes_a_joins_inputs_in_the_order_its_model_names_them(tmp_path: Path) -> None:
    """The flat entry point (pipeline.serving.runtime._flat_entry) passes inputs by TensorFlow's own order of
    the signature: a join of two same-shaped inputs that is not symmetric answers as the model does."""
    import keras

    from pipeline.serving import runtime as rt_mod

    a, b, c = (keras.Input(shape=(3,), name=n) for n in ("b_second", "a_first", "c_third"))
    out = keras.layers.Subtract()([a, keras.layers.Multiply()([b, c])])  # b_second - a_first * c_third
    model = keras.Model({"b_second": a, "a_first": b, "c_third": c}, {"y": out})
    specs = {n: TensorSpec(n, "float32", (-1, 3)) for n in ("c_third", "b_second", "a_first")}
    runtime = rt_mod.ShardRuntime("join", model, specs, ("y",))
    runtime.warm_up()
    assert runtime._flat is not None, "the flat entry point was not kept"
    rng = np.random.default_rng(7)
    x = {n: rng.standard_normal((2, 3)).astype(np.float32) for n in specs}
    assert not np.allclose(x["b_second"] - x["a_first"] * x["c_third"], x["a_first"] - x["b_second"] * x["c_third"])
    np.testing.assert_array_equal(runtime(x)["y"], np.asarray(model(x)["y"]))

    # an entry point that takes the inputs in another order is caught at warm-up and not used
    wrong = rt_mod.ShardRuntime("join", model, specs, ("y",))
    assert wrong._flat is not None
    call, order, captured = wrong._flat
    wrong._flat = (call, order[1:] + order[:1], captured)  # each input in the place of another
    wrong.warm_up()
    assert wrong._flat is None
    np.testing.assert_array_equal(wrong(x)["y"], np.asarray(model(x)["y"]))
