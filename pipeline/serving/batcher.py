"""Dynamic batching: ready requests wait briefly so that one model call serves several.

Pure logic, no sockets and no clocks (the caller passes ``now_ns``). The
worker puts each ready request here with its row count (batch axis size) and
a *key* that says which requests can share a call (same tensor names, dtypes
and shapes past the batch axis). When the compute thread is free, ``take``
hands out a batch: the oldest request and the later ones with its key, up to
``max_batch`` rows, once the batch is full or the oldest has waited
``max_delay_ms``. ``concat`` and ``split`` join the tensors along axis 0 and
cut the outputs back per request.

``max_batch`` counts rows, so a compute call never exceeds it, except for a
single request larger than that, which runs alone and whole. No padding to
bucket sizes: the runtime's ``tf.function`` has a ``None`` batch axis in its
input signature, so a new batch size does not retrace.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

#: ready requests waiting for the compute thread, per worker.
DEFAULT_MAX_QUEUED = 1024

T = TypeVar("T")


@dataclass(frozen=True)
class _Queued(Generic[T]):
    item: T
    rows: int
    key: Hashable
    since_ns: int


class Batcher(Generic[T]):
    """A bounded FIFO of ready requests, released in batches."""

    def __init__(self, max_batch: int, max_delay_ms: float, max_queued: int = DEFAULT_MAX_QUEUED) -> None:
        if max_batch < 1 or max_delay_ms < 0 or max_queued < 1:
            raise ValueError(
                f"expected max_batch >= 1, max_delay_ms >= 0, max_queued >= 1; "
                f"received {max_batch}, {max_delay_ms}, {max_queued}"
            )
        self.max_batch = max_batch
        self.max_delay_ns = int(max_delay_ms * 1e6)
        self.max_queued = max_queued
        self._queue: deque[_Queued[T]] = deque()

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, item: T, *, rows: int, key: Hashable, now_ns: int) -> bool:
        """Queue a ready request; False when ``max_queued`` are already waiting (the caller refuses it)."""
        if len(self._queue) >= self.max_queued:
            return False
        self._queue.append(_Queued(item, max(int(rows), 1), key, now_ns))
        return True

    def due_in_ns(self, now_ns: int) -> int | None:
        """How long until ``take`` releases a batch (0: now; ``None``: nothing queued)."""
        if not self._queue:
            return None
        head = self._queue[0]
        if self._rows_for(head.key) >= self.max_batch:
            return 0
        return max(0, head.since_ns + self.max_delay_ns - now_ns)

    def take(self, now_ns: int, *, force: bool = False) -> list[T]:
        """The next batch when it is due (or at once with ``force``); empty when none is."""
        if not self._queue:
            return []
        if not force and self.due_in_ns(now_ns) != 0:
            return []
        head = self._queue.popleft()
        batch, rows = [head.item], head.rows
        kept: deque[_Queued[T]] = deque()
        while self._queue:
            q = self._queue.popleft()
            if q.key == head.key and rows + q.rows <= self.max_batch:
                batch.append(q.item)
                rows += q.rows
            else:
                kept.append(q)
                if rows >= self.max_batch:
                    break
        kept.extend(self._queue)
        self._queue = kept
        return batch

    def drop(self, predicate: Callable[[T], bool]) -> list[T]:
        """Remove and return the queued requests for which ``predicate`` holds (for example, past deadline)."""
        gone = [q.item for q in self._queue if predicate(q.item)]
        if gone:
            self._queue = deque(q for q in self._queue if not predicate(q.item))
        return gone

    def clear(self) -> list[T]:
        items = [q.item for q in self._queue]
        self._queue.clear()
        return items

    def _rows_for(self, key: Hashable) -> int:
        return sum(q.rows for q in self._queue if q.key == key)


def batch_key(tensors: Mapping[str, np.ndarray]) -> Hashable:
    """Requests with equal keys can be concatenated along axis 0.

    A request whose tensors have no batch axis, or disagree on its size, gets
    a key of its own and is computed alone.
    """
    sizes = {a.shape[0] if a.ndim else None for a in tensors.values()}
    if len(sizes) != 1 or None in sizes:
        return object()
    return tuple(sorted((name, a.dtype.str, a.shape[1:]) for name, a in tensors.items()))


def rows(tensors: Mapping[str, np.ndarray]) -> int:
    """The batch axis size of a request (1 for tensors without one)."""
    for a in tensors.values():
        return int(a.shape[0]) if a.ndim else 1
    return 1


def concat(parts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Join requests' tensors along axis 0 (one request: its tensors unchanged, no copy)."""
    if len(parts) == 1:
        return dict(parts[0])
    return {name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}


def split(outputs: Mapping[str, Any], sizes: Sequence[int]) -> list[dict[str, Any]]:
    """Cut a batch's outputs back into one dict per request (views, no copy).

    Raises ``ValueError`` when an output's batch axis does not match the rows
    that went in (a model that mixes rows cannot be batched).
    """
    if len(sizes) == 1:
        return [dict(outputs)]
    total = sum(sizes)
    for name, value in outputs.items():
        if np.ndim(value) == 0 or value.shape[0] != total:
            raise ValueError(
                f"output {name!r} has shape {list(np.shape(value))}; expected a batch axis of {total} rows to split"
            )
    bounds = np.cumsum([0, *sizes])
    return [{name: value[bounds[i] : bounds[i + 1]] for name, value in outputs.items()} for i in range(len(sizes))]
