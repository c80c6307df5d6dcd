"""Faults the pipeline must survive, and the ingress features soaks rely on.

First against fake shard workers (fast, exact): retries after a shard
restart, retries that give up at the deadline, the admin RPC, recording live
traffic. Then against real processes started one by one (honcho would stop
everything when one exits) on a small topology with a join, on ipc sockets:
malformed messages at a worker, a burst of very short deadlines, the ingress
killed and restarted, and a worker killed with SIGKILL and restarted.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import helpers_soak as hs  # noqa: E402
from helpers_ingress import (  # noqa: E402
    HEARTBEAT_S,
    FakeWorker,
    IngressThread,
    fake_workers,
    outputs_of,
    raw_request,
    single_topology,
    sock_dir,
    toy_compute,
    toy_inputs,
    wait_ready,
    wait_until,
)

from pipeline.pb import admin_pb2 as apb  # noqa: E402
from pipeline.pb import admin_pb2_grpc as apb_grpc  # noqa: E402
from pipeline.pb import envelope_pb2 as pb  # noqa: E402
from pipeline.soak import replay as replay_mod  # noqa: E402
from pipeline.topology import Topology  # noqa: E402
from pipeline.wire import codec  # noqa: E402

MIB = 1 << 20


@pytest.fixture
def toy(tmp_path: Path) -> Iterator[Topology]:
    with sock_dir() as sockets:
        yield single_topology(tmp_path / "toy", sockets)


# ------------------------------------------------------ against fake workers
@pytest.mark.timeout(60)
def test_a_request_lost_to_a_shard_restart_is_retried_once_it_is_up(toy: Topology) -> None:
    worker = FakeWorker(toy, "s0", toy_compute, mode="silent")
    with IngressThread(toy) as ing, fake_workers(worker), ing.stub() as stub:
        assert ing.config.retries == 1  # the default
        wait_ready(stub)
        inputs = toy_inputs(2, seed=3)
        started = time.monotonic()
        future = stub.ModelInfer.future(raw_request("toy", inputs), timeout=10)
        assert wait_until(lambda: worker.requests == 1)
        worker.mode = "ok"
        worker.pid += 1  # the shard restarted: the first attempt is lost with it
        response = future.result(timeout=10)
        np.testing.assert_array_equal(outputs_of(response)["y"], toy_compute(inputs)["y"])
        assert time.monotonic() - started < 5
        assert worker.requests == 2 and len(set(worker.request_ids)) == 2  # the retry carries a fresh id
        assert ing.in_loop(lambda: ing.ingress.retried) == 1
        assert ing.pending() == 0


@pytest.mark.timeout(60)
def test_a_retry_waits_for_the_shard_no_longer_than_the_deadline(toy: Topology) -> None:
    worker = FakeWorker(toy, "s0", toy_compute, mode="silent")
    with IngressThread(toy, retries=3) as ing, fake_workers(worker), ing.stub() as stub:
        wait_ready(stub)
        deadline_s = 2.0
        started = time.monotonic()
        future = stub.ModelInfer.future(raw_request("toy", toy_inputs(1)), timeout=deadline_s)
        assert wait_until(lambda: worker.requests == 1)
        worker.heartbeat = False  # the shard dies and does not come back
        with pytest.raises(grpc.RpcError) as excinfo:
            future.result(timeout=deadline_s + 5)
        elapsed = time.monotonic() - started
        assert excinfo.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        assert elapsed <= deadline_s + 0.5, elapsed
        assert worker.requests == 1  # never resent to a shard that is not up
        assert wait_until(lambda: ing.pending() == 0, 2)


@pytest.mark.timeout(60)
def test_admin_processes_lists_the_ingress_and_every_shard(toy: Topology) -> None:
    worker = FakeWorker(toy, "s0", toy_compute)
    with IngressThread(toy) as ing, fake_workers(worker), ing.stub() as stub:
        wait_ready(stub)
        stub.ModelInfer(raw_request("toy", toy_inputs(1)), timeout=5)
        with grpc.insecure_channel(ing.target) as channel:
            admin = apb_grpc.PipelineAdminStub(channel)
            response = admin.Processes(apb.ProcessesRequest(), timeout=5)
            by_name = {p.name: p for p in response.processes}
            assert [p.name for p in response.processes] == ["ingress", "s0"]
            assert response.model == "toy" and response.heartbeat_interval_s == HEARTBEAT_S
            me = by_name["ingress"]
            assert me.role == "ingress" and me.pid == os.getpid() and me.rss_bytes > 10 * MIB and me.ready and me.up
            assert me.stats["success"] == 1 and me.stats["codes.OK"] == 1 and me.stats["pending"] == 0
            s0 = by_name["s0"]
            assert s0.role == "shard" and s0.pid == 4242 and s0.ready and s0.up and s0.state == "up"
            assert 0 <= s0.heartbeat_age_s < 3 * HEARTBEAT_S and s0.heartbeats >= 1 and s0.restarts == 0
            worker.pid += 1
            assert wait_until(lambda: {p.name: p for p in admin.Processes(apb.ProcessesRequest(), timeout=5).processes}["s0"].restarts == 1)
            worker.heartbeat = False
            assert wait_until(lambda: not {p.name: p for p in admin.Processes(apb.ProcessesRequest(), timeout=5).processes}["s0"].up)
            s0 = {p.name: p for p in admin.Processes(apb.ProcessesRequest(), timeout=5).processes}["s0"]
            assert "last heartbeat" in s0.state and s0.heartbeat_age_s >= 3 * HEARTBEAT_S


@pytest.mark.timeout(60)
def test_the_ingress_records_served_traffic_up_to_its_bound(toy: Topology, tmp_path: Path) -> None:
    path = tmp_path / "live.npz"
    worker = FakeWorker(toy, "s0", toy_compute)
    sent = [toy_inputs(b, seed=b) for b in (1, 3, 2, 1, 2)]
    with IngressThread(toy, record=str(path), record_max_count=3) as ing, fake_workers(worker), ing.stub() as stub:
        wait_ready(stub)
        for inputs in sent:
            stub.ModelInfer(raw_request("toy", inputs), timeout=5)
        # the recording stopped at its bound and the file is complete while the ingress still runs
        assert wait_until(lambda: path.is_file())
        assert ing.in_loop(lambda: ing.ingress.recorder.stopped_reason) == "max_count"
    replay = replay_mod.load(path)
    assert replay.model == "toy" and replay.reference == replay_mod.REFERENCE_PIPELINE and len(replay) == 3
    for request, inputs in zip(replay.requests, sent):
        for name in ("x", "ids"):
            np.testing.assert_array_equal(request.inputs[name], inputs[name])
        np.testing.assert_array_equal(request.outputs["y"], toy_compute(inputs)["y"])


@pytest.mark.timeout(60)
@pytest.mark.parametrize("loop", ["closed", "open"])
def test_soak_counts_correct_wrong_and_errors_against_fake_workers(toy: Topology, tmp_path: Path, loop: str) -> None:
    import asyncio

    from pipeline.soak import soak as soak_mod

    requests = []
    for seed in range(4):
        inputs = toy_inputs(1 + seed % 2, seed=seed)
        requests.append(replay_mod.Request(inputs, toy_compute(inputs)))
    requests[3].outputs["y"] = requests[3].outputs["y"] + 1  # a reference the pipeline will not match
    path = replay_mod.write(tmp_path / "toy.npz", "toy", [("x", "float32"), ("ids", "int64")], [("y", "float32")], requests)
    worker = FakeWorker(toy, "s0", toy_compute)
    with IngressThread(toy) as ing, fake_workers(worker), ing.stub() as stub:
        wait_ready(stub)
        config = soak_mod.SoakConfig(
            target=ing.target, replay=path, duration_s=2.0, concurrency=2, rate=50.0 if loop == "open" else 0.0,
            interval_s=0.5, timeout_s=5.0, progress=False,
        )  # fmt: skip
        report = asyncio.run(soak_mod.Soak(config, replay_mod.load(path)).run())
    t = report["totals"]
    assert t["sent"] == t["correct"] + t["wrong"] + sum(t["errors"].values()) + t["lost"]
    assert t["wrong"] >= 1 and t["correct"] >= 3 * t["wrong"] - 3 and t["lost"] == 0 and t["errors"] == {}
    if loop == "open":
        assert 80 <= t["sent"] <= 101  # 50 a second for 2 s
    assert report["wrong_examples"][0]["request"] == 3 and report["wrong_examples"][0]["max_abs_diff"] == pytest.approx(1.0)
    assert not report["verdict"]["ok"] and report["verdict"]["reasons"] == [f"{t['wrong']} wrong answers"]
    assert set(report["processes"]) == {"ingress"}  # fake workers report no memory: only the ingress has some
    assert len(report["intervals"]) == 4 and sum(row["correct"] for row in report["intervals"]) == t["correct"]


# ------------------------------------------------------ against real processes
HEARTBEAT_INTERVAL_S = 0.5  # the topology's default
DEADLINE_S = 3.0  # of the requests in flight when a worker is killed


@dataclass
class Live:
    directory: Path
    logs: Path
    replay: replay_mod.Replay
    procs: dict[str, hs.Proc] = field(default_factory=dict)
    client: hs.Client | None = None

    def connect(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = hs.Client(f"127.0.0.1:{hs.grpc_port(self.procs['ingress'])}")
        hs.wait_for(self.client.ready, hs.START_TIMEOUT_S, "the pipeline to be ready", list(self.procs.values()))

    def request(self, i: int) -> tuple[object, dict[str, np.ndarray]]:
        r = self.replay.requests[i % len(self.replay)]
        return hs.request(self.replay.model, r.inputs), r.outputs

    def assert_correct(self, count: int = 4, timeout_s: float = 10.0) -> None:
        assert self.client is not None
        for i in range(count):
            req, expected = self.request(i)
            got = hs.outputs(self.client.infer.ModelInfer(req, timeout=timeout_s))
            assert hs.bitwise_equal(expected, got), i

    def stats(self, name: str) -> dict[str, float]:
        assert self.client is not None
        return dict(self.client.processes()[name].stats)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    base = tmp_path_factory.mktemp("faults")
    with sock_dir() as sockets:
        directory = hs.join_topology(base / "inception", sockets)
        logs = base / "logs"
        record = hs.start(
            "record",
            [sys.executable, "-m", "pipeline.cli", "record", str(directory), "--count", "8", "--batch", "2", "--out", str(base / "replay.npz")],
            logs,
        )
        procs: dict[str, hs.Proc] = {}
        holder: Live | None = None
        try:
            procs["ingress"] = hs.start_ingress(directory, logs)
            for shard in ("shard0", "shard1", "shard2"):  # one by one, each its own process
                procs[shard] = hs.start_worker(directory, shard, logs)
            assert record.proc.wait(hs.START_TIMEOUT_S) == 0, record.tail()
            holder = Live(directory, logs, replay_mod.load(base / "replay.npz"), procs)
            holder.connect()
            holder.assert_correct()
            yield holder
        finally:
            hs.stop(record)
            for p in (holder.procs if holder else procs).values():
                hs.stop(p)
            if holder and holder.client:
                holder.client.close()


@pytest.mark.timeout(120)
def test_malformed_messages_at_a_worker_are_dropped_and_counted(live: Live) -> None:
    assert live.client is not None
    pid = live.client.processes()["shard2"].pid
    dropped = live.stats("shard2").get("dropped", 0)
    x = live.replay.requests[0].inputs["image"]
    good = pb.Envelope(kind=pb.REQUEST, request_id=77, model=live.replay.model, sender="ingress")
    frames = [bytes(f) for f in codec.encode(good, {"image": x})]
    short = [frames[0], frames[1][:10]]  # header says more bytes than the frame holds
    more_headers = pb.Envelope.FromString(frames[0])
    more_headers.tensors.add(name="image2", dtype="float32", shape=[1], nbytes=4)
    wrong_shape = pb.Envelope.FromString(frames[0])
    wrong_shape.tensors[0].shape[1] += 1
    bad_dtype = pb.Envelope.FromString(frames[0])
    bad_dtype.tensors[0].dtype = "complex128"
    messages = [
        [os.urandom(64)],  # random bytes
        [b""],  # an empty frame
        [b"", b""],  # empty frames
        [os.urandom(16), os.urandom(1000)],
        short,
        [more_headers.SerializeToString(), frames[1]],  # two headers, one frame
        [wrong_shape.SerializeToString(), frames[1]],  # sizes do not match the shape
        [bad_dtype.SerializeToString(), frames[1]],
    ]
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 5000)
    sock.connect(hs.topo.load(live.directory).shard("shard2").endpoint)
    try:
        for message in messages:
            sock.send_multipart(message)
        # the socket stays open until they are counted: closing it with linger 0 could discard unsent ones
        hs.wait_for(
            lambda: live.stats("shard2").get("dropped", 0) >= dropped + len(messages),
            10,
            f"shard2 to count {len(messages)} more dropped messages",
            [live.procs["shard2"]],
        )
    finally:
        sock.close(linger=0)
    assert live.procs["shard2"].alive and live.client.processes()["shard2"].pid == pid
    live.assert_correct()


@pytest.mark.timeout(120)
def test_a_burst_of_very_short_deadlines_all_expire_and_memory_returns_to_base(live: Live) -> None:
    client = live.client
    assert client is not None
    live.assert_correct(16)  # warm
    base = {name: p.rss_bytes for name, p in client.processes().items()}
    futures = []
    for i in range(400):
        req, _ = live.request(i)
        futures.append(client.infer.ModelInfer.future(req, timeout=0.001 * (1 + i % 3)))
    codes = []
    for f in futures:
        try:
            f.result(timeout=10)
            codes.append(grpc.StatusCode.OK)
        except grpc.RpcError as exc:
            codes.append(exc.code())
    assert set(codes) == {grpc.StatusCode.DEADLINE_EXCEEDED}, {c.name: codes.count(c) for c in set(codes)}

    def drained() -> bool:
        procs = client.processes()
        return procs["ingress"].stats["pending"] == 0 and all(
            procs[s].stats.get("pending_joins", 1) == 0 and procs[s].stats.get("queued", 1) == 0 for s in ("shard0", "shard1", "shard2")
        )

    hs.wait_for(drained, 15, "every table and buffer to be empty", list(live.procs.values()), interval_s=0.2)
    time.sleep(2 * HEARTBEAT_INTERVAL_S)  # fresh heartbeats: rss after the burst
    after = {name: p.rss_bytes for name, p in client.processes().items()}
    grown = {n: (after[n] - base[n]) / MIB for n in base if after[n] - base[n] > 32 * MIB}
    assert not grown, f"memory did not return to its base (MiB grown): {grown}"
    live.assert_correct()


@pytest.mark.timeout(180)
def test_the_ingress_killed_and_restarted_while_workers_run(live: Live) -> None:
    assert live.client is not None
    before = {n: p.pid for n, p in live.client.processes().items() if n != "ingress"}
    hs.stop(live.procs["ingress"], signal.SIGKILL)
    time.sleep(1.0)  # workers notice nothing but undelivered heartbeats
    live.procs["ingress"] = hs.start_ingress(live.directory, live.logs)
    started = time.monotonic()
    live.connect()
    live.assert_correct()
    took = time.monotonic() - started
    after = live.client.processes()
    assert {n: after[n].pid for n in before} == before  # the workers kept running: same processes
    assert all(live.procs[n].alive for n in before)
    assert took < 30, took


@pytest.mark.timeout(300)
def test_a_worker_killed_with_sigkill_then_restarted(live: Live) -> None:
    client = live.client
    assert client is not None
    victim = "shard1"  # an entry shard and a producer of the join in shard2
    # `pipeline record` measured how far batching moves a row; a wrong row moves it far more
    assert live.replay.tolerance is not None and live.replay.tolerance < 1e-4, live.replay.tolerance
    pids = {n: p.pid for n, p in client.processes().items()}
    outcomes: list[tuple[str, float, float]] = []  # (code, started, took)
    stop = threading.Event()

    def load(k: int) -> None:
        i = k
        while not stop.is_set():
            req, expected = live.request(i)
            t0 = time.monotonic()
            try:
                got = hs.outputs(client.infer.ModelInfer(req, timeout=DEADLINE_S))
                # concurrent requests are batched together: within the batching tolerance `pipeline record` measured
                code = "OK" if hs.within(expected, got, live.replay.tolerance or 0.0) else "WRONG"
            except grpc.RpcError as exc:
                code = exc.code().name
            outcomes.append((code, t0, time.monotonic() - t0))
            i += 4

    senders = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(4)]
    for t in senders:
        t.start()
    try:
        time.sleep(1.0)
        assert any(c == "OK" for c, _, _ in outcomes), outcomes[:10]
        killed = time.monotonic()
        os.kill(live.procs[victim].proc.pid, signal.SIGKILL)
        hs.wait_for(lambda: not client.ready(), 3 * HEARTBEAT_INTERVAL_S + 1.0, "the ingress to report the pipeline not ready")
        noticed = time.monotonic() - killed
        assert not client.processes()[victim].up
        time.sleep(DEADLINE_S + 1.0)  # every request in flight at the kill has met its deadline
    finally:
        stop.set()
        for t in senders:
            t.join(DEADLINE_S + 5)
    assert not any(t.is_alive() for t in senders), "a request hung past its deadline"
    assert noticed <= 3 * HEARTBEAT_INTERVAL_S + 0.5, noticed
    codes = {c for c, _, _ in outcomes}
    assert codes <= {"OK", "UNAVAILABLE", "DEADLINE_EXCEEDED"}, codes
    late = [(c, round(took, 3)) for c, _, took in outcomes if took > DEADLINE_S + 0.5]
    assert not late, f"requests that ended after their deadline: {late[:10]}"
    after_kill = [c for c, t0, _ in outcomes if t0 > killed + noticed]
    assert after_kill and set(after_kill) == {"UNAVAILABLE"}, set(after_kill)  # at once while a shard is down
    # the join in shard2 does not keep the parts of the requests that died with shard1
    hs.wait_for(lambda: live.stats("shard2").get("pending_joins", 1) == 0, DEADLINE_S + 5, "shard2's join buffer to empty")

    live.procs[victim] = hs.start_worker(live.directory, victim, live.logs)
    hs.wait_for(client.ready, hs.START_TIMEOUT_S, f"{victim} to be up again", [live.procs[victim]])
    up = time.monotonic()
    hs.wait_for(lambda: _answers_correctly(live), 10, "a correct answer after the restart", list(live.procs.values()), interval_s=0.1)
    assert time.monotonic() - up < 5
    live.assert_correct(8)
    after = client.processes()
    assert {n: after[n].pid for n in pids if n != victim} == {n: p for n, p in pids.items() if n != victim}  # nothing else restarted
    assert after[victim].pid != pids[victim] and after[victim].restarts == 1


def _answers_correctly(live: Live) -> bool:
    assert live.client is not None
    req, expected = live.request(0)
    try:
        return hs.bitwise_equal(expected, hs.outputs(live.client.infer.ModelInfer(req, timeout=2)))
    except grpc.RpcError:
        return False
