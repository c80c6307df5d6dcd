"""Deadlines travel as the remaining budget; each host keeps them on its own monotonic clock."""

from __future__ import annotations

import time

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.pb import envelope_pb2 as pb
from pipeline.wire import codec
from pipeline.wire import deadline as dl

S = 1_000_000_000


def test_no_deadline_stays_none_on_every_hop() -> None:
    assert dl.budget(dl.NO_DEADLINE, 123) == 0
    assert dl.deadline(0, 123) == dl.NO_DEADLINE
    assert not dl.expired(dl.NO_DEADLINE, 2**62)


def test_a_budget_becomes_a_deadline_on_the_receivers_clock_whatever_the_senders_clock_reads() -> None:
    # the sender's monotonic clock reads 5 s, the receiver's 9,000 s: only the difference travels
    sender_deadline = dl.deadline_after(2.0, now=5 * S)
    sent = dl.budget(sender_deadline, now=5 * S + S // 2)  # 0.5 s spent at the sender
    assert sent == int(1.5 * S)
    received_deadline = dl.deadline(sent, now=9_000 * S)
    assert received_deadline == 9_000 * S + int(1.5 * S)
    assert not dl.expired(received_deadline, 9_001 * S)
    assert dl.expired(received_deadline, 9_001 * S + S // 2)


def test_a_spent_budget_is_sent_as_negative_and_expires_on_arrival() -> None:
    assert dl.budget(10 * S, now=10 * S) == dl.SPENT_BUDGET_NS
    assert dl.budget(10 * S, now=11 * S) == dl.SPENT_BUDGET_NS
    arrived = dl.deadline(dl.SPENT_BUDGET_NS, now=50 * S)
    assert arrived != dl.NO_DEADLINE and dl.expired(arrived, 50 * S)
    # a receiver whose clock reads 0 must not turn "spent" into "none"
    assert dl.expired(dl.deadline(-5, now=0), 0)


def test_a_huge_client_timeout_is_capped_not_overflowed() -> None:
    far = dl.deadline_after(1e30, now=S)
    assert far == S + dl.MAX_BUDGET_NS
    sent = dl.budget(far, now=S)
    env = pb.Envelope(kind=pb.REQUEST, budget_ns=sent)  # fits int64
    assert pb.Envelope.FromString(env.SerializeToString()).budget_ns == dl.MAX_BUDGET_NS
    assert dl.deadline(2**63 - 1, now=S) == S + dl.MAX_BUDGET_NS


def test_a_zero_timeout_is_already_expired_never_none() -> None:
    d = dl.deadline_after(0.0, now=7 * S)
    assert d != dl.NO_DEADLINE and dl.expired(d, 7 * S + 1)


@settings(max_examples=300, deadline=None)
@given(
    timeout_ms=st.integers(1, 10_000_000),
    hops=st.lists(st.tuples(st.integers(0, 5_000), st.integers(-(2**55), 2**55)), min_size=1, max_size=6),
)
def test_the_budget_only_shrinks_by_the_time_spent_on_each_host(timeout_ms: int, hops: list[tuple[int, int]]) -> None:
    """Hosts with arbitrary clock offsets: the time left at each hop is the timeout minus the time spent so far."""
    ms = 1_000_000
    budget = dl.budget(dl.deadline_after(timeout_ms / 1e3, now=0), now=0)
    spent = 0
    for spend_ms, clock in hops:  # each host: its own clock reading at arrival, then spend_ms of work
        local = dl.deadline(budget, now=clock)
        budget = dl.budget(local, now=clock + spend_ms * ms)
        spent += spend_ms
        left = timeout_ms - spent
        if left > 0:
            assert budget == left * ms
            assert not dl.expired(local, clock + spend_ms * ms)
        else:
            assert budget == dl.SPENT_BUDGET_NS
            assert dl.expired(local, clock + spend_ms * ms)


def test_wall_ns_maps_a_monotonic_reading_to_the_wall_clock() -> None:
    mono, wall = time.monotonic_ns(), time.time_ns()
    assert abs(dl.wall_ns(mono) - wall) < S // 10


def test_the_wire_version_says_the_deadline_field_changed_meaning() -> None:
    assert codec.WIRE_VERSION == 2
    fields = {f.name: f.number for f in pb.Envelope.DESCRIPTOR.fields}
    assert "deadline_ns" not in fields and fields["budget_ns"] == 14
    old = pb.Envelope(kind=pb.REQUEST, request_id=1, model="m", sender="ingress")
    frames = codec.encode(old, {})
    old.version = 1  # a process from before the change
    frames[0] = old.SerializeToString()
    counter = codec.DropCounter()
    assert codec.decode_or_drop(frames, counter) is None
    assert counter.snapshot() == {"bad_version": 1}


def test_a_call_cancelled_at_or_after_its_deadline_ended_by_the_deadline() -> None:
    import grpc

    from pipeline.serving.ingress import CANCEL_AT_DEADLINE_SLACK_NS, cancelled_as

    started = 10_000_000_000
    deadline = started + 500_000_000  # time_remaining 0.5 s at the start
    assert cancelled_as(0.5, started, deadline) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert cancelled_as(0.5, started, deadline + 7) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert cancelled_as(0.5, started, deadline - CANCEL_AT_DEADLINE_SLACK_NS) == grpc.StatusCode.DEADLINE_EXCEEDED
    assert cancelled_as(0.5, started, deadline - CANCEL_AT_DEADLINE_SLACK_NS - 1) == grpc.StatusCode.CANCELLED
    assert cancelled_as(0.5, started, started + 1_000) == grpc.StatusCode.CANCELLED
    assert cancelled_as(None, started, started + 10**12) == grpc.StatusCode.CANCELLED  # no deadline: the caller gave up
