"""Choosing the cuts.

A plan cuts the graph's topological order into K contiguous segments, one per
shard. Every edge of the graph goes forward in that order, so any such plan is
a DAG of shards (a tensor may skip shards: it is sent straight to each shard
that consumes it) and no set of cuts can make a cycle.

``plan_balanced`` is exact over the candidate cuts, in two passes of dynamic
programming: first the smallest possible cost of the slowest shard (that bounds
the pipeline's throughput), then, among the plans whose slowest shard is within
``slack`` of that optimum, the one that sends the fewest bytes across cuts.
A position is a candidate cut unless a tensor crossing it could not travel
between processes: one with no batch axis, or a dtype the wire does not carry.
A tensor that carries a Keras mask crosses together with its mask, a boolean
tensor of its own (:mod:`pipeline.partition.masks`), so masks refuse no cut;
only a mask that is not shaped like its tensor's leading axes (which no Keras
layer makes) could not be re-attached, and refuses the cuts it would cross.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import PartitionError
from pipeline.partition.graph import Graph
from pipeline.topology import DTYPES

#: within 5 % of the best balance (about the cost model's own error on a shard), fewer bytes win: on
#: MobileNetV3Large in 4 shards this halves the bytes crossing cuts (1.9 MB to 1.0 MB a sample).
DEFAULT_SLACK = 0.05


@dataclass(frozen=True)
class Crossings:
    """Per boundary ``b`` (a cut after the op at position ``b - 1``): bytes crossing and whether it may be cut."""

    bytes: np.ndarray  # shape (N + 1,), bytes per sample crossing boundary b
    allowed: np.ndarray  # shape (N + 1,), bool
    reasons: dict[int, str]  # why a boundary may not be cut


def crossings(graph: Graph, tensor_bytes: Sequence[int]) -> Crossings:
    n = len(graph.ops)
    diff_bytes = np.zeros(n + 2, dtype=np.float64)
    diff_bad = np.zeros(n + 2, dtype=np.int64)
    bad_reason: dict[int, str] = {}
    for t in graph.tensors:
        if not t.consumers:
            continue
        start = 0 if t.producer is None else t.producer + 1  # first boundary it crosses
        end = max(t.consumers)  # last boundary it crosses is before its last consumer
        if end < start:
            continue
        diff_bytes[start] += tensor_bytes[t.id]
        diff_bytes[end + 1] -= tensor_bytes[t.id]
        problem = ""
        if not t.is_batched:
            problem = f"tensor {t.name!r} has no batch axis (shape {list(t.shape)})"
        elif t.dtype not in DTYPES:
            problem = f"tensor {t.name!r} has dtype {t.dtype}, which the wire does not carry"
        elif t.mask_of is not None and not _leading_axes(t.shape, graph.tensors[t.mask_of].shape):
            of = graph.tensors[t.mask_of]
            problem = (
                f"tensor {of.name!r} {list(of.shape)} carries a Keras mask of shape {list(t.shape)}, which is not its "
                "leading axes, so it cannot be re-attached in another process"
            )
        if problem and t.producer is not None:
            diff_bad[start] += 1
            diff_bad[end + 1] -= 1
            for b in range(start, end + 1):
                bad_reason.setdefault(b, problem)
    crossing_bytes = np.cumsum(diff_bytes)[: n + 1]
    bad = np.cumsum(diff_bad)[: n + 1]
    allowed = bad == 0
    allowed[0] = False
    allowed[n] = False
    return Crossings(bytes=crossing_bytes, allowed=allowed, reasons=bad_reason)


def _leading_axes(mask: tuple[int | None, ...], shape: tuple[int | None, ...]) -> bool:
    """``mask`` is shaped like the first axes of ``shape`` (unknown sizes match anything)."""
    return 0 < len(mask) <= len(shape) and all(a is None or b is None or a == b for a, b in zip(mask, shape))


def check_shard_count(k: int, cut_points: int, operations: int) -> None:
    """:class:`PartitionError` unless ``k`` shards can be cut from a model with ``cut_points`` places to cut."""
    if k < 1:
        raise PartitionError(f"--shards must be at least 1, received {k}")
    if k - 1 > cut_points:
        raise PartitionError(
            f"--shards {k} needs {k - 1} cut points, but this model has only {cut_points} places where it can be "
            f"cut ({operations} operations); expected --shards between 1 and {cut_points + 1}"
        )


def plan_balanced(
    seconds: Sequence[float], cross: Crossings, k: int, slack: float = DEFAULT_SLACK
) -> list[int]:
    """Boundaries (sorted, ``k - 1`` of them) minimising the slowest shard, then the bytes crossing cuts."""
    n = len(seconds)
    candidates = np.flatnonzero(cross.allowed)
    check_shard_count(k, len(candidates), n)
    if k == 1:
        return []
    prefix = np.concatenate([[0.0], np.cumsum(np.asarray(seconds, dtype=np.float64))])
    best = _min_bottleneck(prefix, candidates, k)
    bound = best * (1.0 + slack) + 1e-12
    return _min_bytes(prefix, candidates, cross.bytes, k, bound)


def _min_bottleneck(prefix: np.ndarray, candidates: np.ndarray, k: int) -> float:
    n = len(prefix) - 1
    inf = np.inf
    # f[b]: the best bottleneck of the ops before boundary b split into `parts` shards.
    f = np.full(n + 1, inf)
    f[candidates] = prefix[candidates]
    f_end = prefix[n]
    for parts in range(2, k + 1):
        g = np.full(n + 1, inf)
        ends = candidates if parts < k else np.array([n])
        for b in ends:
            starts = candidates[candidates < b]
            if len(starts) == 0:
                continue
            vals = np.maximum(f[starts], prefix[b] - prefix[starts])
            g[b] = vals.min()
        f = g
        f_end = f[n]
    return float(f_end)


def _min_bytes(prefix: np.ndarray, candidates: np.ndarray, cut_bytes: np.ndarray, k: int, bound: float) -> list[int]:
    n = len(prefix) - 1
    inf = np.inf
    f = np.full(n + 1, inf)
    ok = prefix[candidates] <= bound
    f[candidates[ok]] = cut_bytes[candidates[ok]]
    back: list[dict[int, int]] = []
    for parts in range(2, k + 1):
        g = np.full(n + 1, inf)
        arg: dict[int, int] = {}
        ends = candidates if parts < k else np.array([n])
        for b in ends:
            starts = candidates[(candidates < b) & (prefix[b] - prefix[candidates] <= bound)]
            if len(starts) == 0:
                continue
            vals = f[starts] + (cut_bytes[b] if b < n else 0.0)
            i = int(np.argmin(vals))
            if np.isfinite(vals[i]):
                g[b] = vals[i]
                arg[int(b)] = int(starts[i])
        back.append(arg)
        f = g
    if not np.isfinite(f[n]):
        raise PartitionError("no plan meets the balance bound; this is a bug in the planner")
    cuts = []
    b = n
    for arg in reversed(back):
        b = arg[b]
        cuts.append(b)
    return sorted(cuts)


def boundaries_for_cuts(graph: Graph, names: Sequence[str], cross: Crossings) -> list[int]:
    """Boundaries for ``--cut NAME``: a cut right after each named operation (or tensor)."""
    by_op = {op.name: op.id for op in graph.ops}
    by_tensor = {t.name: t.producer for t in graph.tensors if t.producer is not None and t.name}
    boundaries = set()
    for name in names:
        if name in by_op:
            position = by_op[name]
        elif name in by_tensor:
            position = by_tensor[name]
        else:
            close = difflib.get_close_matches(name, list(by_op), n=6, cutoff=0.5)
            hint = f"the closest names are {close}" if close else "run `pipeline partition SOURCE --list-ops` to see them"
            raise PartitionError(
                f"--cut {name!r}: no operation of this model has that name; expected the name of a layer or operation "
                f"(as `pipeline partition --list-ops` prints); {hint}"
            )
        b = position + 1
        if b >= len(graph.ops):
            raise PartitionError(
                f"--cut {name!r}: it is the last operation of the model, so cutting after it leaves an empty shard"
            )
        if not cross.allowed[b]:
            raise PartitionError(f"--cut {name!r}: the model cannot be cut there: {cross.reasons.get(b, 'not a valid cut')}")
        if b in boundaries:
            raise PartitionError(f"--cut {name!r} is given twice; each cut must be a different operation")
        boundaries.add(b)
    return sorted(boundaries)
