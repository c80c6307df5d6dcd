"""The join buffer, with no sockets: parts in, ready requests and expiries out."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.serving.join import DEFAULT_MAX_PENDING, JoinBuffer, Status

MS = 1_000_000
PRODUCERS = {"s1": ("a",), "s2": ("b:0", "c"), "s3": ("d",)}


@dataclass(frozen=True)
class Span:
    name: str
    start_ns: int
    end_ns: int


def part(*names: str, value: float = 1.0) -> dict[str, np.ndarray]:
    return {n: np.full((1, 2), value, np.float32) for n in names}


def test_request_completes_when_every_producer_has_sent_its_part() -> None:
    join = JoinBuffer(PRODUCERS)
    assert join.add(7, part("a"), now_ns=0, sender="s1").status is Status.PENDING
    assert join.add(7, part("d"), now_ns=1, sender="s3").status is Status.PENDING
    assert join.missing(7) == ("b:0", "c")
    outcome = join.add(7, part("b:0", "c"), now_ns=2, sender="s2", model="m")
    assert outcome.status is Status.COMPLETE
    assert outcome.ready is not None
    assert sorted(outcome.ready.tensors) == ["a", "b:0", "c", "d"]
    assert outcome.ready.senders == ("s1", "s3", "s2")
    assert (outcome.ready.first_ns, outcome.ready.ready_ns) == (0, 2)
    assert len(join) == 0 and 7 not in join


def test_parts_of_interleaved_requests_stay_apart() -> None:
    join = JoinBuffer({"p": ("x",), "q": ("y",)})
    join.add(1, part("x", value=1), now_ns=0)
    join.add(2, part("x", value=2), now_ns=0)
    done2 = join.add(2, part("y", value=20), now_ns=0).ready
    done1 = join.add(1, part("y", value=10), now_ns=0).ready
    assert done1 is not None and done2 is not None
    assert done1.tensors["x"][0, 0] == 1 and done1.tensors["y"][0, 0] == 10
    assert done2.tensors["x"][0, 0] == 2 and done2.tensors["y"][0, 0] == 20


def test_single_part_request_completes_without_being_stored() -> None:
    join = JoinBuffer({"ingress": ("x",)}, max_pending=1)
    join.add(1, part("x"), now_ns=0)  # fills nothing
    for rid in range(5):
        assert join.add(rid, part("x"), now_ns=0).status is Status.COMPLETE
    assert len(join) == 0


def test_duplicate_part_is_ignored_and_the_first_value_kept() -> None:
    join = JoinBuffer({"p": ("x",), "q": ("y",)})
    join.add(1, part("x", value=1), now_ns=0)
    dup = join.add(1, part("x", value=99), now_ns=0)
    assert dup.status is Status.DUPLICATE and dup.ignored == ("x",)
    ready = join.add(1, part("y"), now_ns=0).ready
    assert ready is not None and ready.tensors["x"][0, 0] == 1


def test_tensors_the_shard_does_not_take_are_ignored() -> None:
    join = JoinBuffer({"p": ("x",), "q": ("y",)})
    assert join.add(1, part("zzz"), now_ns=0).status is Status.UNEXPECTED
    outcome = join.add(1, part("x", "zzz"), now_ns=0)
    assert outcome.status is Status.PENDING and outcome.ignored == ("zzz",)
    assert len(join) == 1


def test_full_buffer_refuses_new_requests_but_completes_pending_ones() -> None:
    join = JoinBuffer({"p": ("x",), "q": ("y",)}, max_pending=3)
    for rid in range(3):
        assert join.add(rid, part("x"), now_ns=0).status is Status.PENDING
    assert join.add(99, part("x"), now_ns=0).status is Status.REFUSED
    assert len(join) == 3
    assert join.add(0, part("y"), now_ns=0).status is Status.COMPLETE
    assert join.add(99, part("x"), now_ns=0).status is Status.PENDING


def test_expire_returns_requests_past_their_deadline_oldest_first() -> None:
    join = JoinBuffer({"p": ("x",), "q": ("y",)})
    join.add(1, part("x"), now_ns=0, deadline_ns=30 * MS)
    join.add(2, part("x"), now_ns=0, deadline_ns=10 * MS)
    join.add(3, part("x"), now_ns=0, deadline_ns=50 * MS)
    assert join.expire(5 * MS) == []
    assert join.next_expiry_ns == 10 * MS
    assert join.expire(30 * MS) == [2, 1]
    assert len(join) == 1 and 3 in join
    assert join.next_expiry_ns == 50 * MS


def test_request_without_deadline_expires_after_the_part_timeout() -> None:
    join = JoinBuffer({"p": ("x",), "q": ("y",)}, part_timeout_s=0.5)
    join.add(1, part("x"), now_ns=100)
    assert join.expire(100 + 499 * MS) == []
    assert join.expire(100 + 500 * MS) == [1]


def test_part_past_its_deadline_on_arrival_is_dropped_with_its_request() -> None:
    join = JoinBuffer({"p": ("x",), "q": ("y",)})
    join.add(1, part("x"), now_ns=0, deadline_ns=10 * MS)
    outcome = join.add(1, part("y"), now_ns=10 * MS, deadline_ns=10 * MS)
    assert outcome.status is Status.EXPIRED and outcome.ready is None
    assert len(join) == 0
    # also for a request seen for the first time, even a complete one
    assert JoinBuffer({"p": ("x",)}).add(5, part("x"), now_ns=2, deadline_ns=1).status is Status.EXPIRED


def test_discard_and_clear() -> None:
    join = JoinBuffer({"p": ("x",), "q": ("y",)})
    join.add(1, part("x"), now_ns=0)
    join.add(2, part("x"), now_ns=0)
    assert join.discard(1) and not join.discard(1)
    assert join.clear() == [2]
    assert len(join) == 0 and join.next_expiry_ns is None


def test_spans_of_the_parts_are_merged_without_duplicates() -> None:
    join = JoinBuffer({"p": ("x",), "q": ("y",)})
    shared = Span("ingress->s1.hop", 1, 2)
    join.add(1, part("x"), now_ns=0, spans=[shared, Span("s1.compute", 2, 3)])
    ready = join.add(1, part("y"), now_ns=0, spans=[shared, Span("s1.compute", 2, 3), Span("s2.compute", 3, 4)]).ready
    assert ready is not None
    assert [s.name for s in ready.spans] == ["ingress->s1.hop", "s1.compute", "s2.compute"]


def test_memory_is_released_after_a_burst_of_incomplete_requests() -> None:
    join = JoinBuffer({"p": ("x",), "q": ("y",)}, max_pending=DEFAULT_MAX_PENDING)
    refused = 0
    for rid in range(DEFAULT_MAX_PENDING + 100):
        refused += join.add(rid, {"x": np.zeros(1024, np.float32)}, now_ns=0, deadline_ns=MS).status is Status.REFUSED
    assert refused == 100 and len(join) == DEFAULT_MAX_PENDING
    assert len(join.expire(MS)) == DEFAULT_MAX_PENDING
    assert len(join) == 0 and not join._pending and join.next_expiry_ns is None


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="max_pending"):
        JoinBuffer({"p": ("x",)}, max_pending=0)
    with pytest.raises(ValueError, match="input"):
        JoinBuffer({})


# ---------------------------------------------------------------- property test
INPUTS = {"p": ("x",), "q": ("y", "z"), "r": ("w",)}
ALL = {"x", "y", "z", "w"}
ops = st.one_of(
    st.tuples(
        st.just("part"),
        st.integers(0, 5),  # request id
        st.sets(st.sampled_from(sorted(ALL | {"junk"})), min_size=1, max_size=3),
        st.integers(0, 60),  # deadline in ms from 0 (0: none)
    ),
    st.tuples(st.just("tick"), st.integers(0, 30)),
    st.tuples(st.just("discard"), st.integers(0, 5)),
)


@settings(max_examples=300, deadline=None)
@given(max_pending=st.integers(1, 4), steps=st.lists(ops, max_size=60))
def test_any_sequence_of_parts_and_expiries_keeps_the_bound_and_completes_exactly_when_all_parts_arrived(
    max_pending: int, steps: list[tuple]
) -> None:
    join = JoinBuffer(INPUTS, max_pending=max_pending, part_timeout_s=0.02)
    now = 0
    model: dict[int, tuple[set[str], int]] = {}  # our own account: request -> (tensors received, expiry)
    for step in steps:
        if step[0] == "tick":
            now += step[1] * MS
            expired = join.expire(now)
            assert set(expired) == {rid for rid, (_, exp) in model.items() if exp <= now}
            for rid in expired:
                del model[rid]
        elif step[0] == "discard":
            assert join.discard(step[1]) == (step[1] in model)
            model.pop(step[1], None)
        else:
            _, rid, names, deadline_ms = step
            deadline = deadline_ms * MS
            outcome = join.add(rid, {n: np.zeros(1) for n in names}, now_ns=now, deadline_ns=deadline)
            useful = names & ALL
            have, exp = model.get(rid, (set(), 0))
            if deadline and deadline <= now:
                assert outcome.status is Status.EXPIRED
                model.pop(rid, None)
            elif not useful:
                assert outcome.status is Status.UNEXPECTED
            elif rid not in model and useful == ALL:
                assert outcome.status is Status.COMPLETE
            elif rid not in model and len(model) >= max_pending:
                assert outcome.status is Status.REFUSED
            elif useful <= have:
                assert outcome.status is Status.DUPLICATE
            else:
                if rid not in model:
                    exp = deadline or now + 20 * MS
                elif deadline:
                    exp = min(exp, deadline)
                have = have | useful
                if have == ALL:
                    assert outcome.status is Status.COMPLETE
                    assert outcome.ready is not None and set(outcome.ready.tensors) == ALL
                    model.pop(rid, None)
                else:
                    assert outcome.status is Status.PENDING
                    model[rid] = (have, exp)
        assert len(join) == len(model) <= max_pending
        assert {rid for rid in model} == {rid for rid in range(6) if rid in join}
    join.expire(now + 10**12)
    assert len(join) == 0
