"""Replicas found by DNS (``replicas: {count: N, discover: dns}``): the topology, its errors, DNS-set diffing,
a producer's sockets following resolutions, the watcher, and the ingress's liveness of replicas it learns."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import zmq

from pipeline import discovery, replicas
from pipeline import topology as topo
from pipeline.errors import TopologyError

from tests.unit.test_replica_routing import _data, _load


def _discovered(data: dict[str, Any], count: Any = 3, endpoint: str = "tcp://m-shard1.ml.svc.cluster.local:5555") -> dict[str, Any]:
    data = copy.deepcopy(data)
    data["shards"][1]["endpoint"] = endpoint
    data["shards"][1]["metrics"] = "m-shard1.ml.svc.cluster.local:9100"
    data["shards"][1]["replicas"] = {"count": count, "discover": "dns"}
    return data


def test_the_topology_section_round_trips(tmp_path: Path) -> None:
    t = _load(_discovered(_data()), tmp_path)
    spec = t.shard("shard1")
    assert spec.discovered == 3 and not spec.extra_replicas and len(spec.replicas) == 1
    assert replicas.discovered(t) == {"shard1": 3} and replicas.replicated(t) == {}
    assert t.to_dict()["shards"][1]["replicas"] == {"count": 3, "discover": "dns"}
    again = topo.from_dict(t.to_dict(), directory=tmp_path)
    assert again.shard("shard1").discovered == 3
    assert "replicas" not in t.to_dict()["shards"][0]  # other shards unchanged
    # names: shard@address, metrics at the address and the shard's metrics port
    assert replicas.discovered_shard(t, "shard1@10.0.0.5") == ("shard1", "10.0.0.5")
    assert replicas.discovered_shard(t, "shard0@10.0.0.5") is None and replicas.discovered_shard(t, "shard1") is None
    assert replicas.metrics_of(t, "shard1@10.0.0.5") == "10.0.0.5:9100"
    assert replicas.metrics_of(t, "shard1@fd00::5") == "[fd00::5]:9100"


@pytest.mark.parametrize(
    ("replicas_value", "endpoint", "message"),
    [
        ({"count": 0, "discover": "dns"}, None, r"shard 'shard1' has replicas: .*expected \{count: N, discover: dns\} with N >= 1"),
        ({"count": -2, "discover": "dns"}, None, r"shard 'shard1'.*N >= 1"),
        ({"count": "3", "discover": "dns"}, None, r"shard 'shard1'.*N >= 1"),
        ({"count": 2, "discover": "mdns"}, None, r"shard 'shard1'.*discover: dns"),
        ({"count": 2, "discover": "dns", "ttl": 5}, None, r"shard 'shard1'.*discover: dns"),
        ({"count": 2, "discover": "dns"}, "tcp://10.0.0.5:5555", r"shard 'shard1' .*expected tcp://NAME:PORT whose NAME resolves"),
        ({"count": 2, "discover": "dns"}, "ipc:///tmp/s1", r"shard 'shard1' .*expected tcp://NAME:PORT"),
    ],
)
def test_bad_sections_name_the_shard(tmp_path: Path, replicas_value: Any, endpoint: str | None, message: str) -> None:
    data = _discovered(_data())
    data["shards"][1]["replicas"] = replicas_value
    if endpoint:
        data["shards"][1]["endpoint"] = endpoint
    with pytest.raises(TopologyError, match=message):
        _load(data, tmp_path)


def test_a_discovered_shard_runs_alone_in_its_process(tmp_path: Path) -> None:
    data = _discovered(_data())
    data["processes"] = [{"name": "both", "shards": ["shard1", "shard2"]}]
    with pytest.raises(TopologyError, match=r"shard 'shard1' has 3 replicas but shares process 'both'"):
        _load(data, tmp_path)


def test_diff_of_two_views() -> None:
    assert discovery.diff(["a", "b"], ["b", "c", "d"]) == discovery.Change(("c", "d"), ("a",))
    assert not discovery.diff(["a"], ["a"])
    assert discovery.endpoint_at("tcp://svc.ns.svc:5555", "10.1.2.3") == "tcp://10.1.2.3:5555"
    assert discovery.endpoint_at("tcp://svc.ns.svc:5555", "fd00::1") == "tcp://[fd00::1]:5555"


class FakeSocket:
    """A PUSH socket's double: connected or not, closed or not."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint
        self.up = True
        self.closed = False

    def getsockopt(self, option: int) -> int:
        assert option == zmq.EVENTS
        return zmq.POLLOUT if self.up and not self.closed else 0

    def close(self, linger: int = 0) -> None:
        self.closed = True


def test_peers_follow_the_name() -> None:
    made: list[FakeSocket] = []

    def open_socket(endpoint: str) -> Any:
        made.append(FakeSocket(endpoint))
        return made[-1]

    peers = discovery.Peers("shard1", "tcp://svc:5555", open_socket)
    assert peers.apply(["10.0.0.1", "10.0.0.2"]) == discovery.Change(("10.0.0.1", "10.0.0.2"), ())
    assert [s.endpoint for s in made] == ["tcp://10.0.0.1:5555", "tcp://10.0.0.2:5555"]
    first = made[0]
    # a new pod appears, an old one goes: connect the new, close the gone, keep the rest
    assert peers.apply(["10.0.0.2", "10.0.0.3"]) == discovery.Change(("10.0.0.3",), ("10.0.0.1",))
    assert first.closed and not made[1].closed and made[2].endpoint == "tcp://10.0.0.3:5555"
    assert sorted(peers.sockets) == ["10.0.0.2", "10.0.0.3"]
    assert peers.apply(["10.0.0.3", "10.0.0.2"]) == discovery.Change()  # same set, another order: nothing
    assert len(made) == 3
    # an address routed before it resolved here is connected on demand (and kept until a view drops it)
    routed = peers.socket("10.0.0.9")
    assert routed.endpoint == "tcp://10.0.0.9:5555" and "10.0.0.9" in peers.sockets
    assert peers.reach() == {"reach.shard1@10.0.0.2": 1.0, "reach.shard1@10.0.0.3": 1.0, "reach.shard1@10.0.0.9": 1.0}
    made[1].up = False
    assert "reach.shard1@10.0.0.2" not in peers.reach()
    # the fallback of a sole producer: the preferred one if connected, else a connected one by rendezvous
    assert peers.pick(7, prefer="10.0.0.3") == "10.0.0.3"
    assert peers.pick(7, prefer="10.0.0.2") in ("10.0.0.3", "10.0.0.9")
    picks = {peers.pick(rid) for rid in range(200)}
    assert picks == {"10.0.0.3", "10.0.0.9"}  # never the unconnected one, both of the others
    assert peers.apply([]) == discovery.Change((), ("10.0.0.2", "10.0.0.3", "10.0.0.9"))  # the name is gone
    assert peers.sockets == {} and all(s.closed for s in made) and peers.pick(1) is None


def test_the_watcher_keeps_its_view_when_dns_fails() -> None:
    answers: list[Any] = [["10.0.0.1"], ["10.0.0.1", "10.0.0.2"], OSError("no DNS server answers"), []]

    def resolver(host: str, port: int) -> list[str]:
        assert (host, port) == ("svc", 5555)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return list(answer)

    w = discovery.Watcher([("svc", 5555)], interval_s=0.5, resolver=resolver)
    assert w.latest() == (0, {})
    w.resolve_once()
    v1, view = w.latest()
    assert view == {("svc", 5555): ("10.0.0.1",)}
    w.resolve_once()
    v2, view = w.latest()
    assert v2 > v1 and view[("svc", 5555)] == ("10.0.0.1", "10.0.0.2")
    w.resolve_once()  # a failure: the previous view stays, counted
    assert w.latest() == (v2, view) and w.failures == 1
    w.resolve_once()  # the name no longer exists (no ready pod): an empty view
    assert w.latest()[1][("svc", 5555)] == ()


def test_resolve_reads_every_address_of_a_name() -> None:
    assert discovery.resolve("localhost", 1) in (["127.0.0.1"], ["127.0.0.1", "::1"], ["::1", "127.0.0.1"])
    assert discovery.resolve("no-such-name.invalid", 1) == []


def test_the_ingress_learns_replicas_from_heartbeats(tmp_path: Path) -> None:
    t = _load(_discovered(_data()), tmp_path)
    live = replicas.liveness(t, down_after_s=1.0)
    for name in ("shard0", "shard2"):
        live.beat(name, True, 10, now=100.0)
    assert live.not_up(now=100.1) == {"shard1": "no replica has sent a heartbeat yet"}
    live.add("shard1", "shard1@10.0.0.1")
    live.add("shard1", "shard1@10.0.0.2")
    live.add("shard1", "shard1@10.0.0.1")  # again: nothing new
    assert live.groups["shard1"] == ["shard1@10.0.0.1", "shard1@10.0.0.2"]
    live.beat("shard1@10.0.0.1", True, 11, now=100.2)
    assert live.all_up(now=100.3) and not live.is_up("shard1@10.0.0.2", now=100.3)
    assert live.down_since("shard1@10.0.0.1", now=100.3) == 0.0
    assert live.down_since("shard1@10.0.0.2", now=100.3) == float("inf")
    assert live.down_since("shard1@10.0.0.1", now=131.2) == pytest.approx(31.0)
    live.forget("shard1@10.0.0.2")
    assert live.groups["shard1"] == ["shard1@10.0.0.1"] and not live.knows("shard1@10.0.0.2")


def test_reachable_needs_every_producer() -> None:
    stats = {"shard0@a": {"reach.shard1@10.0.0.1": 1.0}, "shard0@b": {"reach.shard1@10.0.0.1": 1.0, "reach.shard1@10.0.0.2": 1.0}}
    assert discovery.reachable(stats, "shard1@10.0.0.1")
    assert not discovery.reachable(stats, "shard1@10.0.0.2")
    assert discovery.reachable({}, "shard1@10.0.0.2")  # the ingress is the only producer: its own socket decides


def test_a_worker_of_a_discovered_shard_needs_its_address(tmp_path: Path) -> None:
    import argparse

    from pipeline.errors import UsageError
    from pipeline.serving.worker import add_arguments, load_config

    t = topo.from_dict(_discovered(_data()), directory=tmp_path)
    t.write(tmp_path)
    for s in t.shards:
        (tmp_path / s.file).write_bytes(b"")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(UsageError, match=r"shard 'shard1' has replicas found by DNS.*expected --replica-address"):
        load_config(parser.parse_args([str(tmp_path), "--shard", "shard1"]), environ={})
    config, _ = load_config(parser.parse_args([str(tmp_path), "--shard", "shard1"]), environ={"PIPELINE_REPLICA_ADDRESS": "10.0.0.7"})
    assert config.replica_address == "10.0.0.7"
    with pytest.raises(UsageError, match=r"--replica-address '10.0.0.7': shard 'shard0' has no replicas found by DNS"):
        load_config(parser.parse_args([str(tmp_path), "--shard", "shard0", "--replica-address", "10.0.0.7"]), environ={})


def test_the_ingress_follows_only_plausible_replicas() -> None:
    assert discovery.admissible("10.0.0.5", 0, 3) == ""
    assert discovery.admissible("fd00::5", 0, 3) == ""
    assert "expected an IP address" in discovery.admissible("evil.example", 0, 3)
    assert "at most 16" in discovery.admissible("10.0.0.5", 16, 3)
    assert discovery.admissible("10.0.0.5", 16, 5) == "" and "at most 20" in discovery.admissible("10.0.0.5", 20, 5)
