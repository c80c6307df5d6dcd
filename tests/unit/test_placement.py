"""The cluster-aware planner (pure logic): exact against brute force, and the behaviours a user relies on."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

from pipeline.cluster import Cluster, cluster_from_dict
from pipeline.errors import UsageError
from pipeline.partition import cost, planner
from pipeline.partition.graph import build_graph
from pipeline.partition.placement import (
    Flow,
    Problem,
    Segment,
    brute_force,
    evaluate,
    plan,
    problem_from_graph,
)
from tests import models

MB = 1_000_000.0


def _cluster(hosts: list[tuple[str, float]], default: str = "1Gbit", latency: str = "0.1ms", pairs: list[dict[str, Any]] | None = None, ingress: str | None = None) -> Cluster:
    return cluster_from_dict(
        {
            "version": 1,
            "hosts": [{"name": n, "address": f"198.18.0.{i + 1}", "speed": s} for i, (n, s) in enumerate(hosts)],
            "ingress": ingress or hosts[0][0],
            "links": {"default": {"bandwidth": default, "latency": latency}, "pairs": pairs or []},
        }
    )


def _chain(seconds: list[float], out_bytes: list[float], input_bytes: float = 1000.0) -> Problem:
    """Units in a chain: unit i sends ``out_bytes[i]`` to unit i + 1 (the last one to the ingress)."""
    n = len(seconds)
    flows = [Flow("input", None, (0,), False, input_bytes)]
    for i in range(n):
        flows.append(Flow(f"t{i}", i, (i + 1,) if i + 1 < n else (), i == n - 1, out_bytes[i]))
    return Problem(seconds=tuple(seconds), flows=tuple(flows), allowed=tuple([False] + [True] * (n - 1) + [False]), boundary_bytes=tuple([0.0] + out_bytes[:-1] + [0.0]))


# ------------------------------------------------------------- exactness
def _random_problem(rng: random.Random, n: int) -> Problem:
    seconds = [rng.uniform(0.1, 2.0) * 1e-3 for _ in range(n)]
    flows = [Flow("in", None, tuple(sorted({0, *([rng.randrange(n)] if rng.random() < 0.3 else [])})), False, rng.choice([1e3, 1e5, 1e6]))]
    for i in range(n):
        consumers = [i + 1] if i + 1 < n else []
        for j in range(i + 2, n):  # skip connections
            if rng.random() < 0.25:
                consumers.append(j)
        flows.append(Flow(f"t{i}", i, tuple(consumers), i == n - 1 or (rng.random() < 0.1), rng.choice([1e3, 1e4, 1e5, 1e6])))
    allowed = [False] + [rng.random() < 0.8 for _ in range(n - 1)] + [False]
    boundary = [0.0] + [rng.choice([1e3, 1e5]) for _ in range(n - 1)] + [0.0]
    return Problem(seconds=tuple(seconds), flows=tuple(flows), allowed=tuple(allowed), boundary_bytes=tuple(boundary))


def _random_cluster(rng: random.Random, m: int) -> Cluster:
    pairs = []
    for i in range(m):
        for j in range(i + 1, m):
            if rng.random() < 0.5:
                pairs.append({"between": [f"h{i}", f"h{j}"], "bandwidth": rng.choice(["10Mbit", "100Mbit", "1Gbit"]), "latency": rng.choice(["0ms", "1ms", "5ms"])})
    return _cluster([(f"h{i}", rng.choice([0.5, 1.0, 1.0, 2.0])) for i in range(m)], default=rng.choice(["100Mbit", "1Gbit"]), latency="0.5ms", pairs=pairs, ingress=f"h{rng.randrange(m)}")


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_on_small_random_instances(seed: int) -> None:
    rng = random.Random(seed)
    for _ in range(40):
        n, m = rng.randint(2, 7), rng.randint(1, 3)
        problem, cluster = _random_problem(rng, n), _random_cluster(rng, m)
        if rng.random() < 0.2:
            problem = Problem(problem.seconds, problem.flows, tuple([False] + [True] * (n - 1) + [False]), fixed=True)
        objective = rng.choice(["throughput", "latency"])
        slack = rng.choice([0.0, 0.05])
        candidates = sum(problem.allowed)
        shards = None if problem.fixed else rng.choice([None, 1, 2, 3, 4])
        if shards is not None and shards - 1 > candidates:
            shards = None
        got = plan(problem, cluster, objective=objective, shards=shards, slack=slack).estimate
        best_bottleneck, best_latency = brute_force(problem, cluster, objective=objective, shards=shards, slack=slack)
        assert got.latency_s == pytest.approx(best_latency, rel=1e-9, abs=1e-12)
        if objective == "latency":
            assert got.bottleneck_s == pytest.approx(best_bottleneck, rel=1e-9, abs=1e-12)
        else:
            # within slack of the best bottleneck, and no plan within it is faster end to end
            optimum = brute_force(problem, cluster, objective="throughput", shards=shards, slack=0.0)[0]
            assert got.bottleneck_s <= optimum * (1 + slack) + 1e-12


def test_the_search_and_the_estimate_agree() -> None:
    """The value the search optimises is the estimate of the plan it returns (no second cost model)."""
    rng = random.Random(42)
    for _ in range(30):
        problem, cluster = _random_problem(rng, rng.randint(3, 8)), _random_cluster(rng, 3)
        chosen = plan(problem, cluster, objective="latency")
        again = evaluate(problem, cluster, chosen.segments)
        assert again == chosen.estimate


# ---------------------------------------------------------- known optima
def test_a_slow_link_moves_the_cut_to_where_the_tensor_is_small() -> None:
    # four equal units; the tensor after unit 0 is 1 MB, after unit 1 only 1 KB, after unit 2 1 MB
    problem = _chain([1e-3] * 4, [MB, 1000.0, MB, 4000.0])
    fast = _cluster([("edge", 1.0), ("cloud", 1.0)], default="100Gbit", latency="0ms")
    slow = _cluster([("edge", 1.0), ("cloud", 1.0)], default="10Mbit", latency="1ms")
    assert plan(problem, fast, shards=2).boundaries == [2]  # balanced; bytes break no tie here
    chosen = plan(problem, slow, shards=2)
    assert chosen.boundaries == [2] and sorted(chosen.hosts) == ["cloud", "edge"]
    # and the ingress's host (edge) runs the second shard: its 4 KB output then stays home, and only
    # the 1 KB input and the 1 KB cut cross the slow link
    assert chosen.hosts == ["cloud", "edge"]
    assert sorted(u.nbytes for u in chosen.estimate.links) == [1000.0, 1000.0]
    # unbalanced compute, but the big tensor after unit 0 or unit 2 would take 800 ms on 10 Mbit
    problem2 = _chain([1e-3] * 4, [MB, MB, 1000.0, 4000.0])
    assert plan(problem2, fast, shards=2).boundaries == [2]
    chosen2 = plan(problem2, slow, shards=2)
    assert chosen2.boundaries == [3]
    link = {(u.src, u.dst): u for u in chosen2.estimate.links}
    assert all(u.nbytes <= 4000.0 for u in link.values())  # never a 1 MB tensor over 10 Mbit


def test_a_skip_connection_is_paid_once_per_destination_host() -> None:
    # unit 0 produces a 1 MB skip tensor consumed only by unit 5; the chain tensors are 1 KB
    n = 6
    flows = [Flow("input", None, (0,), False, 1000.0), Flow("skip", 0, (5,), False, MB)]
    for i in range(n):
        flows.append(Flow(f"t{i}", i, (i + 1,) if i + 1 < n else (), i == n - 1, 1000.0))
    problem = Problem(tuple([1e-3] * n), tuple(flows), tuple([False] + [True] * (n - 1) + [False]))
    cluster = _cluster([("edge", 1.0), ("cloud", 1.0)], default="100Mbit")
    # edge runs unit 0; cloud runs units 1..5 in four shards: the skip spans four cuts
    segments = [Segment(0, 1, "edge"), Segment(1, 2, "cloud"), Segment(2, 3, "cloud"), Segment(3, 4, "cloud"), Segment(4, 6, "cloud")]
    est = evaluate(problem, cluster, segments)
    (edge_to_cloud,) = [u for u in est.links if (u.src, u.dst) == ("edge", "cloud")]
    assert edge_to_cloud.nbytes == MB + 1000.0  # once, not once per boundary it spans
    assert sorted(edge_to_cloud.tensors) == ["skip", "t0"]
    # the old per-boundary count charges it at every boundary between its producer and its consumer
    assert planner.crossings is not None  # (documented contrast; see the planner's module doc)
    # the skip's bytes are a link stage of their own: 1 MB over 100 Mbit is 80 ms
    (stage,) = [s for s in est.stages if s.name == "edge->cloud"]
    assert stage.seconds == pytest.approx((MB + 1000.0) * 8 / 100e6)


def test_the_planner_keeps_a_skip_on_one_side_of_a_slow_link() -> None:
    n = 6
    flows = [Flow("input", None, (0,), False, 1000.0), Flow("skip", 0, (5,), False, MB)]
    for i in range(n):
        flows.append(Flow(f"t{i}", i, (i + 1,) if i + 1 < n else (), i == n - 1, 1000.0))
    problem = Problem(tuple([1e-3] * n), tuple(flows), tuple([False] + [True] * (n - 1) + [False]))
    cluster = _cluster([("edge", 1.0), ("cloud", 1.0)], default="10Mbit")
    chosen = plan(problem, cluster, shards=2)
    # any cut between unit 0 and unit 5 would send the 1 MB skip over 10 Mbit (800 ms); one shard per host
    # is still worth it only where the skip stays home, so the planner keeps it on one host
    assert all(u.nbytes < MB for u in chosen.estimate.links)


def test_a_host_is_left_out_when_using_it_does_not_pay() -> None:
    problem = _chain([1e-3] * 6, [200_000.0] * 5 + [4000.0])
    cluster = _cluster(
        [("edge", 1.0), ("near", 1.0), ("far", 1.0)],
        default="10Gbit",
        pairs=[{"between": ["far", "edge"], "bandwidth": "1Mbit"}, {"between": ["far", "near"], "bandwidth": "1Mbit"}],
    )
    chosen = plan(problem, cluster)
    assert "far" not in chosen.hosts
    assert sorted(set(chosen.hosts)) == ["edge", "near"] and len(chosen.segments) == 2
    # with every link fast, all three hosts are used, one shard each
    fast = _cluster([("edge", 1.0), ("near", 1.0), ("far", 1.0)], default="10Gbit")
    assert sorted(plan(problem, fast).hosts) == ["edge", "far", "near"]


def test_a_faster_host_gets_more_of_the_model() -> None:
    problem = _chain([1e-3] * 12, [1000.0] * 12)
    cluster = _cluster([("slow", 1.0), ("fast", 3.0)], default="10Gbit")
    chosen = plan(problem, cluster)
    units = {s.host: s.stop - s.start for s in chosen.segments}
    assert units == {"slow": 3, "fast": 9}
    assert chosen.estimate.bottleneck_s == pytest.approx(3e-3)
    # equal speeds: half each
    even = plan(problem, _cluster([("slow", 1.0), ("fast", 1.0)], default="10Gbit"))
    assert {s.host: s.stop - s.start for s in even.segments} == {"slow": 6, "fast": 6}


def test_one_host_gets_several_shards_when_k_exceeds_the_hosts() -> None:
    problem = _chain([1e-3] * 8, [1000.0] * 8)
    chosen = plan(problem, _cluster([("a", 1.0), ("b", 1.0)], default="10Gbit"), shards=4)
    assert len(chosen.segments) == 4
    counts = {h: chosen.hosts.count(h) for h in set(chosen.hosts)}
    assert sorted(counts.values()) in ([1, 3], [2, 2])
    # a host's shards are consecutive
    first = {h: chosen.hosts.index(h) for h in counts}
    assert all(chosen.hosts[first[h] : first[h] + counts[h]] == [h] * counts[h] for h in counts)


def test_latency_objective_prefers_fewer_hops() -> None:
    problem = _chain([1e-3] * 4, [10_000.0] * 4)
    cluster = _cluster([("edge", 1.0), ("cloud", 1.0)], default="1Gbit")
    assert len(plan(problem, cluster, objective="latency").segments) == 1
    assert len(plan(problem, cluster, objective="throughput").segments) == 2


def test_inputs_leave_from_and_outputs_return_to_the_ingress_host() -> None:
    problem = _chain([1e-3] * 2, [1000.0, 4000.0], input_bytes=600_000.0)
    cluster = _cluster([("edge", 1.0), ("cloud", 1.0)], default="100Mbit", ingress="edge")
    est = evaluate(problem, cluster, [Segment(0, 2, "cloud")])
    links = {(u.src, u.dst): u.nbytes for u in est.links}
    assert links == {("edge", "cloud"): 600_000.0, ("cloud", "edge"): 4000.0}
    # placing everything on the ingress's host sends nothing over the network
    assert evaluate(problem, cluster, [Segment(0, 2, "edge")]).links == ()


def test_fixed_shards_are_placed_not_recut() -> None:
    problem = Problem(
        seconds=(1e-3, 2e-3, 1e-3),
        flows=(Flow("in", None, (0,), False, 1000.0), Flow("a", 0, (1,), False, 1000.0), Flow("b", 1, (2,), False, 1000.0), Flow("c", 2, (), True, 100.0)),
        allowed=(False, True, True, False),
        fixed=True,
    )
    chosen = plan(problem, _cluster([("x", 1.0), ("y", 2.0)], default="10Gbit"))
    assert chosen.boundaries == [1, 2] and len(chosen.segments) == 3
    assert chosen.hosts[1] == "y"  # the slowest shard on the fastest host
    with pytest.raises(UsageError, match="has 3 shards"):
        plan(problem, _cluster([("x", 1.0)]), shards=2)


def test_bad_objective_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="--objective 'speed'"):
        plan(_chain([1e-3], [1.0]), _cluster([("x", 1.0)]), objective="speed")


# --------------------------------------------------- the same as today's
def _graph_problem(model: Any, batch: int = 8) -> tuple[Problem, list[float], planner.Crossings]:
    graph = build_graph(model)
    shapes = cost.concrete_shapes(graph, None)
    seconds = [c.seconds(batch) for c in cost.op_costs(graph, shapes)]
    tbytes = [cost.tensor_bytes(graph, shapes, t.id) if t.id in shapes else 0 for t in graph.tensors]
    cross = planner.crossings(graph, tbytes)
    return problem_from_graph(graph, seconds, tbytes, cross), seconds, cross


@pytest.mark.parametrize("build", [models.residual, models.inception, models.two_in_two_out, models.squeeze_excite, models.nested_twice, models.sequential])
def test_on_one_host_the_plan_is_todays(build: Any) -> None:
    problem, seconds, cross = _graph_problem(build())
    one = _cluster([("solo", 1.0)])
    candidates = int(np.count_nonzero(cross.allowed))
    for k in range(1, min(candidates + 1, 6) + 1):
        today = planner.plan_balanced(seconds, cross, k)
        chosen = plan(problem, one, shards=k)
        assert chosen.boundaries == today, (build.__name__, k)
        assert set(chosen.hosts) == {"solo"}
    # a slower or faster single host changes nothing
    assert plan(problem, _cluster([("solo", 3.0)]), shards=2).boundaries == planner.plan_balanced(seconds, cross, 2)


@pytest.mark.parametrize("build", [models.residual, models.squeeze_excite, models.sequential])
def test_with_fast_links_the_cuts_are_todays(build: Any) -> None:
    problem, seconds, cross = _graph_problem(build())
    fast = _cluster([("a", 1.0), ("b", 1.0), ("c", 1.0)], default="100Gbit", latency="0ms")
    candidates = int(np.count_nonzero(cross.allowed))
    for k in range(1, min(candidates + 1, 3) + 1):
        chosen = plan(problem, fast, shards=k)
        assert chosen.boundaries == planner.plan_balanced(seconds, cross, k), (build.__name__, k)
        assert len(set(chosen.hosts)) == k  # one shard per host: a host's shards share its compute
    assert len(plan(problem, fast).segments) == min(candidates + 1, 3)  # without --shards: every host


def test_with_fast_links_a_branchy_model_differs_from_today_only_by_counting_bytes_as_they_travel() -> None:
    """Inception's input feeds three branches. Today's planner counts it at every boundary up to its last
    consumer; the ingress really sends it once to each shard that consumes it. The balance is today's,
    and the chosen cuts move no more bytes, as they travel, than today's cuts would on the same hosts."""
    problem, seconds, cross = _graph_problem(models.inception())
    fast = _cluster([("a", 1.0), ("b", 1.0), ("c", 1.0)], default="100Gbit", latency="0ms")
    for k in (2, 3):
        chosen = plan(problem, fast, shards=k, slack=0.0)
        today = planner.plan_balanced(seconds, cross, k, slack=0.0)
        edges = [0, *today, problem.n]
        todays = evaluate(problem, fast, [Segment(a, b, h) for (a, b), h in zip(zip(edges, edges[1:]), chosen.hosts)])
        assert chosen.estimate.bottleneck_s == pytest.approx(todays.bottleneck_s)
        assert sum(u.nbytes for u in chosen.estimate.links) <= sum(u.nbytes for u in todays.links)
        assert chosen.estimate.latency_s <= todays.latency_s + 1e-12
