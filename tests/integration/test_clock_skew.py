"""A worker whose wall clock is 30 s off (libfaketime) still answers correctly and still enforces deadlines.

The join shard ``j`` runs with ``LD_PRELOAD=libfaketime`` and ``FAKETIME=+30s``
or ``-30s`` (``FAKETIME_DONT_FAKE_MONOTONIC=1``: only the wall clock is off,
as on a host without NTP; its monotonic clock is its own anyway). The test
plays the ingress. With deadlines sent as absolute wall-clock times (wire
version 1), ``+30s`` expired every request on arrival and ``-30s`` held a
request whose other part never came for 30 s past its deadline; with
budgets (``budget_ns``, version 2) neither happens.

Topology ``skew``: ``s1`` computes ``a = 2x + 1`` and sends it to ``j``; the
ingress sends ``x`` to both; ``j`` joins them and answers ``out = x + a``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
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
    wait_workers_ready,
)

from pipeline.topology import INGRESS, ShardSpec, TensorSpec, Topology  # noqa: E402

#: Debian's libfaketime (package faketime), the multi-threaded variant (a worker runs several threads).
LIBFAKETIME = next(iter(sorted(Path("/usr/lib").glob("*/faketime/libfaketimeMT.so.1"))), Path("/usr/lib/faketime/libfaketimeMT.so.1"))
SKEW_S = 30.0
HEARTBEAT_S = 0.2
#: the budget of a request whose second part never comes: long enough to see it held, far shorter than the skew.
HELD_BUDGET_S = 2.0
ids = itertools.count(1)

pytestmark = pytest.mark.skipif(
    not LIBFAKETIME.is_file(), reason=f"libfaketime is not installed ({LIBFAKETIME}; Debian package faketime, bin/setup installs it)"
)


def faketime_env(offset: str, *, monotonic_too: bool = False) -> dict[str, str]:
    """Environment that shifts a process's wall clock by ``offset`` (e.g. ``+30s``).

    libfaketime 0.9.10 moves CLOCK_MONOTONIC too by default (to a wall-clock-like value); with
    ``FAKETIME_DONT_FAKE_MONOTONIC=1`` only the wall clock moves, which is the case that broke absolute
    deadlines. ``monotonic_too`` leaves both moved: deadlines must not care either way.
    """
    env = {"LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": offset}
    return env if monotonic_too else {**env, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}


def send(sock: zmq.Socket, rid: int, x: np.ndarray, budget_s: float) -> None:
    """One REQUEST part from the ingress with ``budget_s`` left."""
    send_part(sock, rid, {"x": x}, model="skew", budget_ns=budget_of(budget_s))


def build(directory: Path, sockets: Path, results: str) -> Topology:
    import keras

    x = keras.Input(shape=(4,), name="x")
    keras.Model({"x": x}, {"a": keras.layers.Rescaling(2.0, offset=1.0)(x)}).save(directory / "s1.keras")
    ins = {"x": keras.Input(shape=(4,), name="x"), "a": keras.Input(shape=(4,), name="a")}
    keras.Model(ins, {"out": keras.layers.Add()([ins["x"], ins["a"]])}).save(directory / "j.keras")
    spec = lambda n: TensorSpec(n, "float32", (-1, 4))  # noqa: E731

    def shard(name: str, inputs: tuple[str, ...], outputs: dict[str, tuple[str, ...]]) -> ShardSpec:
        return ipc_shard(name, inputs, outputs, f"ipc://{sockets}/skew-{name}", batching=SMALL_BATCHES)

    return played_topology(
        "skew",
        directory,
        inputs=(spec("x"),),
        outputs=(spec("out"),),
        tensors={n: spec(n) for n in ("x", "a", "out")},
        shards=(shard("s1", ("x",), {"a": ("j",)}), shard("j", ("x", "a"), {"out": (INGRESS,)})),
        results=results,
        heartbeat_s=HEARTBEAT_S,
    )


class Skewed:
    """Two workers (``j`` with its wall clock off), the test as their ingress."""

    def __init__(self, ctx: zmq.Context, topology: Topology, ingress: FakeIngress, workers: dict[str, WorkerProcess]) -> None:
        self.ctx, self.topology, self.ingress, self.workers = ctx, topology, ingress, workers
        self.push = {s.name: pusher(ctx, s.endpoint) for s in topology.shards}

    def alive(self) -> None:
        for name, w in self.workers.items():
            if not w.alive:
                pytest.fail(f"worker {name} exited with {w.returncode}:\n{w.tail()}")

    def close(self) -> None:
        for sock in self.push.values():
            sock.close(linger=0)


@pytest.fixture(
    params=[("+30s", False), ("-30s", False), ("+30s", True)], ids=["ahead", "behind", "ahead-monotonic-moved-too"]
)
def skewed(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Skewed]]:
    offset, monotonic_too = request.param
    sockdir = Path(tempfile.mkdtemp(prefix="sk-", dir="/tmp"))  # ipc paths must stay short
    ctx = zmq.Context()
    ingress = FakeIngress(ctx).start()
    workers: dict[str, WorkerProcess] = {}
    fleet = None
    try:
        topology = build(tmp_path, sockdir, ingress.endpoint)
        workers["s1"] = start_worker(tmp_path, "s1", tmp_path)
        workers["j"] = start_worker(tmp_path, "j", tmp_path, env=faketime_env(offset, monotonic_too=monotonic_too))
        fleet = Skewed(ctx, topology, ingress, workers)
        wait_workers_ready(ingress, list(workers), lambda _name: fleet.alive())
        yield offset, fleet
    finally:
        if fleet is not None:
            fleet.close()
        stop_workers(list(workers.values()))
        ingress.close()
        ctx.term()
        shutil.rmtree(sockdir, ignore_errors=True)


def test_faketime_shifts_pythons_wall_clock_and_not_its_monotonic_one() -> None:
    """The environment the test uses really moves ``time.time()`` (and, with DONT_FAKE_MONOTONIC, nothing else)."""
    probe = "import time; print(time.time(), time.monotonic())"
    for offset, sign in (("+30s", 1), ("-30s", -1)):
        before_wall, before_mono = time.time(), time.monotonic()
        out = subprocess.run(
            [sys.executable, "-c", probe], env={**os.environ, **faketime_env(offset)}, capture_output=True, text=True, timeout=60, check=True
        ).stdout.split()
        wall, mono = float(out[0]), float(out[1])
        assert abs((wall - before_wall) - sign * SKEW_S) < 10, (offset, wall - before_wall)
        assert 0 <= mono - before_mono < 10, (offset, mono - before_mono)  # the monotonic clock is the real one
    moved = subprocess.run(
        [sys.executable, "-c", probe], env={**os.environ, **faketime_env("+30s", monotonic_too=True)}, capture_output=True, text=True, timeout=60, check=True
    ).stdout.split()
    assert abs(float(moved[1]) - time.monotonic()) > 1000, "libfaketime was expected to move the monotonic clock too by default"


def test_answers_stay_correct_and_deadlines_stay_enforced_with_a_skewed_clock(skewed: tuple[str, Skewed]) -> None:
    offset, fleet = skewed
    sign = 1 if offset.startswith("+") else -1
    rng = np.random.default_rng(0)

    # 1. answers: the request's parts reach j with a 5 s budget, whatever its clock says
    for _ in range(10):
        rid = next(ids)
        x = rng.normal(size=(2, 4)).astype(np.float32)
        send(fleet.push["s1"], rid, x, budget_s=5.0)
        send(fleet.push["j"], rid, x, budget_s=5.0)
        out = fleet.ingress.result_tensors(rid, ["out"])["out"]
        np.testing.assert_array_equal(out, x + (x * np.float32(2.0) + np.float32(1.0)))
    # j's wall clock really is off: its messages are stamped SKEW_S away from ours
    message = fleet.ingress.results[rid][0]
    skew_s = (message.envelope.sent_ns - time.time_ns()) / 1e9
    assert abs(skew_s - sign * SKEW_S) < 5, f"expected j's clock {offset} off, its messages say {skew_s:+.1f} s"
    hop = next(s for s in message.envelope.spans if s.name == "s1->j.hop")
    assert abs((hop.end_ns - hop.start_ns) / 1e9 - sign * SKEW_S) < 5  # what a span between skewed hosts shows

    # 2. a request whose other part never comes is held (not expired on arrival) and expires with its budget
    before = dict(fleet.ingress.heartbeat("j").stats)
    rid = next(ids)
    send(fleet.push["j"], rid, np.ones((1, 4), np.float32), budget_s=HELD_BUDGET_S)
    held = fleet.ingress.wait(
        lambda: fleet.ingress.errors.get(rid) or any(hb.stats["pending_joins"] >= 1 for hb in fleet.ingress.history("j")[-3:]),
        REPLY_TIMEOUT_S,
        "j to hold the lone part (or to answer)",
    )
    assert held is True, f"j answered at once instead of holding the part: {fleet.ingress.errors[rid][0].envelope.error}"
    # bounded by far less than the skew: a worker 30 s behind would keep it 30 s past its deadline
    error = fleet.ingress.error(rid, timeout_s=HELD_BUDGET_S + 8)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and error.origin == "j"
    assert "other parts" in error.message, error.message
    after = fleet.ingress.heartbeat("j", lambda hb: hb.stats["pending_joins"] == 0 and hb.stats["join_expired"] > before["join_expired"])
    assert after.stats["computed"] == before["computed"]

    # 3. a budget already spent is refused at once, never computed
    rid = next(ids)
    send_part(fleet.push["j"], rid, {"x": np.ones((1, 4), np.float32)}, model="skew", budget_ns=-1)
    error = fleet.ingress.error(rid)
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED.value[0] and "before the request could be computed" in error.message
    fleet.alive()
