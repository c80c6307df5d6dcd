"""The ingress's pending-request table and the shards' liveness table.

Pure logic, no sockets (mosec style): a request id maps to a future and the
model outputs still expected; a result part fills some of them, and the
request completes when none is left. Every path that ends a request (result,
error, deadline, cancellation, a shard going down, shutdown) goes through
:meth:`PendingTable.finish`, which pops the entry first, so a request ends
exactly once and nothing stays behind. Parts for ids no longer in the table
(late, duplicate, unknown) are counted and ignored.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np

from pipeline.errors import PipelineError
from pipeline.pb import envelope_pb2 as pb


@dataclass
class Outcome:
    """What a completed request gathered: its outputs and the spans of every part."""

    outputs: dict[str, np.ndarray]
    spans: list[pb.Span]


@dataclass
class Entry:
    request_id: int
    future: asyncio.Future[Outcome]
    expected: set[str]
    batch_size: int
    deadline_ns: int  # time.monotonic_ns() of this process (pipeline.wire.deadline); 0: none
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    spans: list[pb.Span] = field(default_factory=list)


class PendingTable:
    """Request id -> :class:`Entry`; bounded by ``capacity`` (the in-flight limit)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: dict[int, Entry] = {}
        self.ignored: Counter[str] = Counter()  # parts that matched no pending request, by reason

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._entries

    @property
    def full(self) -> bool:
        return len(self._entries) >= self.capacity

    def add(self, request_id: int, expected: Iterable[str], batch_size: int, deadline_ns: int) -> asyncio.Future[Outcome]:
        if request_id in self._entries:
            raise ValueError(f"request id {request_id} is already pending")
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._entries[request_id] = Entry(request_id, future, set(expected), batch_size, deadline_ns)
        return future

    def get(self, request_id: int) -> Entry | None:
        return self._entries.get(request_id)

    def part(self, request_id: int, tensors: Mapping[str, np.ndarray], spans: Iterable[pb.Span]) -> str | None:
        """Record a RESULT part; return ``None`` when it was used, else the reason it was ignored.

        Completes the request when no output is left. A part naming an output
        that is not (or no longer) expected is ignored as a whole.
        """
        entry = self._entries.get(request_id)
        if entry is None:
            self.ignored["unknown_request"] += 1
            return "unknown_request"
        unexpected = [n for n in tensors if n not in entry.expected]
        if unexpected:
            self.ignored["unexpected_output"] += 1
            return "unexpected_output"
        for name, value in tensors.items():
            entry.outputs[name] = value
            entry.expected.discard(name)
        entry.spans.extend(spans)
        if not entry.expected:
            self.finish(request_id, Outcome(entry.outputs, entry.spans))
        return None

    def finish(self, request_id: int, result: Outcome | PipelineError) -> bool:
        """End a request with outputs or an error; False when it had already ended."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return False
        if not entry.future.done():
            if isinstance(result, PipelineError):
                entry.future.set_exception(result)
            else:
                entry.future.set_result(result)
        return True

    def discard(self, request_id: int) -> None:
        """Forget a request whose caller gave up (deadline, cancellation); a no-op when already gone."""
        entry = self._entries.pop(request_id, None)
        if entry is not None and not entry.future.done():
            entry.future.cancel()

    def fail_all(self, make_error: Callable[[], PipelineError]) -> int:
        """End every pending request with its own error from ``make_error()``; return how many."""
        ids = list(self._entries)
        for rid in ids:
            self.finish(rid, make_error())
        return len(ids)

    def expired(self, now_ns: int | None = None) -> list[int]:
        """Ids whose deadline has passed (the caller ends them)."""
        now_ns = time.monotonic_ns() if now_ns is None else now_ns
        return [rid for rid, e in self._entries.items() if e.deadline_ns and e.deadline_ns <= now_ns]


# ------------------------------------------------------------------ liveness
@dataclass
class ShardState:
    last_seen: float = 0.0  # monotonic seconds of the last heartbeat (0: never)
    ready: bool = False
    pid: int = 0
    connected: bool = True  # the ingress's PUSH to it has a live peer (entry shards only)


class Liveness:
    """Which shards are up: a heartbeat younger than ``down_after_s`` that says ``ready``."""

    def __init__(self, shards: Iterable[str], down_after_s: float) -> None:
        self.down_after_s = down_after_s
        self._state = {name: ShardState() for name in shards}
        self._was_up = {name: False for name in self._state}

    @property
    def shards(self) -> list[str]:
        return list(self._state)

    def knows(self, shard: str) -> bool:
        return shard in self._state

    def beat(self, shard: str, ready: bool, pid: int, now: float | None = None) -> bool:
        """Record a heartbeat; return True when the shard restarted (a new pid after a known one)."""
        state = self._state[shard]
        restarted = bool(state.pid) and pid != state.pid
        state.last_seen = time.monotonic() if now is None else now
        state.ready = ready
        state.pid = pid
        return restarted

    def set_connected(self, shard: str, connected: bool) -> None:
        self._state[shard].connected = connected

    def pid_of(self, shard: str) -> int:
        return self._state[shard].pid

    def is_up(self, shard: str, now: float | None = None) -> bool:
        state = self._state[shard]
        now = time.monotonic() if now is None else now
        return state.ready and state.connected and state.last_seen > 0 and now - state.last_seen < self.down_after_s

    def not_up(self, now: float | None = None) -> dict[str, str]:
        """Shards that are not up, each with the reason."""
        now = time.monotonic() if now is None else now
        reasons: dict[str, str] = {}
        for name, state in self._state.items():
            if state.last_seen == 0:
                reasons[name] = "no heartbeat yet"
            elif now - state.last_seen >= self.down_after_s:
                reasons[name] = f"last heartbeat {now - state.last_seen:.1f} s ago"
            elif not state.ready:
                reasons[name] = "not ready (loading or warming up)"
            elif not state.connected:
                reasons[name] = "the ingress is not connected to its endpoint yet"
        return reasons

    def all_up(self, now: float | None = None) -> bool:
        return not self.not_up(now)

    def went_down(self, now: float | None = None) -> list[str]:
        """Shards that were up at the previous call and are not up now (edge-triggered)."""
        now = time.monotonic() if now is None else now
        down = []
        for name in self._state:
            up = self.is_up(name, now)
            if self._was_up[name] and not up:
                down.append(name)
            self._was_up[name] = up
        return down
