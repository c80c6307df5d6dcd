"""partition --measure: the arithmetic that turns segment times into corrected costs (no TensorFlow)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import PartitionError
from pipeline.partition import measure, planner


def _crossings(n: int, refused: set[int] = frozenset()) -> planner.Crossings:
    allowed = np.array([0 < b < n and b not in refused for b in range(n + 1)])
    return planner.Crossings(bytes=np.ones(n + 1), allowed=allowed, reasons={b: "refused" for b in refused})


def test_segments_are_about_equal_and_only_at_allowed_positions() -> None:
    seconds = [1.0] * 32
    allowed = [0 < b < 32 and b % 2 == 0 for b in range(33)]
    cuts = measure.segment_boundaries(seconds, allowed, 4)
    assert cuts == [8, 16, 24]
    # uneven costs: the cuts follow the cost, not the op count
    seconds = [3.0] * 8 + [1.0] * 24  # half the cost (24 of 48) in the first 8 ops
    cuts = measure.segment_boundaries(seconds, [0 < b < 32 for b in range(33)], 2)
    assert cuts == [8]
    # never a refused position, always increasing, never more than asked
    allowed = [b in (0, 5, 6, 32) for b in range(33)]
    cuts = measure.segment_boundaries([1.0] * 32, allowed, 8)
    assert cuts == sorted(set(cuts)) and set(cuts) <= {5, 6} and len(cuts) <= 7
    assert measure.segment_boundaries([1.0] * 4, [False] * 5, 4) == []
    assert measure.segment_boundaries([1.0] * 4, [True] * 5, 1) == []


def test_correction_scales_each_segment_and_keeps_the_total() -> None:
    seconds = [1.0, 1.0, 2.0, 2.0]  # segments [0, 2) and [2, 4): estimated 2 and 4
    corrected, parts = measure.correct(seconds, [2], [6.0, 4.0])  # measured 6 and 4: the first is 3x its estimate
    assert sum(corrected) == pytest.approx(sum(seconds))
    # within a segment the estimate's proportions stay; between segments the measured ones
    assert corrected[0] == pytest.approx(corrected[1])
    assert (corrected[0] + corrected[1]) / (corrected[2] + corrected[3]) == pytest.approx(6.0 / 4.0)
    assert [(p.first, p.end, p.estimated_s, p.measured_s) for p in parts] == [(0, 2, 2.0, 6.0), (2, 4, 4.0, 4.0)]
    with pytest.raises(PartitionError, match="expected 2 segment times, received 1"):
        measure.correct(seconds, [2], [1.0])


def test_a_measured_slow_start_moves_the_cut_earlier() -> None:
    # what the reference machine showed: the early layers cost more under load than the estimate says
    n = 40
    estimate = [1.0] * n
    cross = _crossings(n)
    assert planner.plan_balanced(estimate, cross, 2, 0.0) == [20]
    boundaries = measure.segment_boundaries(estimate, cross.allowed, 4)
    corrected, _ = measure.correct(estimate, boundaries, [20.0, 10.0, 10.0, 10.0])  # the first quarter 2x
    cut = planner.plan_balanced(corrected, cross, 2, 0.0)
    assert cut == [15]  # the first ten ops now weigh twice the others: 10 x 2 + 5 = 25 of 50 on each side
    assert sum(corrected[: cut[0]]) == pytest.approx(sum(corrected[cut[0] :]))


@pytest.mark.parametrize(
    ("plan_batch", "shards", "colocate", "cpus", "expected"),
    [
        (8, 2, True, 2, measure.Conditions(batch=8, neighbours=1, threads=1)),
        (8, 4, True, 2, measure.Conditions(batch=8, neighbours=1, threads=1)),  # 4 shards still busy only 2 cores
        (8, 2, False, 4, measure.Conditions(batch=8, neighbours=1, threads=0)),  # a process per shard: TF's pools
        (8, 1, True, 2, measure.Conditions(batch=8, neighbours=0, threads=2)),
        (1, 4, True, 2, measure.Conditions(batch=1, neighbours=0, threads=1)),  # one request at a time: alone
        (8, None, False, 2, measure.Conditions(batch=8, neighbours=1, threads=0)),  # the planner picks K: all cores
    ],
)
def test_conditions_are_those_the_shards_will_run_in(
    plan_batch: int, shards: int | None, colocate: bool, cpus: int, expected: measure.Conditions
) -> None:
    assert measure.default_conditions(plan_batch=plan_batch, shards=shards, colocate=colocate, cpus=cpus) == expected


def test_the_record_names_the_segments() -> None:
    m = measure.Measurement(
        conditions=measure.Conditions(batch=8, neighbours=1, threads=1),
        segments=(measure.Segment(0, 2, 0.002, 0.006), measure.Segment(2, 4, 0.004, 0.004)),
        seconds=(1.0, 1.0, 1.0, 1.0),
    )
    names = ["a", "b", "c", "d"]
    record = m.record(names)
    assert record["conditions"] == "batch 8, 1 other core(s) busy, 1 intra-op thread(s)"
    assert record["segments"] == [
        {"first": "a", "last": "b", "estimated_ms": 2.0, "measured_ms": 6.0},
        {"first": "c", "last": "d", "estimated_ms": 4.0, "measured_ms": 4.0},
    ]
    table = m.table(names)
    assert "3.00  (a .. b)" in table and "1.00  (c .. d)" in table
