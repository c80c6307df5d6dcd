"""Deadlines on the wire: the remaining budget, never an absolute time.

Each process keeps its deadlines on its own monotonic clock
(``time.monotonic_ns()``). When it sends a request on, it puts the time left
(``Envelope.budget_ns``) in the envelope; the receiver adds that to *its*
monotonic clock. This is what gRPC does with its ``grpc-timeout`` header, and
for the same reason: no two hosts' clocks are ever compared, so a host whose
wall clock is seconds (or hours) off neither expires every request nor keeps
dead ones forever, and a wall-clock step (NTP, a VM resumed) moves no deadline.

The price: the time a message spends in transit (in ZeroMQ's queues and on
the network) is not charged to its budget, so each hop grants up to one
transit time more than the client asked for. The ingress keeps the client's
own deadline and answers ``DEADLINE_EXCEEDED`` on time whatever the shards
do; a shard that computes a request a little late only wastes work (its
result is ignored).

Timing spans (``Span.start_ns``, ``Envelope.sent_ns``) stay wall-clock
(``time.time_ns()``) because they are compared across processes; across hosts
they are only as good as the hosts' clocks. :func:`wall_ns` turns a monotonic
reading into a wall-clock one for a span.

Pure functions; the caller passes ``now_ns`` (monotonic) so they are tested directly.
"""

from __future__ import annotations

import time

#: ``budget_ns`` (and an internal ``deadline_ns``) of a request without a deadline.
NO_DEADLINE = 0
#: the budget a sender puts on a request whose time is already spent (0 would mean "no deadline").
SPENT_BUDGET_NS = -1
#: the largest budget sent: a client's "forever" must neither overflow int64 nor expire.
MAX_BUDGET_NS = 1 << 62


def now_ns() -> int:
    """The clock every deadline is kept on: this host's monotonic clock, in ns."""
    return time.monotonic_ns()


def deadline_after(timeout_s: float, now: int) -> int:
    """The monotonic deadline ``timeout_s`` seconds after ``now`` (at least 1 ns after it, never "none")."""
    return now + max(1, min(MAX_BUDGET_NS, round(timeout_s * 1e9)))


def budget(deadline_ns: int, now: int) -> int:
    """What to send for a local monotonic ``deadline_ns`` at ``now``: the time left, ``SPENT_BUDGET_NS`` when none is."""
    if deadline_ns == NO_DEADLINE:
        return NO_DEADLINE
    left = deadline_ns - now
    return min(left, MAX_BUDGET_NS) if left > 0 else SPENT_BUDGET_NS


def deadline(budget_ns: int, now: int) -> int:
    """The local monotonic deadline of a message received at ``now`` with ``budget_ns`` (0: none).

    A spent (negative) budget gives a deadline at or before ``now``, so the usual
    ``deadline and deadline <= now`` check expires it at once.
    """
    if budget_ns == NO_DEADLINE:
        return NO_DEADLINE
    value = now + min(budget_ns, MAX_BUDGET_NS) if budget_ns > 0 else now
    return value if value != NO_DEADLINE else SPENT_BUDGET_NS  # a clock that reads 0 must not mean "none"


def expired(deadline_ns: int, now: int) -> bool:
    """True when a request with this local deadline must not be worked on any more."""
    return deadline_ns != NO_DEADLINE and deadline_ns <= now


def wall_ns(monotonic_ns: int) -> int:
    """The wall-clock time (``time.time_ns()``) of a reading of :func:`now_ns` taken in this process, for spans."""
    return monotonic_ns + (time.time_ns() - time.monotonic_ns())
