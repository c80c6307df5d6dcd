"""Pipelines over three hosts (network namespaces on one bridge), queried from the ingress's host.

- a model with a join whose producers sit on three different hosts answers
  what the whole model answers, bitwise, one request at a time;
- a worker on a remote host killed (SIGKILL) and restarted under load: no
  wrong answer, errors only around the outage, correct answers after it;
- a link taken down for a few seconds under load: errors within each
  request's deadline, nothing wrong or lost, recovery once it is back with no
  process restarted;
- ``security: curve`` across the hosts;
- MobileNetV3Large in three shards over the three hosts, bitwise.

The load client runs inside the ingress's host (``tests/multihost/load.py``),
and every request is logged with its wall-clock start and end (all
namespaces share the machine's clock).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import process
from pipeline import topology as topo
from tests.multihost import hosts as mh
from tests.netns import Network

TESTS = Path(__file__).resolve().parents[1]
#: deadline of each request under load: short, so the outage tests see errors come back well within a test.
DEADLINE_S = 3.0
#: a comparison under load accepts this much (dynamic batching may change the last bits); references must differ by far more.
TOLERANCE = 1e-5
#: the toy models' compute is microseconds; at this relative speed it weighs like a real model's, so that the
#: planner spreads them over the hosts (see tests/multihost/hosts.cluster_file).
TOY_SPEED = 0.001


def _model_file(directory: Path, builder: str) -> Path:
    path = directory / f"{builder}.keras"
    subprocess.run(
        [sys.executable, "-c", f"import models; models.{builder}().save({str(path)!r})"],
        cwd=TESTS, check=True, timeout=300, capture_output=True,
    )  # fmt: skip
    return path


def join_directory(base: Path) -> Path:
    """``tests.models.inception`` cut after branch_a and branch_b2 (a join of three producers in shard2)."""
    source = _model_file(base, "inception")
    return mh.partition(source, base / "inception", "--cut", "branch_a", "--cut", "branch_b2")


def placed_join(net: Network, base: Path, *place_args: str) -> tuple[topo.Topology, dict[str, str]]:
    """The join model cut by hand, its hosts chosen by ``pipeline place --cluster`` (the namespaces' addresses)."""
    directory = join_directory(base)
    cluster = mh.cluster_file(net, base / "cluster.yaml", speed=TOY_SPEED)
    t = mh.place(directory, cluster, *place_args)
    hosts = mh.hosts_of(t)
    assert hosts[topo.INGRESS] == "h1", hosts
    assert len(set(hosts.values())) >= 2, f"the planner kept the join on one host, nothing crosses a link: {hosts}"
    return t, hosts


def remote_producer(run: mh.MultiHost) -> str:
    """The worker process holding a shard on another host than the ingress's whose output another shard takes
    (a join's producer if any); with a cluster file the shards of a host share one process."""
    from pipeline import colocation

    return colocation.process_of(run.topology, remote_producer_shard(run)).name


def remote_producer_shard(run: mh.MultiHost) -> str:
    """That shard (:func:`remote_producer`)."""
    t = run.topology
    consumed = {name for s in t.shards for name in s.inputs}
    remote = [s for s in t.shards if run.hosts[s.name] != run.ingress_host]
    assert remote, f"every shard is on the ingress's host: {run.hosts}"
    producers = [s.name for s in remote if set(s.output_names) & consumed]
    return (producers or [s.name for s in remote])[0]


@pytest.fixture(scope="module")
def network3() -> Iterator[Network]:
    from tests.multihost.conftest import netns_reason

    reason = netns_reason()
    if reason:
        pytest.skip(reason)
    net = Network(3).create()
    try:
        yield net
    finally:
        left = net.destroy()
        assert not left, f"namespaces left: {left}"


@pytest.fixture(scope="module")
def join_pipeline(network3: Network, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[mh.MultiHost, Path]]:
    """The join model placed over the three hosts by ``pipeline place --cluster``, and a replay of 24 requests."""
    base = tmp_path_factory.mktemp("join3")
    t, hosts = placed_join(network3, base)
    replay = mh.record(t.directory, base / "replay.npz", 24)
    with mh.MultiHost(network3, t, base / "logs", hosts, worker_args=["--threads", "1"]) as run:
        yield run, replay


def _spread_ok(replay: Path, tolerance: float) -> float:
    spread = mh.reference_spread(replay)
    assert spread > 100 * max(tolerance, 1e-7), f"reference outputs of different inputs differ by only {spread}: the comparison could not fail"
    return spread


def _pids(run: mh.MultiHost) -> dict[str, int]:
    assert run.cluster is not None
    return {name: p.pid for name, p in run.cluster.procs.items()}


def _run_load_around(run: mh.MultiHost, replay: Path, out: Path, fault, settle_s: float = 6.0) -> list[dict]:  # type: ignore[no-untyped-def]
    """Load at concurrency 4 from the ingress host; ``fault()`` runs once answers flow; stop ``settle_s`` after it returns."""
    load = run.start_load(replay, out, concurrency=4, duration=900, timeout=DEADLINE_S, grace=5, tolerance=TOLERANCE)
    try:
        mh.wait(lambda: any(r["code"] == "OK" for r in _records(out)) or not load.alive, 60, "answers under load")
        assert load.alive, load.tail()
        window = fault()
        time.sleep(settle_s)
        load.send_signal(signal.SIGTERM)
        assert load.wait(DEADLINE_S + 15) == 0, load.tail()
    finally:
        load.stop(timeout_s=5)
    return window


def _records(path: Path) -> list[dict]:
    try:
        return mh.read_records(path)
    except (OSError, ValueError):
        return []


# ------------------------------------------------------------------ correctness
@pytest.mark.timeout(900)
def test_a_join_whose_producers_sit_on_three_hosts_answers_bitwise(join_pipeline: tuple[mh.MultiHost, Path], tmp_path: Path) -> None:
    run, replay = join_pipeline
    _spread_ok(replay, 0.0)
    records = run.load(replay, tmp_path / "bitwise.jsonl", concurrency=1, count=24, timeout=30)
    assert mh.counts(records) == {"correct": 24}, [r for r in records if r["code"] != "OK" or r["wrong"]][:5]
    assert {r["i"] for r in records} == set(range(24))


# ------------------------------------------------------------------ faults
@pytest.mark.timeout(900)
def test_a_remote_worker_killed_and_restarted_under_load(join_pipeline: tuple[mh.MultiHost, Path], tmp_path: Path) -> None:
    run, replay = join_pipeline
    assert run.cluster is not None
    _spread_ok(replay, TOLERANCE)
    victim = remote_producer(run)  # on another host than the ingress's, feeding another shard
    out = tmp_path / "kill.jsonl"

    def fault() -> tuple[float, float]:
        killed = time.time()
        run.cluster.stop_process(victim, signal.SIGKILL)
        time.sleep(2.0)
        run.cluster.start_process(victim)
        mh.wait(run.ready, 300, f"{victim} to be up again")
        return killed, time.time()

    before = _pids(run)
    killed, back = _run_load_around(run, replay, out, fault)
    records = mh.read_records(out)
    counts = mh.counts(records)
    print(f"\nkill-restart: {counts}; outage {back - killed:.1f} s")
    assert counts.get("wrong", 0) == 0 and counts.get("LOST", 0) == 0, counts
    assert set(counts) <= {"correct", "UNAVAILABLE", "DEADLINE_EXCEEDED"}, counts
    errors = [r for r in records if r["code"] != "OK"]
    assert errors, "killing a worker under load produced no error at all: was it killed?"
    # errors only around the outage: from requests in flight at the kill to the restart
    outside = [r for r in errors if r["end"] < killed or r["start"] > back + 1.0]
    assert not outside, outside[:5]
    assert all(r["end"] - r["start"] <= DEADLINE_S + 1.0 for r in records), "a request outlived its deadline"
    after = [r for r in records if r["start"] > back + 1.0]
    assert after and all(r["code"] == "OK" and not r["wrong"] for r in after), after[:5]
    assert {k: v for k, v in _pids(run).items() if k != victim} == {k: v for k, v in before.items() if k != victim}


@pytest.mark.timeout(900)
def test_a_link_down_for_seconds_under_load_errors_within_deadlines_and_recovers(
    join_pipeline: tuple[mh.MultiHost, Path], tmp_path: Path
) -> None:
    run, replay = join_pipeline
    _spread_ok(replay, TOLERANCE)
    net = run.network
    out = tmp_path / "link.jsonl"
    down_s = 4.0
    cut_off = run.hosts[remote_producer_shard(run)]  # a host other than the ingress's, holding a producer

    def fault() -> tuple[float, float]:
        down = time.time()
        net.link_down(cut_off)  # its consumers and the ingress on h1 lose it
        try:
            time.sleep(down_s)
        finally:
            net.link_up(cut_off)
        up = time.time()
        mh.wait(run.ready, 60, "every shard up again once the link is back")
        return down, up

    before = _pids(run)
    down, up = _run_load_around(run, replay, out, fault, settle_s=8.0)
    records = mh.read_records(out)
    counts = mh.counts(records)
    print(f"\nlink-down {down_s:.0f} s: {counts}")
    assert counts.get("wrong", 0) == 0 and counts.get("LOST", 0) == 0, counts
    assert set(counts) <= {"correct", "UNAVAILABLE", "DEADLINE_EXCEEDED"}, counts
    assert counts.get("UNAVAILABLE", 0) + counts.get("DEADLINE_EXCEEDED", 0) > 0, "no error while a link was down"
    # every request ended within its deadline (plus scheduling slack), none hung
    late = [r for r in records if r["end"] - r["start"] > DEADLINE_S + 1.0]
    assert not late, late[:5]
    errors = [r for r in records if r["code"] != "OK"]
    outside = [r for r in errors if r["end"] < down or r["start"] > up + 3.0]
    assert not outside, outside[:5]
    tail = [r for r in records if r["start"] > up + 3.0]
    assert tail and all(r["code"] == "OK" and not r["wrong"] for r in tail), tail[:5]
    assert _pids(run) == before, "a process was restarted"
    assert all(p.alive for p in run.cluster.procs.values())  # type: ignore[union-attr]


# ------------------------------------------------------------------ security
@pytest.mark.timeout(900)
def test_curve_across_three_hosts(network3: Network, tmp_path: Path) -> None:
    # other ports than the join pipeline's, which runs on the same hosts for the whole module
    t, hosts = placed_join(network3, tmp_path, "--base-port", "6550", "--grpc-address", f"{network3.host('h1').address}:6001")
    result = subprocess.run(process.pipeline_command("keys", str(t.directory)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    t = topo.load(t.directory)
    replay = mh.record(t.directory, tmp_path / "replay.npz", 8)
    assert t.security == "curve" and all(s.curve_public_key for s in t.shards)
    with mh.MultiHost(network3, t, tmp_path / "logs", hosts, worker_args=["--threads", "1"]) as run:
        records = run.load(replay, tmp_path / "curve.jsonl", concurrency=1, count=8, timeout=30)
    _spread_ok(replay, 0.0)
    assert mh.counts(records) == {"correct": 8}, records[:3]


# ------------------------------------------------------------------ the default model
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_mobilenet_v3_large_in_three_shards_over_three_hosts_answers_bitwise(network3: Network, tmp_path: Path) -> None:
    # cut and placed together by the planner, from a cluster file with the namespaces' addresses (1 Gbit links)
    cluster = mh.cluster_file(network3, tmp_path / "cluster.yaml")
    directory = mh.partition(
        # one process per shard, each with the workers' one TensorFlow thread, as the reference: a host whose
        # shards shared a process would run them on more threads, which moves the last bits (~6e-10)
        "MobileNetV3Large", tmp_path / "mnv3", "--cluster", str(cluster), "--shards", "3", "--per-shard",
        "--base-port", "7550", "--grpc-address", f"{network3.host('h1').address}:7001", timeout_s=1200,
    )  # fmt: skip
    replay = mh.record(directory, tmp_path / "replay.npz", 4)
    t = topo.load(directory)
    placement = mh.hosts_of(t)
    assert placement[topo.INGRESS] == "h1" and len(set(placement.values())) >= 2, placement
    run = mh.MultiHost(network3, t, tmp_path / "logs", placement)
    try:
        run.start(timeout_s=600)
        records = run.load(replay, tmp_path / "mnv3.jsonl", concurrency=1, count=4, timeout=60)
    finally:
        run.stop()
    assert mh.counts(records) == {"correct": 4}, [r for r in records if r["code"] != "OK" or r["wrong"]]
    # calibrated BatchNormalization (issue #11): the answers of different inputs differ, so a mix-up would show
    assert _spread_ok(replay, 0.0) > 1e-5
