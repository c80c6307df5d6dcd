"""Replicas on a cluster (issue 16): ``--replicas S=N`` and ``S=HOST,...`` at place time, their hosts and ports."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from pipeline import cli, colocation, replicas
from pipeline import topology as topo
from pipeline.cluster import Cluster, cluster_from_dict, host_names
from pipeline.errors import UsageError
from pipeline.launch import free_ports
from pipeline.partition import placement
from pipeline.partition import replica_placement as rp

ADDRESS = {"h1": "198.18.0.1", "h2": "198.18.0.2", "h3": "198.18.0.3"}
#: the loopback ports of the topology before it is placed (never bound here: addresses in a file)
PORTS = free_ports(11)


def _cluster(pairs: list[dict[str, Any]] | None = None) -> Cluster:
    return cluster_from_dict(
        {
            "version": 1,
            "hosts": [{"name": n, "address": a} for n, a in ADDRESS.items()],
            "ingress": "h1",
            "links": {"default": {"bandwidth": "10Gbit"}, "pairs": pairs or []},
        }
    )


def _data(ms: tuple[float, ...] = (1.0, 8.0, 1.0), width: int = 4) -> dict[str, Any]:
    """A 3-shard chain ingress -> shard0 -> shard1 -> shard2 -> ingress on loopback, with the plan's estimates."""
    tensor = {"dtype": "float32", "shape": [-1, width]}
    return {
        "version": 1,
        "name": "m",
        "inputs": [{"name": "x", **tensor}],
        "outputs": [{"name": "y", **tensor}],
        "ingress": {
            "grpc": f"127.0.0.1:{PORTS[0]}",
            "results": f"tcp://127.0.0.1:{PORTS[1]}",
            "metrics": f"127.0.0.1:{PORTS[2]}",
        },
        "shards": [
            {
                "name": f"shard{i}",
                "file": f"shard{i}.keras",
                "endpoint": f"tcp://127.0.0.1:{PORTS[3 + 2 * i]}",
                "metrics": f"127.0.0.1:{PORTS[4 + 2 * i]}",
                "inputs": [["x", "a", "b"][i]],
                "outputs": [
                    {
                        "name": ["a", "b", "y"][i],
                        "consumers": [["shard1", "shard2", "ingress"][i]],
                    }
                ],
            }
            for i in range(3)
        ],
        "tensors": {"a": tensor, "b": tensor},
        "plan": {"shards": [{"shard": f"shard{i}", "estimated_ms": x} for i, x in enumerate(ms)]},
    }


def _topology(tmp_path: Path, data: dict[str, Any] | None = None) -> topo.Topology:
    t = topo.from_dict(copy.deepcopy(data or _data()), directory=tmp_path)
    topo.validate(t, check_files=False)
    return t


def _problem(t: topo.Topology) -> placement.Problem:
    return placement.problem_from_topology(t, placement.shard_seconds(t))


def _check_ports(t: topo.Topology) -> None:
    """Every endpoint and metrics address (replicas too) unique; ports unique per host."""
    used = [t.ingress.results, t.ingress.metrics, t.ingress.grpc]
    used += [x for s in t.shards for r in s.replicas for x in (r.endpoint, r.metrics)]
    pairs = [
        (
            urlsplit(x if "//" in x else f"//{x}").hostname,
            urlsplit(x if "//" in x else f"//{x}").port,
        )
        for x in used
    ]
    assert len(set(pairs)) == len(pairs), Counter(pairs).most_common(3)
    for s in t.shards:
        for r in s.replicas:
            assert r.endpoint.startswith(f"tcp://{r.host}:") and r.metrics.startswith(f"{r.host}:") and r.bind.startswith("tcp://0.0.0.0:")


def test_parse_counts_and_host_lists() -> None:
    c = _cluster()
    got = rp.parse(["shard1=3", "shard2=h2, 198.18.0.3", "shard0=h1,h1"], cluster=c)
    assert got["shard1"] == rp.ReplicaRequest("shard1", 3)
    assert got["shard2"] == rp.ReplicaRequest("shard2", 3, ("h2", "h3"))  # the shard's own, then one per host named
    assert got["shard0"] == rp.ReplicaRequest("shard0", 3, ("h1", "h1"))


@pytest.mark.parametrize(
    ("item", "message"),
    [
        (
            "shard1=0",
            r"replicas 'shard1=0': shard 'shard1' needs at least 1 replica, received 0",
        ),
        ("shard1=-2", r"shard 'shard1' needs at least 1 replica, received -2"),
        ("shard1", r"expected SHARD=N"),
        (
            "shard1=h9",
            r"replicas 'shard1=h9': shard 'shard1': unknown host 'h9'; the hosts are \['h1', 'h2', 'h3'\]",
        ),
        (
            "shard1=h2,",
            r"shard 'shard1': expected SHARD=N or SHARD=HOST\[,HOST...\], received an empty host name",
        ),
    ],
)
def test_bad_items_name_the_shard(item: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        rp.parse([item], cluster=_cluster())


def test_other_errors_name_the_shard(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"shard 'shard1': naming hosts \(\['h2'\]\) needs a cluster"):
        rp.parse(["shard1=h2"])
    with pytest.raises(UsageError, match=r"shard 'shard1' is given twice \('shard1=2', 'shard1=h3'\)"):
        rp.parse(["shard1=2", "shard1=h3"], cluster=_cluster())
    with pytest.raises(UsageError, match=r"no shard named 'shard7'"):
        rp.parse(["shard7=2"], _topology(tmp_path), _cluster())


def test_the_bottleneck_replica_goes_to_the_idle_host_then_the_least_loaded() -> None:
    t = _topology(Path("."))
    p, c = _problem(t), _cluster()
    own = ["h1", "h2", "h1"]  # h1: 2 ms, h2: 8 ms (the bottleneck), h3 idle
    assert rp.estimate(p, c, [[h] for h in own]).bottleneck == (
        "compute h2",
        pytest.approx(8e-3),
    )
    two = rp.choose_hosts(p, c, own, rp.parse(["shard1=2"], cluster=c))
    assert two == {"shard0": (), "shard1": ("h3",), "shard2": ()}
    assert rp.estimate(p, c, [["h1"], ["h2", "h3"], ["h1"]]).bottleneck[1] == pytest.approx(4e-3)
    # a third: h1 (2 + 8/3 ms) beats a second replica on h2 or h3 (8/3 + 8/3 ms)
    assert rp.choose_hosts(p, c, own, rp.parse(["shard1=3"], cluster=c))["shard1"] == (
        "h3",
        "h1",
    )
    # named hosts are taken as they are, the same host twice included
    assert rp.choose_hosts(p, c, own, rp.parse(["shard1=h2,h2"], cluster=c))["shard1"] == ("h2", "h2")


def test_a_slow_link_keeps_a_replica_off_a_host_by_the_cost_model() -> None:
    t = _topology(Path("."), _data(width=100_000))  # 400 KB a sample between shards
    slow = _cluster(
        [
            {"between": ["h1", "h3"], "bandwidth": "10Mbit"},
            {"between": ["h2", "h3"], "bandwidth": "10Mbit"},
        ]
    )
    p = _problem(t)
    got = rp.choose_hosts(p, slow, ["h1", "h2", "h1"], rp.parse(["shard1=2"], cluster=slow))
    assert got["shard1"] == ("h1",)  # h3 would make its link the bottleneck (200 KB at 10 Mbit: 160 ms)
    assert rp.choose_hosts(p, _cluster(), ["h1", "h2", "h1"], rp.parse(["shard1=2"], cluster=slow))["shard1"] == ("h3",)


def test_place_with_replicas_on_other_hosts_ports_unique_per_host(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = _topology(tmp_path)
    for s in t.shards:
        (tmp_path / s.file).write_bytes(b"")
    t.write(tmp_path)
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        "version: 1\nhosts:\n"
        + "".join(f"- {{name: {n}, address: {a}}}\n" for n, a in ADDRESS.items())
        + "ingress: h1\nlinks:\n  default: {bandwidth: 10Gbit}\n"
    )

    def place(*extra: str) -> int:
        return cli.main(["place", str(tmp_path), "--cluster", str(cluster), *extra])

    assert place("--replicas", "shard1=2") == 0
    placed = topo.load(tmp_path, check_files=False)
    _check_ports(placed)
    names = host_names(placed)
    s1 = placed.shard("shard1")
    assert len(s1.replicas) == 2 and names["shard1@0"] != names["shard1@1"]
    assert names["shard1@1"] in ADDRESS and names["shard1"] == names["shard1@0"]
    # the replicated shard runs in processes of its own; the others of a host share one
    assert all("shard1" not in p.shards for p in placed.processes)
    assert colocation.process_of(placed, "shard1").shards == ("shard1",)
    out = capsys.readouterr().out
    assert "replicas (each shard's work spread evenly over its replicas)" in out and "shard1     2 replicas on" in out
    from pipeline.procfile import lines

    on_replica_host = lines(placed, "DIR", host=names["shard1@1"])
    assert "shard1_r1: exec pipeline worker DIR --shard shard1 --replica 1" in on_replica_host
    assert not any(x.startswith("shard1_r0:") for x in on_replica_host)
    every = lines(placed, "DIR")
    assert sorted(every) == sorted(x for h in sorted(set(names.values())) for x in lines(placed, "DIR", host=h))

    # named hosts; placing again keeps the replicas' hosts and re-ports them
    assert place("--replicas", "shard1=h3,h3") == 0
    again = topo.load(tmp_path, check_files=False)
    _check_ports(again)
    assert [r.host for r in again.shard("shard1").extra_replicas] == [
        ADDRESS["h3"],
        ADDRESS["h3"],
    ]
    assert place() == 0
    kept = topo.load(tmp_path, check_files=False)
    assert [r.host for r in kept.shard("shard1").extra_replicas] == [
        ADDRESS["h3"],
        ADDRESS["h3"],
    ]
    _check_ports(kept)
    assert place("--replicas", "shard1=1") == 0
    assert len(topo.load(tmp_path, check_files=False).shard("shard1").replicas) == 1

    # errors name the shard and leave the topology as it was
    before = (tmp_path / topo.TOPOLOGY_FILE).read_text()
    for bad, message in (
        ("shard1=0", "shard 'shard1' needs at least 1 replica"),
        ("shard1=h9", "shard 'shard1': unknown host 'h9'"),
    ):
        assert place("--replicas", bad) == 2
        assert message in capsys.readouterr().err
    assert (tmp_path / topo.TOPOLOGY_FILE).read_text() == before


def test_replicas_of_a_placed_topology_follow_its_hosts(tmp_path: Path) -> None:
    t = _topology(tmp_path)
    placed = placement.assign_hosts(t, _cluster(), ["h1", "h2", "h1"])
    placed = colocation.colocate(placed)
    placed.write(tmp_path)
    assert cli.main(["replicas", str(tmp_path), "shard1=2"]) == 0
    out = topo.load(tmp_path, check_files=False)
    assert [r.host for r in out.shard("shard1").replicas] == [
        ADDRESS["h2"],
        ADDRESS["h3"],
    ]  # the idle host
    _check_ports(out)
    first = out.shard("shard1").replicas[1]
    assert cli.main(["replicas", str(tmp_path), "shard1=h3,h1", "shard0=h2"]) == 0
    out = topo.load(tmp_path, check_files=False)
    assert out.shard("shard1").replicas[1] == first  # an existing replica on a host named stays as it is
    assert [r.host for r in out.shard("shard1").replicas] == [
        ADDRESS["h2"],
        ADDRESS["h3"],
        ADDRESS["h1"],
    ]
    assert [r.host for r in out.shard("shard0").replicas] == [
        ADDRESS["h1"],
        ADDRESS["h2"],
    ]
    _check_ports(out)
    # shard2 stays in the process group of its host (alone now), replicas each in their own
    assert replicas.processes_on(out, ADDRESS["h1"]) == [
        "ingress",
        "shard0@0",
        "shard1@2",
        "workers-198.18.0.1",
    ]


def test_a_loopback_topology_with_replicas_is_placed_with_them(tmp_path: Path) -> None:
    data = _data()
    data["shards"][1]["replicas"] = [
        {
            "endpoint": data["shards"][1]["endpoint"],
            "metrics": data["shards"][1]["metrics"],
        },
        {"endpoint": f"tcp://127.0.0.1:{PORTS[9]}", "metrics": f"127.0.0.1:{PORTS[10]}"},
    ]
    t = _topology(tmp_path, data)
    placed = placement.place_topology(t, _cluster())
    _check_ports(placed)
    hosts = [r.host for r in placed.shard("shard1").replicas]
    assert len(hosts) == 2 and hosts[0] != hosts[1] and all(h in ADDRESS.values() for h in hosts)


def test_the_planner_proposes_replicas_only_on_idle_hosts_and_only_when_they_clearly_pay(tmp_path: Path) -> None:
    t = _topology(Path("."))
    p, c = _problem(t), _cluster()
    own = ["h1", "h2", "h1"]  # h3 idle; shard1 (8 ms on h2) the bottleneck
    none = {"shard0": (), "shard1": (), "shard2": ()}
    assert rp.propose(p, c, own, none) == {"shard0": (), "shard1": ("h3",), "shard2": ()}  # 8 ms -> 4 ms
    # shard1's count was given: a replica of another shard would not move the bottleneck (h2), even with no margin
    assert rp.propose(p, c, own, none, exclude=["shard1"]) == none
    assert rp.propose(p, c, own, none, exclude=["shard1"], min_gain=0.0) == none
    # the margin: with shard1 at 2.4 ms, h1 (2 ms) the next stage, a replica on h3 gains 2.4 -> 2.0 ms (17 %), not 20 %
    close = _problem(_topology(Path("."), _data(ms=(1.0, 2.4, 1.0))))
    assert rp.propose(close, c, own, none)["shard1"] == ("h3",)
    assert rp.propose(close, c, own, none, min_gain=0.2) == none
    assert rp.propose(p, c, ["h1", "h2", "h3"], none) == none  # no host is idle
    slow = _cluster([{"between": ["h1", "h3"], "bandwidth": "10Mbit"}, {"between": ["h2", "h3"], "bandwidth": "10Mbit"}])
    wide = _problem(_topology(Path("."), _data(width=100_000)))
    assert rp.propose(wide, slow, own, none) == none  # h3's links would be the new bottleneck
    # through place_topology on four hosts (the planner uses three, one per shard): recorded, and shown
    four = cluster_from_dict(
        {
            "version": 1,
            "hosts": [{"name": f"h{i}", "address": f"198.18.0.{i}"} for i in range(1, 5)],
            "ingress": "h1",
            "links": {"default": {"bandwidth": "10Gbit"}},
        }
    )
    placed = placement.place_topology(_topology(tmp_path, _data(ms=(1.0, 8.0, 1.0))), four, propose_replicas=True)
    offered = placed.extra["plan"]["placement"]["proposed_replicas"]
    assert list(offered) == ["shard1"] and len(offered["shard1"]) == 1
    assert len(placed.shard("shard1").replicas) == 2
    _check_ports(placed)
    assert "proposed by the planner (--propose-replicas): shard1 on h4" in rp.replica_table(placed, four)
    assert not placement.place_topology(_topology(tmp_path), four).shard("shard1").extra_replicas  # off unless asked
