"""The topology's ``processes`` section and the links it implies (pure: no sockets, no processes)."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest

from pipeline import colocation
from pipeline import topology as topo
from pipeline.errors import TopologyError, UsageError
from pipeline.launch import free_ports
from pipeline.procfile import lines

#: the addresses written into the test topology (nothing binds them; drawn free so no fixed port is named)
*SHARD_PORTS, GRPC_PORT, RESULTS_PORT = free_ports(5)
METRICS_PORTS = free_ports(3)


def _data(hosts: tuple[str, str, str] = ("127.0.0.1", "127.0.0.1", "127.0.0.1")) -> dict[str, Any]:
    """Three shards: x -> a; a -> b; (x, a, b) -> c (a join fed by the ingress, a and b) -> ingress."""
    t = {"dtype": "float32", "shape": [-1, 4]}

    def shard(i: int, name: str, inputs: list[str], outputs: list[dict[str, Any]]) -> dict[str, Any]:
        host = hosts[i]
        return {"name": name, "file": f"{name}.keras", "endpoint": f"tcp://{host}:{SHARD_PORTS[i]}", "metrics": f"{host}:{METRICS_PORTS[i]}", "inputs": inputs, "outputs": outputs}

    return {
        "version": 1,
        "name": "m",
        "inputs": [{"name": "x", **t}],
        "outputs": [{"name": "y", **t}],
        "ingress": {"grpc": f"127.0.0.1:{GRPC_PORT}", "results": f"tcp://127.0.0.1:{RESULTS_PORT}"},
        "shards": [
            shard(0, "a", ["x"], [{"name": "ta", "consumers": ["b", "c"]}]),
            shard(1, "b", ["ta"], [{"name": "tb", "consumers": ["c"]}]),
            shard(2, "c", ["x", "ta", "tb"], [{"name": "y", "consumers": ["ingress"]}]),
        ],
        "tensors": {"ta": t, "tb": t},
    }


def _load(data: dict[str, Any]) -> topo.Topology:
    t = topo.from_dict(data, directory=Path("/nowhere"))
    topo.validate(t, check_files=False)
    return t


def test_old_files_load_unchanged_one_process_per_shard() -> None:
    t = _load(_data())
    assert t.processes == ()
    assert [(p.name, p.shards) for p in colocation.groups(t)] == [("a", ("a",)), ("b", ("b",)), ("c", ("c",))]
    assert "processes" not in t.to_dict()
    assert _load({**_data(), "processes": "per-shard"}).processes == ()
    # every link stays tcp, every shard binds its tcp endpoint only
    assert colocation.link_endpoint(t, "a", "b") == f"tcp://127.0.0.1:{SHARD_PORTS[1]}"
    assert colocation.binds(t, "c") == colocation.Binds(tcp=f"tcp://127.0.0.1:{SHARD_PORTS[2]}", inproc=None)
    assert lines(t, "D") == [
        "ingress: exec pipeline ingress D",
        "a: exec pipeline worker D --shard a",
        "b: exec pipeline worker D --shard b",
        "c: exec pipeline worker D --shard c",
    ]


def test_colocate_puts_a_host_in_one_process_with_inproc_links() -> None:
    t = colocation.colocate(_load(_data()))
    assert [(p.name, p.shards) for p in t.processes] == [("workers", ("a", "b", "c"))]
    assert colocation.link_endpoint(t, "a", "b") == "inproc://shard/b"
    assert colocation.link_endpoint(t, "b", "c") == "inproc://shard/c"
    assert colocation.link_endpoint(t, "c", "ingress") == f"tcp://127.0.0.1:{RESULTS_PORT}"  # the ingress is another process
    # a is fed by the ingress only: tcp; b by a only: inproc; c by the ingress and by a and b: both
    assert colocation.binds(t, "a") == colocation.Binds(tcp=f"tcp://127.0.0.1:{SHARD_PORTS[0]}", inproc=None)
    assert colocation.binds(t, "b") == colocation.Binds(tcp=None, inproc="inproc://shard/b")
    assert colocation.binds(t, "c") == colocation.Binds(tcp=f"tcp://127.0.0.1:{SHARD_PORTS[2]}", inproc="inproc://shard/c")
    assert lines(t, "D") == ["ingress: exec pipeline ingress D", "workers: exec pipeline worker D --process workers"]
    # written and read back
    again = _load(t.to_dict())
    assert again.processes == t.processes
    assert colocation.per_shard(again).processes == ()


def test_colocate_by_host_makes_one_process_per_host() -> None:
    t = colocation.colocate(_load(_data(("10.0.0.1", "10.0.0.1", "10.0.0.2"))))
    assert [(p.name, p.shards) for p in t.processes] == [("workers-10.0.0.1", ("a", "b")), ("workers-10.0.0.2", ("c",))]
    assert colocation.link_endpoint(t, "a", "b") == "inproc://shard/b"
    assert colocation.link_endpoint(t, "b", "c") == f"tcp://10.0.0.2:{SHARD_PORTS[2]}"
    assert colocation.process_names_on(t, "10.0.0.2") == ["workers-10.0.0.2"]
    assert lines(t, "D", host="10.0.0.1") == ["workers-10.0.0.1: exec pipeline worker D --process workers-10.0.0.1"]
    # the cluster planner names processes after its hosts
    named = colocation.colocate(_load(_data(("10.0.0.1", "10.0.0.1", "10.0.0.2"))), name=lambda host, n: f"on-{host[-1]}")
    assert [p.name for p in named.processes] == ["on-1", "on-2"]


def test_the_ingress_can_join_the_process_of_its_host() -> None:
    t = colocation.colocate(_load(_data()), ingress=True)
    assert t.processes == (topo.ProcessSpec("workers", ("a", "b", "c"), 0, ingress=True),)
    assert colocation.ingress_process(t) == t.processes[0]
    # requests to the entry shards and results back are inproc; nothing binds tcp, the ingress has no process
    assert colocation.link_endpoint(t, "c", "ingress") == "inproc://shard/ingress"
    assert colocation.link_endpoint(t, "ingress", "a") == "inproc://shard/a"
    assert colocation.binds(t, "a") == colocation.Binds(tcp=None, inproc="inproc://shard/a")
    assert colocation.binds(t, "c") == colocation.Binds(tcp=None, inproc="inproc://shard/c")
    assert colocation.ingress_binds(t, "tcp://*:1") == colocation.Binds(tcp=None, inproc="inproc://shard/ingress")
    assert colocation.process_names_on(t, None) == ["workers"]
    assert lines(t, "D") == ["workers: exec pipeline worker D --process workers"]
    assert colocation.describe(t) == {"workers": ("ingress", "a", "b", "c")}
    again = _load(t.to_dict())
    assert again.processes == t.processes and t.to_dict()["processes"][0]["ingress"] is True
    assert colocation.ingress_process(colocation.colocate(again)) is None  # regrouping without it takes it out


def test_an_ingress_process_with_shards_elsewhere_binds_both() -> None:
    t = colocation.colocate(_load(_data(("127.0.0.1", "127.0.0.1", "10.0.0.2"))), ingress=True)
    assert [(p.name, p.ingress) for p in t.processes] == [("workers-127.0.0.1", True), ("workers-10.0.0.2", False)]
    # c, on the other host, sends results and heartbeats over tcp; a and b over inproc
    assert colocation.ingress_binds(t, "tcp://*:1") == colocation.Binds(tcp="tcp://*:1", inproc="inproc://shard/ingress")
    assert colocation.link_endpoint(t, "c", "ingress") == f"tcp://127.0.0.1:{RESULTS_PORT}"
    assert colocation.link_endpoint(t, "b", "ingress") == "inproc://shard/ingress"
    # c is fed by the ingress and by a and b, all in the other process: tcp only
    assert colocation.binds(t, "c") == colocation.Binds(tcp=t.shard("c").bind, inproc=None)
    assert lines(t, "D", host="10.0.0.2") == ["workers-10.0.0.2: exec pipeline worker D --process workers-10.0.0.2"]
    assert lines(t, "D", host="127.0.0.1") == ["workers-127.0.0.1: exec pipeline worker D --process workers-127.0.0.1"]


def test_a_single_shard_process_with_the_ingress_starts_as_a_process() -> None:
    t = _load({**_data(), "processes": [{"name": "front", "shards": ["a"], "ingress": True}]})
    assert lines(t, "D") == [
        "front: exec pipeline worker D --process front",
        "b: exec pipeline worker D --shard b",
        "c: exec pipeline worker D --shard c",
    ]
    assert colocation.ingress_binds(t, "tcp://*:1") == colocation.Binds(tcp="tcp://*:1", inproc="inproc://shard/ingress")
    assert colocation.binds(t, "a") == colocation.Binds(tcp=None, inproc="inproc://shard/a")
    assert colocation.binds(t, "c") == colocation.Binds(tcp=f"tcp://127.0.0.1:{SHARD_PORTS[2]}", inproc=None)


def test_the_ingress_cannot_join_a_host_without_shards() -> None:
    with pytest.raises(UsageError, match=r"no shard of 'm' runs on the ingress's host '127.0.0.1' \(its shards run on \['10.0.0.1', '10.0.0.2'\]\)"):
        colocation.colocate(_load(_data(("10.0.0.1", "10.0.0.1", "10.0.0.2"))), ingress=True)


def test_a_replicated_shard_on_the_ingress_host_cannot_take_the_ingress() -> None:
    data = _data(("127.0.0.1", "10.0.0.2", "10.0.0.2"))
    a = data["shards"][0]
    a["replicas"] = [{"endpoint": a["endpoint"], "metrics": a["metrics"]}, {"endpoint": "tcp://127.0.0.1:1", "metrics": "127.0.0.1:2"}]
    t = _load(data)
    assert not colocation.ingress_can_join(t)  # its replicas run in processes of their own
    assert colocation.ingress_can_join(_load(_data()))
    with pytest.raises(UsageError, match=r"runs on the ingress's host '127.0.0.1' \(its shards run on \['10.0.0.2'\]\); \['a'\] have replicas"):
        colocation.colocate(t, ingress=True)


def test_a_partial_list_leaves_the_other_shards_alone() -> None:
    t = _load({**_data(), "processes": [{"name": "front", "shards": ["a", "b"], "threads": 2}]})
    assert [(p.name, p.shards, p.threads) for p in colocation.groups(t)] == [("front", ("a", "b"), 2), ("c", ("c",), 0)]
    assert colocation.link_endpoint(t, "a", "c") == f"tcp://127.0.0.1:{SHARD_PORTS[2]}"
    assert colocation.group(t, "c").shards == ("c",)
    with pytest.raises(UsageError, match=r"no worker process named 'nope'.*\['front', 'c'\]"):
        colocation.group(t, "nope")


@pytest.mark.parametrize(
    ("processes", "message"),
    [
        ([{"name": "p", "shards": ["a", "zz"]}], r"process 'p': names shard 'zz', which is not in the topology"),
        ([{"name": "p", "shards": ["a", "b"]}, {"name": "q", "shards": ["b"]}], r"process 'q': shard 'b' is already in process 'p'"),
        ([{"name": "p", "shards": ["a"]}, {"name": "p", "shards": ["b"]}], r"process 'p': process names must be unique"),
        ([{"name": "ingress", "shards": ["a"]}], r"'ingress' is reserved"),
        ([{"name": "p q", "shards": ["a"]}], r"process 'p q': a process name may hold only"),
        ([{"name": "p", "shards": []}], r"process 'p': expected at least one shard"),
        ([{"name": "c", "shards": ["a", "b"]}], r"process 'c' has the name of shard 'c', which runs in a process of its own"),
        ([{"name": "p", "shards": ["a"], "threads": -1}], r"processes\[0\] \('p'\): threads is -1"),
        ("all-in-one", r"'processes' should be 'per-shard' or a list"),
        ([{"shards": ["a"]}], r"processes\[0\]: missing key 'name'"),
        ([{"name": "p", "shards": ["a"], "ingress": "yes"}], r"processes\[0\] \('p'\): ingress is 'yes'; expected true or false"),
        (
            [{"name": "p", "shards": ["a"], "ingress": True}, {"name": "q", "shards": ["b"], "ingress": True}],
            r"one process at most may serve the ingress \(ingress: true\), received \['p', 'q'\]",
        ),
    ],
)
def test_bad_processes_name_the_process_and_the_shard(processes: Any, message: str) -> None:
    data = {**copy.deepcopy(_data()), "processes": processes}
    with pytest.raises(TopologyError, match=message):
        _load(data)


def test_a_process_spans_one_host_only() -> None:
    data = {**_data(("10.0.0.1", "10.0.0.2", "10.0.0.2")), "processes": [{"name": "p", "shards": ["a", "b"]}]}
    with pytest.raises(TopologyError, match=r"process 'p': its shards must sit on one host, received \{'a': '10.0.0.1', 'b': '10.0.0.2'\}"):
        _load(data)


def test_the_ingress_process_sits_on_the_ingress_host() -> None:
    data = {**_data(("10.0.0.2", "10.0.0.2", "10.0.0.2")), "processes": [{"name": "p", "shards": ["a", "b"], "ingress": True}]}
    with pytest.raises(TopologyError, match=r"process 'p': has ingress: true, so its shards must sit on the ingress's host '127.0.0.1'; they sit on '10.0.0.2'"):
        _load(data)


def test_a_grouped_shard_cannot_be_started_alone(tmp_path: Path) -> None:
    """`pipeline worker DIR --shard b` of a grouped shard names the process to start instead (before any socket)."""
    import argparse

    from pipeline.serving import worker

    t = colocation.colocate(_load(_data()))
    for s in t.shards:
        (tmp_path / s.file).write_bytes(b"")
    t.replace(directory=tmp_path).write(tmp_path)
    parser = argparse.ArgumentParser()
    worker.add_arguments(parser)
    with pytest.raises(UsageError, match=r"shard 'b' runs in process 'workers' with \['a', 'b', 'c'\].*--process workers"):
        worker.run(parser.parse_args([str(tmp_path), "--shard", "b"]))
    from pipeline.serving import group

    for argv, message in [
        (["--process", "workers", "--bind", "tcp://127.0.0.1:1"], r"--bind names one shard's endpoint"),
        (["--process", "workers", "--metrics", "127.0.0.1:0"], r"each shard of process 'workers' serves its own metrics"),
        (["--process", "nope"], r"no worker process named 'nope'"),
    ]:
        with pytest.raises(UsageError, match=message):
            group.load_configs(parser.parse_args([str(tmp_path), *argv]), {})
    spec, configs, _ = group.load_configs(parser.parse_args([str(tmp_path), "--process", "workers", "--metrics", "none"]), {})
    assert [c.shard for c in configs] == ["a", "b", "c"] and all(c.metrics == "none" for c in configs)
    cpus = len(os.sched_getaffinity(0))
    # the process's pool: its CPUs divided among its 3 shards, at least one thread
    assert all(c.threads == max(1, cpus // 3) == group.default_threads(3) for c in configs)
    assert [colocation.default_intra_threads(s, 8) for s in (1, 2, 3, 4, 8, 9)] == [8, 4, 2, 2, 1, 1]
    assert colocation.default_intra_threads(2, 2) == 1 and colocation.default_intra_threads(0, 2) == 2
    _, configs, _ = group.load_configs(parser.parse_args([str(tmp_path), "--process", "workers", "--threads", "3"]), {})
    assert {c.threads for c in configs} == {3}
    # one inter-op thread per shard up to the CPUs (with one, the shards' graphs only take turns)
    assert {c.inter_threads for c in configs} == {min(3, cpus)} and group.default_inter_threads(3) == min(3, cpus)
    assert group.default_inter_threads(1) == 1
    _, configs, _ = group.load_configs(parser.parse_args([str(tmp_path), "--process", "workers", "--inter-threads", "1"]), {})
    assert {c.inter_threads for c in configs} == {1}
    _, configs, _ = group.load_configs(parser.parse_args([str(tmp_path), "--process", "workers"]), {"PIPELINE_INTER_THREADS": "1"})
    assert {c.inter_threads for c in configs} == {1}


def test_the_colocate_command_regroups_a_topology_without_recutting(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline import cli

    _load(_data()).replace(directory=tmp_path).write(tmp_path)
    assert cli.main(["colocate", str(tmp_path), "--threads", "2"]) == 0
    assert capsys.readouterr().out == "workers: a, b, c\n"
    t = topo.load(tmp_path, check_files=False)
    assert t.processes == (topo.ProcessSpec("workers", ("a", "b", "c"), 2),)
    assert [s.endpoint for s in t.shards] == [f"tcp://127.0.0.1:{SHARD_PORTS[0]}", f"tcp://127.0.0.1:{SHARD_PORTS[1]}", f"tcp://127.0.0.1:{SHARD_PORTS[2]}"]
    assert colocation.worker_threads(t) == 2
    assert cli.main(["colocate", str(tmp_path), "--per-shard"]) == 0
    assert topo.load(tmp_path, check_files=False).processes == ()
    assert colocation.worker_threads(topo.load(tmp_path, check_files=False)) == 0  # the worker's own default
    assert cli.main(["colocate", str(tmp_path)]) == 0
    capsys.readouterr()
    # no threads: given, the reference uses the pool the process will size (its CPUs among its 3 shards)
    assert colocation.worker_threads(topo.load(tmp_path, check_files=False)) == max(1, len(os.sched_getaffinity(0)) // 3)
    assert cli.main(["colocate", str(tmp_path), "--threads", "-1"]) == 2
    assert cli.main(["colocate", str(tmp_path), "--with-ingress"]) == 0
    assert capsys.readouterr().out == "workers: ingress, a, b, c\n"
    assert colocation.ingress_process(topo.load(tmp_path, check_files=False)) is not None
    assert cli.main(["colocate", str(tmp_path), "--per-shard", "--with-ingress"]) == 2
    assert "--per-shard has none" in capsys.readouterr().err
    # partition: the ingress joins a process only where the shards are grouped (refused before any model loads)
    for argv in (["--shards", "2"], ["--shards", "2", "--per-shard"]):
        assert cli.main(["partition", str(tmp_path / "nope.keras"), *argv, "--with-ingress"]) == 2
        assert "--with-ingress puts the ingress into the shards' process: it needs --colocate" in capsys.readouterr().err
