"""MobileNetV3Large: on one host, and over hosts with fast links, the cluster-aware plan is today's plan."""

from __future__ import annotations

from typing import Any

import pytest

from pipeline.cluster import cluster_from_dict
from pipeline.partition import cost, planner
from pipeline.partition.graph import build_graph
from pipeline.partition.placement import plan, problem_from_graph
from pipeline.partition.source import load_source

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mobilenet() -> tuple[Any, list[float], planner.Crossings]:
    model, _ = load_source("mobilenet_v3_large")
    graph = build_graph(model)
    shapes = cost.concrete_shapes(graph, None)
    seconds = [c.seconds(8) for c in cost.op_costs(graph, shapes)]
    tbytes = [cost.tensor_bytes(graph, shapes, t.id) if t.id in shapes else 0 for t in graph.tensors]
    cross = planner.crossings(graph, tbytes)
    return problem_from_graph(graph, seconds, tbytes, cross), seconds, cross


def _cluster(n: int, bandwidth: str, latency: str = "0.1ms") -> Any:
    return cluster_from_dict(
        {
            "version": 1,
            "hosts": [{"name": f"h{i}", "address": f"198.18.0.{i + 1}"} for i in range(n)],
            "ingress": "h0",
            "links": {"default": {"bandwidth": bandwidth, "latency": latency}},
        }
    )


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
def test_one_host_gives_todays_plan(mobilenet: Any, k: int) -> None:
    problem, seconds, cross = mobilenet
    chosen = plan(problem, _cluster(1, "1Gbit"), shards=k)
    assert chosen.boundaries == planner.plan_balanced(seconds, cross, k)


def test_fast_links_give_todays_cuts(mobilenet: Any) -> None:
    problem, seconds, cross = mobilenet
    fast = _cluster(3, "100Gbit", "0ms")
    for k in (2, 3):
        chosen = plan(problem, fast, shards=k)
        assert chosen.boundaries == planner.plan_balanced(seconds, cross, k)
        assert len(set(chosen.hosts)) == k
    free = plan(problem, fast)  # the planner chooses: all three hosts, today's 3-shard cuts
    assert len(free.segments) == 3 and free.boundaries == planner.plan_balanced(seconds, cross, 3)


def test_a_100mbit_cluster_cuts_where_tensors_are_small(mobilenet: Any) -> None:
    problem, seconds, cross = mobilenet
    slow = _cluster(3, "100Mbit")
    chosen = plan(problem, slow)
    # today's compute-balanced plan sends 200-800 KB a sample across its first cut; over 100 Mbit the
    # planner only sends tensors of under 100 KB
    assert all(u.nbytes < 100_000 for u in chosen.estimate.links)
    today = planner.plan_balanced(seconds, cross, 3)
    assert cross.bytes[today[0]] > 200_000
