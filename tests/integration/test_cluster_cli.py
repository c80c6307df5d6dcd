"""`pipeline partition --cluster`, `place`, `procfile --host` and `show` as a user runs them on a cluster file."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from pipeline import colocation
from pipeline import topology as topo
from tests import models

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}

CLUSTER = """\
version: 1
hosts:
- {name: edge, address: 198.18.0.1}
- {name: mid, address: 198.18.0.2}
- {name: cloud, address: 198.18.0.3, speed: 2.0}
ingress: edge
links:
  default: {bandwidth: 1Gbit, latency: 0.1ms}
  pairs:
  - {between: [edge, cloud], bandwidth: 100Mbit, latency: 5ms}
"""
ADDRESS = {"edge": "198.18.0.1", "mid": "198.18.0.2", "cloud": "198.18.0.3"}


def pipeline(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("cluster")
    model = d / "residual.keras"
    models.residual().save(model)
    cluster = d / "cluster.yaml"
    cluster.write_text(CLUSTER)
    return model, cluster


@pytest.fixture(scope="module")
def placed(files: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    model, cluster = files
    out = tmp_path_factory.mktemp("placed") / "topo"
    r = pipeline("partition", str(model), "--cluster", str(cluster), "--shards", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    return out, r.stdout


def _check_addresses(t: topo.Topology) -> None:
    """Every process on a cluster host: endpoint on its address, bind on all interfaces, metrics, ports unique per host."""
    addresses = set(ADDRESS.values())
    ports: dict[str, list[int]] = {}
    for host, endpoint, bind, metrics in [
        (t.ingress.host, t.ingress.results, t.ingress.bind, t.ingress.metrics),
        *[(r.host, r.endpoint, r.bind, r.metrics) for s in t.shards for r in s.replicas],
    ]:
        assert host in addresses
        parts = urlsplit(endpoint)
        assert parts.scheme == "tcp" and parts.hostname == host
        assert bind == f"tcp://0.0.0.0:{parts.port}"
        m_host, _, m_port = metrics.rpartition(":")
        assert m_host == host
        ports.setdefault(host, []).extend([int(parts.port or 0), int(m_port)])
    assert t.ingress.grpc == "198.18.0.1:8001"
    ports.setdefault("198.18.0.1", []).append(8001)
    for host, used in ports.items():
        assert len(used) == len(set(used)), f"ports repeat on {host}: {used}"


def test_partition_with_a_cluster_places_every_process(placed: tuple[Path, str]) -> None:
    out, stdout = placed
    t = topo.load(out)
    assert len(t.shards) == 3
    _check_addresses(t)
    assert t.ingress.host == ADDRESS["edge"]
    data = yaml.safe_load((out / "topology.yaml").read_text())
    assert [h["name"] for h in data["cluster"]["hosts"]] == ["edge", "mid", "cloud"]
    assert data["cluster"]["ingress"] == "edge"
    placement = data["plan"]["placement"]
    assert placement["objective"] == "throughput" and len(placement["hosts"]) == 3
    by_name = {v: k for k, v in ADDRESS.items()}
    assert placement["hosts"] == [by_name[s.host] for s in t.shards]
    assert [r["host"] for r in data["plan"]["shards"]] == placement["hosts"]
    # the printed plan: hosts, cuts, bytes per link
    assert "placement on the cluster (objective: throughput)" in stdout
    assert "bytes/sample" in stdout and "bottleneck:" in stdout
    for s in t.shards:
        assert s.name in stdout


def test_partition_with_a_cluster_places_replicas_too(files: tuple[Path, Path], tmp_path: Path) -> None:
    from pipeline import colocation
    from pipeline.cluster import host_names

    model, cluster = files
    out = tmp_path / "replicated"
    r = pipeline(
        "partition", str(model), "--cluster", str(cluster), "--shards", "3", "--replicas", "shard1=2", "--replicas", "shard2=mid,cloud",
        "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    t = topo.load(out)
    _check_addresses(t)  # replicas included: on cluster hosts, ports unique per host
    names = host_names(t)
    assert len(t.shard("shard1").replicas) == 2 and names["shard1@1"] in ADDRESS
    assert [names[f"shard2@{k}"] for k in (1, 2)] == ["mid", "cloud"]
    for shard in ("shard1", "shard2"):  # a replicated shard runs alone, whatever shares its host
        assert colocation.process_of(t, shard).shards == (shard,)
    assert "replicas (each shard's work spread evenly over its replicas)" in r.stdout and "shard2     3 replicas on" in r.stdout
    assert "bottleneck with replicas:" in pipeline("show", str(out)).stdout
    mid = pipeline("procfile", str(out), "--host", "mid")
    assert mid.returncode == 0 and "shard2_r1: exec pipeline worker" in mid.stdout and "shard2_r2" not in mid.stdout
    bad = pipeline("partition", str(model), "--cluster", str(cluster), "--shards", "3", "--replicas", "shard2=moon", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "shard 'shard2': unknown host 'moon'" in bad.stderr and not (tmp_path / "x").exists()


def test_show_prints_hosts_links_and_the_bottleneck(placed: tuple[Path, str]) -> None:
    out, _ = placed
    r = pipeline("show", str(out))
    assert r.returncode == 0, r.stderr
    t = topo.load(out)
    by_name = {v: k for k, v in ADDRESS.items()}
    lines = r.stdout.splitlines()
    for s in t.shards:
        row = next(line for line in lines if line.startswith(s.name + " ") and s.host in line)
        assert by_name[s.host] in row
    assert "bytes/sample" in r.stdout and "transfer ms" in r.stdout and "bottleneck:" in r.stdout
    dot = pipeline("show", str(out), "--format", "dot")
    assert dot.returncode == 0 and by_name[t.shards[0].host] in dot.stdout


def test_procfile_by_host_name_or_address(placed: tuple[Path, str]) -> None:
    out, _ = placed
    t = topo.load(out)
    by_name = {v: k for k, v in ADDRESS.items()}
    everything = []
    for name in ADDRESS:
        r_name = pipeline("procfile", str(out), "--host", name)
        r_addr = pipeline("procfile", str(out), "--host", ADDRESS[name])
        # with a cluster file the shards of a host share one worker process, named after the host
        shards_here = [s.name for s in t.shards if by_name[s.host] == name]
        on_host = ([f"workers-{name}"] if shards_here else []) + (["ingress"] if name == "edge" else [])
        if not on_host:
            assert r_name.returncode == 2 and "no process" in r_name.stderr
            continue
        assert r_name.returncode == 0, r_name.stderr
        assert r_name.stdout == r_addr.stdout
        assert sorted(line.split(":")[0] for line in r_name.stdout.splitlines()) == sorted(on_host)
        if shards_here:
            assert f"--process workers-{name}" in r_name.stdout
        everything += r_name.stdout.splitlines()
    assert len(everything) == len({s.host for s in t.shards}) + 1  # every process on exactly one host
    r = pipeline("procfile", str(out), "--host", "moon")
    assert r.returncode == 2
    assert "--host 'moon': no such host" in r.stderr and "edge (198.18.0.1)" in r.stderr and "cloud (198.18.0.3)" in r.stderr


def test_place_rewrites_hosts_and_keeps_the_shards(files: tuple[Path, Path], tmp_path: Path) -> None:
    model, cluster = files
    out = tmp_path / "cut"
    r = pipeline("partition", str(model), "--cut", "relu_a", "--cut", "skip_add", "--out", str(out), "--no-verify")
    assert r.returncode == 0, r.stderr
    before = topo.load(out)
    assert before.ingress.host == "127.0.0.1" and "cluster" not in before.extra
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.keras")}
    r = pipeline("place", str(out), "--cluster", str(cluster))
    assert r.returncode == 0, r.stderr
    after = topo.load(out)
    _check_addresses(after)
    assert [(s.name, s.file, s.inputs, s.outputs) for s in after.shards] == [(s.name, s.file, s.inputs, s.outputs) for s in before.shards]
    assert {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.glob("*.keras")} == digests
    assert "placement on the cluster" in r.stdout and "placed 'residual'" in r.stdout
    shown = pipeline("show", str(out))
    assert shown.returncode == 0 and "bottleneck:" in shown.stdout
    # an ingress that serves from the shards' process keeps doing so when placed again (its host still has shards)
    assert pipeline("colocate", str(out), "--with-ingress").returncode == 0
    r = pipeline("place", str(out), "--cluster", str(cluster))
    assert r.returncode == 0, r.stderr
    again = topo.load(out)
    server = colocation.ingress_process(again)
    assert server is not None and again.shard(server.shards[0]).host == again.ingress.host, again.processes
    assert f"{server.name}: ingress, " in pipeline("show", str(out)).stdout


def test_bad_cluster_files_fail_before_anything_is_written(files: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = files
    bad = tmp_path / "bad.yaml"
    bad.write_text(CLUSTER.replace("between: [edge, cloud]", "between: [edge, clod]"))
    r = pipeline("partition", str(model), "--cluster", str(bad), "--out", str(tmp_path / "x"))
    assert r.returncode == 2 and not (tmp_path / "x").exists()
    assert "bad.yaml: links.pairs[0].between: unknown host 'clod'; the hosts are ['edge', 'mid', 'cloud']" in r.stderr
    r = pipeline("partition", str(model), "--cluster", str(files[1]), "--host", "10.0.0.1", "--out", str(tmp_path / "y"))
    assert r.returncode == 2 and "--host 10.0.0.1 with --cluster" in r.stderr
    r = pipeline("place", str(tmp_path / "nowhere"), "--cluster", str(files[1]))
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_older_topologies_still_show_and_make_procfiles(files: tuple[Path, Path], tmp_path: Path) -> None:
    model, _ = files
    out = tmp_path / "plain"
    assert pipeline("partition", str(model), "--shards", "2", "--out", str(out), "--no-verify").returncode == 0
    r = pipeline("show", str(out))
    assert r.returncode == 0 and "placement" not in r.stdout
    r = pipeline("procfile", str(out), "--host", "127.0.0.1")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 3
    r = pipeline("procfile", str(out), "--host", "edge")
    assert r.returncode == 2 and "127.0.0.1" in r.stderr


def test_the_python_api_the_benchmark_uses(files: tuple[Path, Path], tmp_path: Path) -> None:
    """partition_source(..., cluster=...) and place_topology(topology, cluster) give the same kind of topology."""
    from pipeline.cluster import host_names, load_cluster
    from pipeline.partition.command import partition_source
    from pipeline.partition.placement import assign_hosts, estimate_topology, place_topology

    model, cluster_file = files
    cluster = load_cluster(cluster_file)
    result = partition_source(model, tmp_path / "api", cluster=cluster_file, verify=False)
    _check_addresses(result.topology)
    assert topo.load(tmp_path / "api").extra["cluster"]["ingress"] == "edge"
    plain = partition_source(model, tmp_path / "plain", shards=3, verify=False).topology
    placed = place_topology(plain, cluster, "latency")
    _check_addresses(placed)
    assert placed.extra["plan"]["placement"]["objective"] == "latency"
    # the compute-only plan placed in order over the hosts, as a baseline, and its estimate
    in_order = assign_hosts(plain, cluster, ["edge", "mid", "cloud"])
    assert [host_names(in_order)[s.name] for s in in_order.shards] == ["edge", "mid", "cloud"]
    estimate, hosts = estimate_topology(in_order)
    assert hosts == ["edge", "mid", "cloud"] and estimate.bottleneck_s > 0
