"""The join buffer: gathers the parts of each request until a shard has all its inputs.

A shard whose inputs come from several producers (``Topology.producers``)
receives one message per producer for each request. The buffer holds the
parts, keyed by request id, until every input tensor has arrived, then hands
the whole request back as :class:`Ready`. Pure logic: no sockets, no clocks
(the caller passes ``now_ns``, and deadlines on the same clock: the worker's
monotonic one, see :mod:`pipeline.wire.deadline`), so it is tested directly.

Bounds, all named: at most ``max_pending`` requests wait at once (a new one
beyond that is refused, and the caller answers ``RESOURCE_EXHAUSTED``); every
pending request has a deadline (its own, or ``part_timeout_s`` after its
first part when the envelope carries none), and ``expire`` drops the ones
past it (the caller answers ``DEADLINE_EXCEEDED``). So neither a lost part nor
a burst of incomplete requests can grow memory without bound.

The buffer does not remember requests that have ended: a part arriving after
its request completed or expired starts a new entry, which expires in turn.
That costs one slot until the deadline and at most a second error message for
an id the ingress has already ended (it ends each request exactly once), and
it avoids a table of ended ids that would wrongly drop a reused id.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.log import get_logger

#: requests waiting for parts at once, per worker.
DEFAULT_MAX_PENDING = 1024
#: how long a request whose envelope has no deadline (``budget_ns == 0``) may wait for its parts.
DEFAULT_PART_TIMEOUT_S = 30.0

log = get_logger("pipeline.join")


class SpanLike(Protocol):
    """What the buffer needs of a span (``pipeline.pb`` ``Span`` fits)."""

    name: str
    start_ns: int
    end_ns: int


class Status(enum.Enum):
    """What became of one part."""

    PENDING = "pending"  # accepted; the request waits for more parts
    COMPLETE = "complete"  # accepted; the request has all its inputs (``Outcome.ready``)
    DUPLICATE = "duplicate"  # every tensor in it had already arrived for this request; ignored
    UNEXPECTED = "unexpected"  # it carries no tensor this shard takes; ignored
    REFUSED = "refused"  # a new request while ``max_pending`` are waiting; answer RESOURCE_EXHAUSTED
    EXPIRED = "expired"  # its deadline had passed on arrival; request dropped, answer DEADLINE_EXCEEDED


@dataclass(frozen=True)
class Ready:
    """A request with all its inputs, ready to compute."""

    request_id: int
    model: str
    deadline_ns: int  # on the caller's clock (the worker's monotonic one, from the envelopes' budgets; 0: none)
    tensors: dict[str, Any]
    spans: tuple[Any, ...]  # the parts' spans, merged (duplicates removed), in arrival order
    first_ns: int  # arrival of the first part
    ready_ns: int  # arrival of the last part
    senders: tuple[str, ...]
    attempt: int = 0
    #: the replicas the ingress chose for discovered shards (``Envelope.routes``: shard -> address), sent on
    routes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Outcome:
    status: Status
    request_id: int
    ready: Ready | None = None
    ignored: tuple[str, ...] = ()  # tensor names ignored (already received, or not taken by this shard)


@dataclass(slots=True)
class _Pending:
    model: str
    deadline_ns: int  # on the caller's clock, from the envelopes' budgets (0: none)
    expires_ns: int  # when ``expire`` drops it
    first_ns: int
    attempt: int
    tensors: dict[str, Any] = field(default_factory=dict)
    spans: list[Any] = field(default_factory=list)
    span_keys: set[tuple[str, int, int]] = field(default_factory=set)
    senders: list[str] = field(default_factory=list)
    routes: Mapping[str, str] = field(default_factory=dict)


class JoinBuffer:
    """Parts of requests keyed by request id, until all of a shard's inputs have arrived.

    ``producers`` is ``Topology.producers(shard)``: producer name -> the tensor
    names it sends. Completion is decided by tensor names (every input of the
    shard), so a producer's parts may arrive in any order.
    """

    def __init__(
        self,
        producers: Mapping[str, Sequence[str]],
        *,
        max_pending: int = DEFAULT_MAX_PENDING,
        part_timeout_s: float = DEFAULT_PART_TIMEOUT_S,
        shard: str = "",
    ) -> None:
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, received {max_pending}")
        if part_timeout_s <= 0:
            raise ValueError(f"part_timeout_s must be > 0, received {part_timeout_s}")
        self.producers: dict[str, tuple[str, ...]] = {p: tuple(names) for p, names in producers.items()}
        self.inputs: frozenset[str] = frozenset(n for names in self.producers.values() for n in names)
        if not self.inputs:
            raise ValueError("a join needs at least one input tensor, received none")
        self.max_pending = max_pending
        self.part_timeout_ns = int(part_timeout_s * 1e9)
        self.shard = shard
        self._pending: dict[int, _Pending] = {}
        self._next_expiry_ns: int | None = None  # a lower bound of the pending expiries
        self.counts: dict[str, int] = {s.value: 0 for s in Status}
        self.counts["swept"] = 0

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._pending

    def missing(self, request_id: int) -> tuple[str, ...]:
        """The inputs a pending request still waits for (empty when it is not pending)."""
        entry = self._pending.get(request_id)
        if entry is None:
            return ()
        return tuple(sorted(self.inputs - entry.tensors.keys()))

    @property
    def next_expiry_ns(self) -> int | None:
        """No pending request expires before this time (``None``: nothing pending)."""
        return self._next_expiry_ns if self._pending else None

    # ------------------------------------------------------------------ updates
    def add(
        self,
        request_id: int,
        tensors: Mapping[str, Any],
        *,
        now_ns: int,
        deadline_ns: int = 0,
        sender: str = "",
        model: str = "",
        spans: Iterable[Any] = (),
        attempt: int = 0,
        routes: Mapping[str, str] | None = None,
    ) -> Outcome:
        """Take one part of a request; say whether it completed the request."""
        expected = [n for n in tensors if n in self.inputs]
        ignored = tuple(n for n in tensors if n not in self.inputs)
        if ignored:
            log.warning(
                "join_unexpected_tensors",
                shard=self.shard,
                request_id=request_id,
                sender=sender,
                received=list(ignored),
                expected=sorted(self.inputs),
            )
        if deadline_ns and deadline_ns <= now_ns:
            self._pending.pop(request_id, None)
            return self._count(Outcome(Status.EXPIRED, request_id, ignored=ignored))
        if not expected:
            return self._count(Outcome(Status.UNEXPECTED, request_id, ignored=ignored))

        entry = self._pending.get(request_id)
        if entry is None:
            if len(expected) == len(self.inputs):  # one part with everything: no need to store it
                ready = Ready(
                    request_id=request_id,
                    model=model,
                    deadline_ns=deadline_ns,
                    tensors={n: tensors[n] for n in expected},
                    spans=tuple(_merge([], set(), spans)),
                    first_ns=now_ns,
                    ready_ns=now_ns,
                    senders=(sender,),
                    attempt=attempt,
                    routes=dict(routes or {}),
                )
                return self._count(Outcome(Status.COMPLETE, request_id, ready=ready, ignored=ignored))
            if len(self._pending) >= self.max_pending:
                log.warning(
                    "join_full", shard=self.shard, request_id=request_id, sender=sender, max_pending=self.max_pending
                )
                return self._count(Outcome(Status.REFUSED, request_id, ignored=ignored))
            expires = deadline_ns if deadline_ns else now_ns + self.part_timeout_ns
            entry = _Pending(
                model=model, deadline_ns=deadline_ns, expires_ns=expires, first_ns=now_ns, attempt=attempt, routes=dict(routes or {})
            )
            self._pending[request_id] = entry
            if self._next_expiry_ns is None or expires < self._next_expiry_ns or len(self._pending) == 1:
                self._next_expiry_ns = expires

        duplicates = tuple(n for n in expected if n in entry.tensors)
        fresh = [n for n in expected if n not in entry.tensors]
        if duplicates:
            log.warning(
                "join_duplicate_part", shard=self.shard, request_id=request_id, sender=sender, tensors=list(duplicates)
            )
        if not fresh:
            return self._count(Outcome(Status.DUPLICATE, request_id, ignored=ignored + duplicates))
        if deadline_ns and (not entry.deadline_ns or deadline_ns < entry.deadline_ns):
            # parts of one request carry one deadline; if they differ, the earliest wins
            entry.deadline_ns = deadline_ns
            entry.expires_ns = min(entry.expires_ns, deadline_ns)
            if self._next_expiry_ns is None or entry.expires_ns < self._next_expiry_ns:
                self._next_expiry_ns = entry.expires_ns
        for n in fresh:
            entry.tensors[n] = tensors[n]
        _merge(entry.spans, entry.span_keys, spans)
        entry.senders.append(sender)
        if len(entry.tensors) < len(self.inputs):
            return self._count(Outcome(Status.PENDING, request_id, ignored=ignored + duplicates))
        del self._pending[request_id]
        ready = Ready(
            request_id=request_id,
            model=entry.model or model,
            deadline_ns=entry.deadline_ns,
            tensors=entry.tensors,
            spans=tuple(entry.spans),
            first_ns=entry.first_ns,
            ready_ns=now_ns,
            senders=tuple(entry.senders),
            attempt=entry.attempt,
            routes=entry.routes,
        )
        return self._count(Outcome(Status.COMPLETE, request_id, ready=ready, ignored=ignored + duplicates))

    def expire(self, now_ns: int) -> list[int]:
        """Drop every pending request whose deadline has passed; return their ids (oldest deadline first)."""
        if not self._pending or (self._next_expiry_ns is not None and now_ns < self._next_expiry_ns):
            return []
        gone = sorted(((e.expires_ns, rid) for rid, e in self._pending.items() if e.expires_ns <= now_ns))
        for _, rid in gone:
            entry = self._pending.pop(rid)
            log.info(
                "join_expired",
                shard=self.shard,
                request_id=rid,
                missing=sorted(self.inputs - entry.tensors.keys()),
                waited_ms=round((now_ns - entry.first_ns) / 1e6, 3),
            )
        self._next_expiry_ns = min((e.expires_ns for e in self._pending.values()), default=None)
        self.counts["swept"] += len(gone)
        return [rid for _, rid in gone]

    def discard(self, request_id: int) -> bool:
        """Forget a pending request (it ended elsewhere); True when it was pending."""
        return self._pending.pop(request_id, None) is not None

    def clear(self) -> list[int]:
        """Forget every pending request; return their ids (used when the worker stops)."""
        ids = list(self._pending)
        self._pending.clear()
        self._next_expiry_ns = None
        return ids

    def _count(self, outcome: Outcome) -> Outcome:
        self.counts[outcome.status.value] += 1
        return outcome


def _merge(into: list[Any], keys: set[tuple[str, int, int]], spans: Iterable[Any]) -> list[Any]:
    """Append the spans not already present (parts that share an upstream path carry the same spans)."""
    for span in spans:
        key = (span.name, int(span.start_ns), int(span.end_ns))
        if key not in keys:
            keys.add(key)
            into.append(span)
    return into
