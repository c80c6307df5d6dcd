"""The arithmetic of the probes: steady-state rates, round-trip statistics, sizes and rounding (no sockets, no clocks).

A link is measured as a series of deliveries, each ``(seconds since the
start, bytes)``: the time an acknowledgement (upload) or the data (download)
arrived. The first part of the run is TCP's ramp-up (slow start, the peer
waking up), so the rate is taken over what was delivered after a warm-up:
the bytes of the deliveries after the first one past the warm-up, over the
time between that one and the last. Deliveries are acknowledged, so what the
sender has only queued never counts.
"""

from __future__ import annotations

import math
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.errors import UsageError

#: the part of a bandwidth run left out as ramp-up (TCP slow start, the peer's first wake-up).
WARMUP_FRACTION = 0.2
#: significant figures written into a cluster file (the measurement is not better than that).
SIGNIFICANT = 3
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")
#: byte-size units of ``--bytes`` (binary and decimal, as people write them).
SIZE_UNITS: dict[str, int] = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30,
}  # fmt: skip


@dataclass(frozen=True)
class Delivery:
    """One message delivered: seconds since the run started, and its payload bytes."""

    at_s: float
    nbytes: int


@dataclass(frozen=True)
class Rate:
    """A steady-state rate: payload bytes over seconds, and how many deliveries it rests on."""

    nbytes: int
    seconds: float
    deliveries: int

    @property
    def bits_per_s(self) -> float:
        return self.nbytes * 8 / self.seconds if self.seconds > 0 else 0.0


def steady_rate(deliveries: Sequence[Delivery], duration_s: float, warmup_fraction: float = WARMUP_FRACTION) -> Rate:
    """The rate after the warm-up (the first ``warmup_fraction`` of ``duration_s``).

    Counted from the first delivery at or past the warm-up to the last one:
    the bytes delivered after the first, over the time between them. With
    fewer than two deliveries past the warm-up (a very slow link, or large
    messages), the whole run from its start counts instead.
    """
    if not deliveries:
        raise ValueError("expected at least one delivery to compute a rate, received none")
    if not 0 <= warmup_fraction < 1:
        raise ValueError(f"expected a warm-up fraction in [0, 1), received {warmup_fraction}")
    ordered = sorted(deliveries, key=lambda d: d.at_s)
    warm = warmup_fraction * duration_s
    after = [d for d in ordered if d.at_s >= warm]
    if len(after) >= 2 and after[-1].at_s > after[0].at_s:
        return Rate(nbytes=sum(d.nbytes for d in after[1:]), seconds=after[-1].at_s - after[0].at_s, deliveries=len(after) - 1)
    return Rate(nbytes=sum(d.nbytes for d in ordered), seconds=ordered[-1].at_s, deliveries=len(ordered))


@dataclass(frozen=True)
class RoundTrips:
    """Round-trip times of small messages, in seconds."""

    samples: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.samples)

    @property
    def min_s(self) -> float:
        return min(self.samples)

    @property
    def p90_s(self) -> float:
        return percentile(self.samples, 90)

    def one_way_s(self, hop_floor_s: float) -> float:
        """The link's one-way latency as the cluster file means it: half the median round trip less the hop floor.

        The planner adds the floor of a hop between two processes (waking the
        receiver) to every hop itself, and a round trip between two Python
        processes pays it once each way, so it is taken off here (never below zero).
        """
        return max(0.0, self.median_s / 2 - hop_floor_s)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (linear interpolation between the closest ranks)."""
    if not values:
        raise ValueError("expected at least one value, received none")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def round_significant(value: float, digits: int = SIGNIFICANT) -> float:
    """``value`` to ``digits`` significant figures (0 stays 0)."""
    if value == 0 or not math.isfinite(value):
        return value
    return round(value, digits - 1 - math.floor(math.log10(abs(value))))


def parse_size(text: str | int, what: str = "--bytes") -> int:
    """``1MiB`` -> 1048576, ``64k`` -> 64000, ``4096`` -> 4096; anything else is a :class:`UsageError`."""
    if isinstance(text, int):
        value = text
    else:
        m = _SIZE.match(text)
        factor = SIZE_UNITS.get(m.group(2).lower()) if m else None
        if m is None or factor is None:
            raise UsageError(f"{what}: expected a size in bytes such as 1MiB, 256KiB, 4MB or 65536; received {text!r}")
        value = int(float(m.group(1)) * factor)
    if value <= 0:
        raise UsageError(f"{what}: expected a size above zero, received {text!r}")
    return value


def relative_speed(samples_per_s: float, baseline_samples_per_s: float) -> float:
    """A host's speed for the cluster file: its rate over the baseline host's rate on the same reference run."""
    if baseline_samples_per_s <= 0 or not math.isfinite(baseline_samples_per_s):
        raise UsageError(f"--baseline: expected the baseline host's samples/s (a positive number), received {baseline_samples_per_s!r}")
    return samples_per_s / baseline_samples_per_s
