"""Dynamic batching, with no sockets and no model: queueing, release, concat and split."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.serving.batcher import Batcher, batch_key, concat, rows, split

MS = 1_000_000


def test_batch_is_released_when_full_or_when_the_oldest_has_waited_max_delay() -> None:
    b: Batcher[str] = Batcher(max_batch=3, max_delay_ms=5)
    b.put("r1", rows=1, key="k", now_ns=0)
    assert b.take(1 * MS) == [] and b.due_in_ns(1 * MS) == 4 * MS
    b.put("r2", rows=1, key="k", now_ns=2 * MS)
    assert b.take(4 * MS) == []
    assert b.take(5 * MS) == ["r1", "r2"]
    for i in range(3):
        b.put(f"s{i}", rows=1, key="k", now_ns=10 * MS)
    assert b.due_in_ns(10 * MS) == 0
    assert b.take(10 * MS) == ["s0", "s1", "s2"]
    assert len(b) == 0 and b.due_in_ns(0) is None


def test_zero_delay_releases_at_once_and_force_ignores_the_delay() -> None:
    b: Batcher[str] = Batcher(max_batch=8, max_delay_ms=0)
    b.put("a", rows=1, key="k", now_ns=0)
    assert b.take(0) == ["a"]
    slow: Batcher[str] = Batcher(max_batch=8, max_delay_ms=1000)
    slow.put("a", rows=1, key="k", now_ns=0)
    assert slow.take(0) == [] and slow.take(0, force=True) == ["a"]


def test_batches_never_exceed_max_batch_rows_and_keep_fifo_order() -> None:
    b: Batcher[str] = Batcher(max_batch=4, max_delay_ms=0)
    for name, n in [("a", 2), ("b", 3), ("c", 2), ("d", 1)]:
        b.put(name, rows=n, key="k", now_ns=0)
    assert b.take(0) == ["a", "c"]  # b does not fit beside a; c and then d would overflow
    assert b.take(0) == ["b", "d"]
    b.put("big", rows=10, key="k", now_ns=0)
    assert b.take(0) == ["big"]  # larger than max_batch: alone and whole


def test_only_requests_with_the_same_key_share_a_batch() -> None:
    b: Batcher[str] = Batcher(max_batch=8, max_delay_ms=0)
    b.put("a1", rows=1, key="A", now_ns=0)
    b.put("b1", rows=1, key="B", now_ns=0)
    b.put("a2", rows=1, key="A", now_ns=0)
    assert b.take(0) == ["a1", "a2"]
    assert b.take(0) == ["b1"]


def test_queue_is_bounded_and_drop_removes_matching_requests() -> None:
    b: Batcher[int] = Batcher(max_batch=2, max_delay_ms=100, max_queued=3)
    assert all(b.put(i, rows=1, key="k", now_ns=0) for i in range(3))
    assert not b.put(3, rows=1, key="k", now_ns=0)
    assert b.drop(lambda i: i % 2 == 0) == [0, 2]
    assert len(b) == 1 and b.clear() == [1]


def test_batch_key_groups_compatible_requests_only() -> None:
    a = {"x": np.zeros((2, 3), np.float32), "y": np.zeros((2,), np.int32)}
    b = {"x": np.ones((5, 3), np.float32), "y": np.ones((5,), np.int32)}
    assert batch_key(a) == batch_key(b)
    assert batch_key(a) != batch_key({"x": np.zeros((2, 4), np.float32), "y": np.zeros((2,), np.int32)})
    assert batch_key(a) != batch_key({"x": np.zeros((2, 3), np.float64), "y": np.zeros((2,), np.int32)})
    odd = {"x": np.zeros((2, 3), np.float32), "y": np.zeros((3,), np.int32)}  # batch axes disagree
    assert batch_key(odd) != batch_key(odd)
    scalar = {"x": np.float32(1.0) * np.ones(())}
    assert batch_key(scalar) != batch_key(scalar) and rows(scalar) == 1
    assert rows(b) == 5


@settings(max_examples=100, deadline=None)
@given(sizes=st.lists(st.integers(0, 4), min_size=1, max_size=6))
def test_concat_then_split_gives_each_request_its_own_rows(sizes: list[int]) -> None:
    parts = [
        {"x": np.arange(n * 3, dtype=np.float32).reshape(n, 3) + 100 * i, "k": np.full((n,), i, np.int64)}
        for i, n in enumerate(sizes)
    ]
    joined = concat(parts)
    assert joined["x"].shape == (sum(sizes), 3)
    back = split({"out": joined["x"] * 2, "k": joined["k"]}, sizes)
    assert len(back) == len(sizes)
    for i, (p, b) in enumerate(zip(parts, back)):
        np.testing.assert_array_equal(b["out"], p["x"] * 2)
        np.testing.assert_array_equal(b["k"], np.full((sizes[i],), i))


def test_split_refuses_outputs_whose_batch_axis_does_not_match() -> None:
    with pytest.raises(ValueError, match="expected a batch axis of 3 rows"):
        split({"mean": np.zeros((1, 4))}, [1, 2])
    single = {"mean": np.zeros((1, 4))}
    assert split(single, [2])[0]["mean"] is single["mean"]

