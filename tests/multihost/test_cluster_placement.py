"""A topology placed by the planner (`pipeline place DIR --cluster FILE`) runs over three namespace hosts:
the join model cut by hand, its hosts chosen from a cluster file naming the namespaces' addresses, answers
what the whole model answers, bitwise, one request at a time, from the ingress's host."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline import topology as topo
from pipeline.cluster import host_names
from tests.multihost import hosts as mh
from tests.multihost.test_multihost import join_directory
from tests.netns import Network

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)
def test_a_join_placed_by_the_planner_answers_bitwise(make_network: Callable[[int], Network], tmp_path: Path) -> None:
    net = make_network(3)
    directory = join_directory(tmp_path)
    replay = mh.record(directory, tmp_path / "replay.npz", 8)
    # the toy model's compute is a few microseconds, less than moving 1 KB over 1 Gbit, so on hosts of speed
    # 1.0 the planner rightly keeps it on one host; speed 0.001 makes it weigh like a real model (milliseconds)
    cluster = mh.cluster_file(net, tmp_path / "cluster.yaml", speed=0.001)
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "place", str(directory), "--cluster", str(cluster)],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    t = topo.load(directory)
    placement = host_names(t)  # process -> h1, h2, h3: the namespaces' own names
    assert set(placement.values()) <= {h.name for h in net.hosts}
    assert len(set(placement.values())) >= 2, f"the planner put everything on one host: {placement}"
    assert placement[topo.INGRESS] == "h1" and t.ingress.grpc == f"{net.host('h1').address}:8001"
    run = mh.MultiHost(net, t, tmp_path / "logs", placement, worker_args=["--threads", "1"])
    try:
        run.start()
        records = run.load(replay, tmp_path / "placed.jsonl", concurrency=1, count=8, timeout=30)
    finally:
        run.stop()
    assert mh.counts(records) == {"correct": 8}, records[:3]
    spread = mh.reference_spread(replay)
    assert spread > 1e-4, f"reference outputs of different inputs differ by only {spread}: the comparison could not fail"
