"""Replicas of a shard (issue 16): the topology section, its errors, names, editing, routing and liveness."""

from __future__ import annotations

import collections
import copy
import random
import re
from pathlib import Path
from typing import Any

import pytest

from pipeline import replicas
from pipeline import topology as topo
from pipeline.errors import TopologyError, UsageError
from pipeline.launch import free_ports

#: every port the topologies below name, drawn free once (no test here binds them: they are addresses in a file)
_KEYS = ("grpc", "results", "ingress_metrics", "shard0", "shard1", "shard2", "metrics0", "metrics1", "metrics2", "replica", "replica_metrics", "stray")
PORT = dict(zip(_KEYS, free_ports(len(_KEYS))))


def _ep(key: str) -> str:
    return f"tcp://127.0.0.1:{PORT[key]}"


def _m(key: str) -> str:
    return f"127.0.0.1:{PORT[key]}"


def _data() -> dict[str, Any]:
    """A 3-shard chain: ingress -> shard0 -> shard1 -> shard2 -> ingress."""
    tensor = {"dtype": "float32", "shape": [-1, 4]}
    return {
        "version": 1,
        "name": "m",
        "inputs": [{"name": "x", **tensor}],
        "outputs": [{"name": "y", **tensor}],
        "ingress": {"grpc": _m("grpc"), "results": _ep("results"), "metrics": _m("ingress_metrics")},
        "shards": [
            {
                "name": f"shard{i}",
                "file": f"shard{i}.keras",
                "endpoint": _ep(f"shard{i}"),
                "metrics": _m(f"metrics{i}"),
                "inputs": [["x", "a", "b"][i]],
                "outputs": [{"name": ["a", "b", "y"][i], "consumers": [["shard1", "shard2", "ingress"][i]]}],
            }
            for i in range(3)
        ],
        "tensors": {"a": tensor, "b": tensor},
    }


def _load(data: dict[str, Any], tmp_path: Path) -> topo.Topology:
    t = topo.from_dict(data, directory=tmp_path)
    topo.validate(t, check_files=False)
    return t


def _with_two(data: dict[str, Any]) -> dict[str, Any]:
    data = copy.deepcopy(data)
    data["shards"][1]["replicas"] = [
        {"endpoint": _ep("shard1"), "metrics": _m("metrics1")},
        {"endpoint": _ep("replica"), "metrics": _m("replica_metrics")},
    ]
    return data


def test_old_files_load_unchanged(tmp_path: Path) -> None:
    t = _load(_data(), tmp_path)
    assert all(len(s.replicas) == 1 and not s.extra_replicas for s in t.shards)
    assert "replicas" not in str(t.to_dict())
    assert list(replicas.replica_processes(t)) == ["shard0", "shard1", "shard2"]
    one = copy.deepcopy(_data())
    one["shards"][1]["replicas"] = 1
    assert _load(one, tmp_path).shard("shard1").replicas == t.shard("shard1").replicas


def test_two_replicas_round_trip_and_names(tmp_path: Path) -> None:
    t = _load(_with_two(_data()), tmp_path)
    s = t.shard("shard1")
    assert [r.endpoint for r in s.replicas] == [_ep("shard1"), _ep("replica")]
    assert replicas.process_names(s) == ["shard1@0", "shard1@1"]
    assert replicas.shard_of(t, "shard1@1") == ("shard1", 1)
    assert replicas.metrics_of(t, "shard1@1") == _m("replica_metrics")
    again = _load(t.to_dict(), tmp_path)
    assert again.shard("shard1").replicas == s.replicas
    mine = replicas.for_replica(t, "shard1", 1).shard("shard1")
    assert (mine.endpoint, mine.metrics, len(mine.replicas)) == (_ep("replica"), _m("replica_metrics"), 2)
    with pytest.raises(UsageError, match="shard 'shard1' has 2 replica"):
        replicas.for_replica(t, "shard1", 2)
    assert replicas.expand(t, ["ingress", "shard0", "shard1", "shard2"]) == ["ingress", "shard0", "shard1@0", "shard1@1", "shard2"]
    assert replicas.worker_selector(t, "shard1@1") == ["--shard", "shard1", "--replica", "1"]
    assert replicas.worker_selector(t, "shard0") is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (0, r"shard 'shard1' has replicas: 0; expected at least 1"),
        (-2, r"shard 'shard1' has replicas: -2; expected at least 1"),
        (3, r"shard 'shard1' has replicas: 3 without their addresses.*pipeline replicas DIR shard1=3"),
        ([], r"shard 'shard1' has replicas: \[\]"),
        ("two", r"shard 'shard1' has replicas: 'two'"),
        ([{"endpoint": _ep("stray")}], r"shard 'shard1' replicas\[0\] has endpoint .*expected the shard's own"),
        ([{"metrics": "x"}], r"replicas\[0\] \(shard 'shard1'\): missing key 'endpoint'"),
    ],
)
def test_bad_counts_and_lists_name_the_shard(tmp_path: Path, value: Any, message: str) -> None:
    data = _data()
    data["shards"][1]["replicas"] = value
    with pytest.raises(TopologyError, match=message):
        _load(data, tmp_path)


@pytest.mark.parametrize(
    ("endpoint", "metrics", "message"),
    [
        (_ep("shard2"), _m("replica_metrics"), r"shard 'shard1' replica 1 has endpoint '{endpoint}', which shard 'shard2'"),
        (_ep("results"), _m("replica_metrics"), r"shard 'shard1' replica 1 has endpoint .*which the ingress"),
        (_ep("shard1"), _m("replica_metrics"), r"shard 'shard1' replica 1 has endpoint .*which shard 'shard1' already"),
        (_ep("replica"), _m("metrics0"), r"shard 'shard1' replica 1 has metrics address '{metrics}', which shard 'shard0'"),
        ("ipc:///tmp/x", "", r"shard 'shard1' replica 1 has endpoint 'ipc:///tmp/x'; expected tcp"),
    ],
)
def test_colliding_replica_addresses_name_the_shard(tmp_path: Path, endpoint: str, metrics: str, message: str) -> None:
    data = _with_two(_data())
    data["shards"][1]["replicas"][1] = {"endpoint": endpoint, "metrics": metrics}
    message = message.replace("{endpoint}", re.escape(endpoint)).replace("{metrics}", re.escape(metrics))
    with pytest.raises(TopologyError, match=message):
        _load(data, tmp_path)


def test_a_replicated_shard_cannot_share_a_process(tmp_path: Path) -> None:
    data = _with_two(_data())
    data["processes"] = [{"name": "p", "shards": ["shard0", "shard1"]}, {"name": "shard2", "shards": ["shard2"]}]
    with pytest.raises(TopologyError, match=r"shard 'shard1' has 2 replicas but shares process 'p'"):
        _load(data, tmp_path)


def test_parse_counts() -> None:
    assert replicas.parse_counts(["shard1=3", "shard2=1"]) == {"shard1": 3, "shard2": 1}
    for bad, message in (("shard1", "expected SHARD=N"), ("shard1=0", "at least 1 replica, received 0"), ("shard1=-1", "received -1"), ("shard1=x", "received 'x'")):
        with pytest.raises(UsageError, match=message):
            replicas.parse_counts([bad])


def test_with_replicas_adds_fresh_ports_and_shrinks(tmp_path: Path) -> None:
    t = _load(_data(), tmp_path)
    with pytest.raises(TopologyError, match="no shard named 'nope'"):
        replicas.parse_counts(["nope=2"], t)
    three = replicas.with_replicas(t, {"shard1": 3})
    s = three.shard("shard1")
    assert len(s.replicas) == 3 and s.replicas[0].endpoint == t.shard("shard1").endpoint
    assert len({r.endpoint for r in s.replicas}) == 3 and all(r.metrics for r in s.replicas)
    again = _load(three.to_dict(), tmp_path)  # what `pipeline replicas` writes loads back
    assert again.shard("shard1").replicas == s.replicas
    two = replicas.with_replicas(three, {"shard1": 2})
    assert two.shard("shard1").replicas == s.replicas[:2]
    assert replicas.with_replicas(two, {"shard1": 1}).shard("shard1") == t.shard("shard1")


def test_rendezvous_is_the_same_in_every_producer_and_spreads() -> None:
    names = ["shard1@0", "shard1@1", "shard1@2"]
    a, b = replicas.Router(names), replicas.Router(list(names))
    rng = random.Random(7)
    ids = [rng.getrandbits(63) for _ in range(6000)]
    picks = [a.pick(i, lambda k: True) for i in ids]
    assert picks == [b.pick(i, lambda k: True) for i in ids]  # two producers agree without talking
    counts = [picks.count(k) for k in range(3)]
    assert all(1700 < c < 2300 for c in counts), counts
    # replica 1 down: only its requests move, and they spread over the others
    moved = [a.pick(i, lambda k: k != 1) for i in ids]
    assert all(m == p for m, p in zip(moved, picks) if p != 1)
    assert {m for m, p in zip(moved, picks) if p == 1} == {0, 2}
    assert a.pick(ids[0], lambda k: False) is None
    assert replicas.Router(["s"]).order(123) == [0]


def test_replica_liveness_is_per_shard_up_while_one_replica_is(tmp_path: Path) -> None:
    t = _load(_with_two(_data()), tmp_path)
    live = replicas.liveness(t, down_after_s=1.0)
    assert live.shards == ["shard0", "shard1@0", "shard1@1", "shard2"]
    for name in ("shard0", "shard1@0", "shard2"):
        live.beat(name, True, 10, now=100.0)
    assert live.not_up(now=100.1) == {}
    assert live.went_down(now=100.1) == []
    assert set(live.replicas_not_up(now=100.1)) == {"shard1@1"}
    assert live.all_up(now=100.1)
    assert live.not_up(now=101.5)["shard1"].startswith("shard1@0: last heartbeat")
    live.beat("shard1@1", True, 11, now=101.4)
    assert "shard1" not in live.not_up(now=101.5)
    assert live.went_down(now=101.5) == ["shard0", "shard1@0", "shard2"]  # edges per replica


def test_the_ingress_chooses_ids_whose_replicas_are_up_and_less_loaded() -> None:
    routers = [replicas.Router(["a@0", "a@1"]), replicas.Router(["b@0", "b@1", "b@2"]), replicas.Router(["c"])]
    ids = iter(range(1, 10_000))
    up = {"a@0", "b@1", "b@2"}
    for _ in range(300):
        rid = replicas.choose_id(lambda: next(ids), routers, lambda n: n in up)
        assert routers[0].names[routers[0].order(rid)[0]] == "a@0" and routers[1].order(rid)[0] in (1, 2)
    # power of two choices: with b@2 far busier, most ids go to b@1 (not all: only two are compared)
    load = {"a@0": 0.0, "b@1": 0.0, "b@2": 50.0}
    picks = collections.Counter(
        routers[1].names[routers[1].order(replicas.choose_id(lambda: next(ids), routers, lambda n: n in up, load.get))[0]]
        for _ in range(600)
    )
    assert picks["b@1"] > 2 * picks["b@2"] > 0, picks
    # nothing up: the last id drawn (its request fails fast at a producer and is retried)
    assert replicas.choose_id(lambda: next(ids), routers, lambda n: False) > 0
    assert replicas.unreachable_in("shard 's0' cannot reach replica 'b@1': not connected") == "b@1"
    assert replicas.unreachable_in("shard 's0' cannot reach 'b' at tcp://x:1") is None


def test_a_suspect_replica_is_down_for_routing_but_ends_nothing(tmp_path: Path) -> None:
    t = _load(_with_two(_data()), tmp_path)
    live = replicas.liveness(t, down_after_s=1.0)
    for name in ("shard0", "shard1@0", "shard1@1", "shard2"):
        live.beat(name, True, 10, now=100.0)
    assert live.went_down(now=100.1) == []
    live.suspect("shard1@1", now=100.1)
    assert not live.is_up("shard1@1", now=100.2) and live.is_up("shard1@0", now=100.2)
    assert live.replicas_not_up(now=100.2) == {"shard1@1": "a producer could not reach it"}
    assert live.went_down(now=100.2) == []  # requests in flight are not ended for a suspicion
    live.beat("shard1@1", True, 10, now=100.9)
    assert live.is_up("shard1@1", now=101.2)  # the suspicion lasts down_after_s


def test_procfile_has_a_line_per_replica(tmp_path: Path) -> None:
    from pipeline.procfile import lines

    out = lines(_load(_with_two(_data()), tmp_path), "DIR")
    assert "shard1_r1: exec pipeline worker DIR --shard shard1 --replica 1" in out
    assert "shard1_r0: exec pipeline worker DIR --shard shard1 --replica 0" in out
    assert "shard0: exec pipeline worker DIR --shard shard0" in out and len(out) == 5


def test_processes_on_a_host_follow_each_replica(tmp_path: Path) -> None:
    """A replica on another host runs there: Procfile lines and systemd units per host follow its entry."""
    from pipeline.procfile import lines

    data = _with_two(_data())
    data["shards"][1]["replicas"][1] = {"endpoint": "tcp://127.0.0.2:5562", "metrics": "127.0.0.2:9112"}
    t = _load(data, tmp_path)
    assert replicas.processes_on(t, None) == ["ingress", "shard0", "shard1@0", "shard1@1", "shard2"]
    assert replicas.processes_on(t, "127.0.0.1") == ["ingress", "shard0", "shard1@0", "shard2"]
    assert replicas.processes_on(t, "127.0.0.2") == ["shard1@1"]
    assert replicas.hosts_of(t) == ["127.0.0.1", "127.0.0.2"]
    assert lines(t, "DIR", host="127.0.0.2") == ["shard1_r1: exec pipeline worker DIR --shard shard1 --replica 1"]
    assert "shard1_r1: exec pipeline worker DIR --shard shard1 --replica 1" not in lines(t, "DIR", host="127.0.0.1")
