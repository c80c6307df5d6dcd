"""The oracle: when an answer counts as right, and whether a comparison can tell at all.

A check that compares the pipeline's answers with the whole model's proves
something only when the reference answers of different inputs differ: a model
that answers the same for every input (a deep network with untouched
BatchNormalization statistics does) passes any routing bug. :func:`spread`
measures how far apart the reference outputs of different inputs are, and
:func:`require_discriminating` refuses a comparison whose tolerance does not
stay below that.

Under dynamic batching a row's last bits depend on the batch it was computed
in (the same row at batch 1 and batch 8 differs by up to ~1e-9 in
MobileNetV3Large). So the oracle is bitwise where the compute is the same (one
request at a time, batching off), and otherwise a tolerance derived from the
model: the largest batch-1 against batch-N difference of the whole model on
the same inputs, times :data:`SAFETY_FACTOR` (:func:`batching_tolerance`). It
must stay far below the spread, so that a misrouted answer still fails.

Pure numpy: no model, no sockets.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import UsageError

#: rows (samples) whose pairwise differences :func:`spread` examines at most (the first ones).
MAX_ROWS = 256
#: how many times the largest measured batch-1 vs batch-N difference the batching tolerance allows.
SAFETY_FACTOR = 10.0
#: batch sizes the batching tolerance is measured at (each row also alone, at batch 1).
TOLERANCE_BATCHES = (2, 3, 8)
NOT_DISCRIMINATING = (
    "the reference outputs do not depend on the input; this comparison cannot tell a right answer from a wrong one"
)


class NotDiscriminating(UsageError):
    """The reference answers of different inputs are too close for the comparison's tolerance."""


@dataclass(frozen=True)
class Spread:
    """How far apart the reference outputs of different inputs are (largest absolute difference per pair)."""

    smallest: float  # over every pair of different inputs: the pair whose outputs are closest
    median: float
    rows: int  # distinct inputs examined
    pairs: int

    def margin(self, tolerance: float) -> float:
        """How many times the tolerance fits in the smallest difference (``inf`` for a bitwise check)."""
        if tolerance <= 0:
            return float("inf") if self.smallest > 0 else 0.0
        return self.smallest / tolerance

    def discriminates(self, tolerance: float) -> bool:
        return self.pairs > 0 and self.smallest > tolerance

    def to_dict(self) -> dict[str, float | int]:
        return {"smallest": self.smallest, "median": self.median, "rows": self.rows, "pairs": self.pairs}


def _rows(arrays: Sequence[Mapping[str, np.ndarray]], names: Sequence[str]) -> list[np.ndarray]:
    """Per name, every request's rows stacked: ``(total rows, features)`` as float64 (NaN kept)."""
    out = []
    for name in names:
        parts = [np.asarray(a[name]) for a in arrays]
        flat = [p.reshape(p.shape[0], -1) if p.ndim else p.reshape(1, 1) for p in parts]
        out.append(np.concatenate(flat).astype(np.float64) if flat else np.zeros((0, 0)))
    return out


def spread(
    inputs: Sequence[Mapping[str, np.ndarray]],
    outputs: Sequence[Mapping[str, np.ndarray]],
    *,
    max_rows: int = MAX_ROWS,
) -> Spread:
    """Pairwise differences of the reference outputs of different inputs, row by row.

    ``inputs[i]`` and ``outputs[i]`` are request i's tensors by name, batch
    axis first. Rows with identical inputs (a replay that cycles its images)
    are compared once; the first ``max_rows`` distinct ones are examined.
    """
    if not outputs:
        return Spread(0.0, 0.0, 0, 0)
    in_names = sorted(inputs[0]) if inputs else []
    out_names = sorted(outputs[0])
    in_rows = _rows(inputs, in_names) if in_names else []
    out_rows = _rows(outputs, out_names)
    total = out_rows[0].shape[0]
    keep: list[int] = []
    seen: set[bytes] = set()
    for r in range(total):
        key = b"".join(np.ascontiguousarray(a[r]).tobytes() for a in in_rows) if in_rows else str(r).encode()
        if key in seen:
            continue
        seen.add(key)
        keep.append(r)
        if len(keep) >= max_rows:
            break
    n = len(keep)
    if n < 2:
        return Spread(0.0, 0.0, n, 0)
    matrix = np.zeros((n, n))
    for a in out_rows:
        x = a[keep]
        for i in range(n):  # row by row: n x features at a time, whatever the output size
            d = np.abs(x[i] - x)
            both_nan = np.isnan(x[i]) & np.isnan(x)
            d = np.where(both_nan, 0.0, np.where(np.isnan(d), np.inf, d))
            matrix[i] = np.maximum(matrix[i], d.max(axis=1) if d.size else 0.0)
    upper = matrix[np.triu_indices(n, k=1)]
    return Spread(smallest=float(upper.min()), median=float(np.median(upper)), rows=n, pairs=int(upper.size))


def require_discriminating(found: Spread, tolerance: float, *, what: str, allow: bool = False) -> str | None:
    """Raise :class:`NotDiscriminating` when ``found`` does not exceed ``tolerance``; with ``allow``, return the warning.

    Returns ``None`` when the comparison can tell a right answer from a wrong one.
    """
    if found.discriminates(tolerance):
        return None
    if found.rows < 2:
        detail = f"{what} has {found.rows} distinct input(s); at least 2 are needed to tell answers apart"
    else:
        kind = "bitwise" if tolerance <= 0 else f"tolerance {tolerance:.3g}"
        detail = (
            f"{what}: the closest outputs of two different inputs differ by at most {found.smallest:.3g} "
            f"(median {found.median:.3g} over {found.pairs} pairs), expected more than the comparison's {kind}"
        )
    message = f"{NOT_DISCRIMINATING} ({detail})"
    if allow:
        return message
    raise NotDiscriminating(message)


def batching_tolerance(
    call: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    sample: Mapping[str, np.ndarray],
    *,
    batches: Sequence[int] = TOLERANCE_BATCHES,
    factor: float = SAFETY_FACTOR,
) -> tuple[float, float]:
    """``(tolerance, measured)``: how far a row may move when dynamic batching regroups it.

    ``call`` runs the whole model on ``{input: array}``; ``sample`` holds at
    least ``max(batches)`` rows. Each row is computed alone and inside batches
    of each size; ``measured`` is the largest difference seen, the tolerance
    ``factor`` times it (0 when batching changes nothing: then bitwise holds).
    """
    rows = min(np.asarray(v).shape[0] for v in sample.values())
    size = min(max(batches), rows)
    alone = [call({k: np.asarray(v)[r : r + 1] for k, v in sample.items()}) for r in range(size)]
    measured = 0.0
    for b in batches:
        b = min(b, size)
        for start in range(0, size - b + 1, b):
            together = call({k: np.asarray(v)[start : start + b] for k, v in sample.items()})
            for name, value in together.items():
                for j in range(b):
                    want = np.asarray(alone[start + j][name], dtype=np.float64)
                    got = np.asarray(value[j : j + 1], dtype=np.float64)
                    if want.size:
                        measured = max(measured, float(np.nanmax(np.abs(want - got))))
    return measured * factor, measured
