"""The planner's dynamic programme against brute force on small random instances (pure logic)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import PartitionError
from pipeline.partition.planner import Crossings, plan_balanced


def _crossings(n: int, cut_bytes: list[float], allowed: list[bool]) -> Crossings:
    a = np.array([False, *allowed, False])
    b = np.array([0.0, *cut_bytes, 0.0])
    return Crossings(bytes=b, allowed=a, reasons={})


def _segments(costs: list[float], cuts: list[int]) -> list[float]:
    edges = [0, *cuts, len(costs)]
    return [sum(costs[a:b]) for a, b in zip(edges, edges[1:])]


@settings(max_examples=200, deadline=None)
@given(
    costs=st.lists(st.floats(0.01, 10.0), min_size=2, max_size=9),
    data=st.data(),
)
def test_matches_brute_force(costs: list[float], data: st.DataObject) -> None:
    n = len(costs)
    cut_bytes = data.draw(st.lists(st.integers(0, 1000), min_size=n - 1, max_size=n - 1))
    allowed = data.draw(st.lists(st.booleans(), min_size=n - 1, max_size=n - 1))
    candidates = [b for b in range(1, n) if allowed[b - 1]]
    k = data.draw(st.integers(1, len(candidates) + 1))
    cross = _crossings(n, [float(x) for x in cut_bytes], allowed)
    cuts = plan_balanced(costs, cross, k, slack=0.0)
    assert len(cuts) == k - 1 and all(c in candidates for c in cuts)
    best = min(max(_segments(costs, list(c))) for c in itertools.combinations(candidates, k - 1))
    got = max(_segments(costs, cuts))
    assert got <= best * (1 + 1e-9) + 1e-12
    # among optimal plans, the fewest bytes crossing
    optimal = [c for c in itertools.combinations(candidates, k - 1) if max(_segments(costs, list(c))) <= best * (1 + 1e-9) + 1e-12]
    fewest = min(sum(cut_bytes[b - 1] for b in c) for c in optimal)
    assert sum(cut_bytes[b - 1] for b in cuts) == fewest


def test_too_many_shards_is_a_clear_error() -> None:
    cross = _crossings(3, [1.0, 1.0], [True, False])
    with pytest.raises(PartitionError, match="only 1 places"):
        plan_balanced([1.0, 1.0, 1.0], cross, 3)
    with pytest.raises(PartitionError, match="at least 1"):
        plan_balanced([1.0, 1.0, 1.0], cross, 0)


def test_slack_trades_balance_for_bytes() -> None:
    costs = [1.0, 1.0, 1.02, 0.98]
    cross = _crossings(4, [100.0, 1.0, 100.0], [True, True, True])
    assert plan_balanced(costs, cross, 2, slack=0.0) == [2]
    assert plan_balanced(costs, _crossings(4, [100.0, 100.0, 1.0], [True, True, True]), 2, slack=0.0) == [2]
    # 3 ops vs 1 op is far outside 5 % slack; a near-tie within slack picks the cheaper cut
    cross2 = _crossings(4, [100.0, 1000.0, 1.0], [True, True, True])
    assert plan_balanced([1.0, 1.0, 1.0, 1.04], cross2, 2, slack=0.05) == [2]
