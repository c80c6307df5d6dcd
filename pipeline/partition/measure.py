"""Correcting the cost model with times measured on this host (``pipeline partition --measure``).

The estimate of :mod:`pipeline.partition.cost` rests on four rates fitted once,
on one machine. Another machine weighs the parts of a model differently, and
so does load: under load every core of the host is busy, and the early layers
of a convolutional network, on large activations, slow down more than the late
ones when they share the caches and the memory bus. On the 2-vCPU reference
machine, at batch 8 with the other core busy, the first of MobileNetV3Large's
two planned shards took 107 ms a call against the second's 73 ms, where the
estimate gave it 48 % of the compute (docs/BENCHMARKS.md); a pipeline runs at
the pace of its slowest shard.

So ``--measure`` times the model on this host, the way the shards will run:

1. the operations are cut into ``segments`` (default 16) of about equal
   estimated cost, at positions the planner may cut;
2. a child process (TensorFlow's thread pools are set once per process) loads
   the model, builds each segment as a compiled sub-model, and times it on a
   batch of ``batch`` rows fed with the real outputs of the segments before it,
   while ``neighbours`` threads keep the other cores busy running the whole
   model (the shards beside it under load), with the intra-op thread count
   the serving processes will use;
3. each operation's estimate is scaled by its segment's measured/estimated
   ratio, and the total is scaled back to the estimate's, so only the
   distribution of cost over the model changes, not its scale (host speeds in
   a cluster file are relative to the estimate).

The planner then balances the corrected costs. The estimate still decides how
cost is spread inside a segment, which is why the segments are small.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import PartitionError

DEFAULT_SEGMENTS = 16
#: each segment is called until this long has passed (and at least MIN_CALLS times); the median call counts
SECONDS_PER_SEGMENT = 1.0
MIN_CALLS = 5
WARMUP_CALLS = 2
CHILD_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class Conditions:
    """How the segments are timed: rows per call, busy cores beside it, intra-op threads (0: TensorFlow's)."""

    batch: int
    neighbours: int
    threads: int

    def describe(self) -> str:
        return (
            f"batch {self.batch}, {self.neighbours} other core(s) busy, "
            f"{self.threads if self.threads else 'default'} intra-op thread(s)"
        )


@dataclass(frozen=True)
class Segment:
    first: int  # position of the first op
    end: int  # one past the last op
    estimated_s: float  # per sample, from the cost model (at the plan batch)
    measured_s: float  # per sample, timed


@dataclass(frozen=True)
class Measurement:
    conditions: Conditions
    segments: tuple[Segment, ...]
    seconds: tuple[float, ...]  # corrected per-op seconds per sample, same total as the estimate

    def record(self, op_names: Sequence[str]) -> dict[str, Any]:
        """For topology.yaml's plan section: how the estimate was corrected."""
        return {
            "conditions": self.conditions.describe(),
            "segments": [
                {
                    "first": op_names[s.first],
                    "last": op_names[s.end - 1],
                    "estimated_ms": round(s.estimated_s * 1e3, 3),
                    "measured_ms": round(s.measured_s * 1e3, 3),
                }
                for s in self.segments
            ],
        }

    def table(self, op_names: Sequence[str]) -> str:
        lines = [
            f"measured on this host ({self.conditions.describe()}): per sample, by segment",
            f"{'segment':<8} {'est ms':>8} {'meas ms':>8} {'ratio':>6}  (first op .. last op)",
        ]
        for i, s in enumerate(self.segments):
            ratio = s.measured_s / s.estimated_s if s.estimated_s > 0 else float("nan")
            lines.append(
                f"{i:<8} {s.estimated_s * 1e3:8.2f} {s.measured_s * 1e3:8.2f} {ratio:6.2f}  "
                f"({op_names[s.first]} .. {op_names[s.end - 1]})"
            )
        return "\n".join(lines)


def default_conditions(*, plan_batch: int, shards: int | None, colocate: bool, cpus: int | None = None) -> Conditions:
    """The conditions the shards of one host will run in: under load (a plan batch above 1) as many cores
    busy as there are shards, up to the CPUs; one request at a time (plan batch 1) alone. Co-located shards
    share the process's intra-op pool (:func:`pipeline.colocation.default_intra_threads`); a process per
    shard keeps TensorFlow's default."""
    from pipeline.colocation import default_intra_threads

    cpus = cpus if cpus is not None else len(os.sched_getaffinity(0))
    busy = min(shards or cpus, cpus)
    neighbours = max(busy - 1, 0) if plan_batch > 1 else 0
    threads = default_intra_threads(shards or cpus, cpus) if colocate else 0
    return Conditions(batch=plan_batch, neighbours=neighbours, threads=threads)


def segment_boundaries(seconds: Sequence[float], allowed: Sequence[bool], segments: int) -> list[int]:
    """Up to ``segments - 1`` allowed boundaries cutting ``seconds`` into parts of about equal sum."""
    n = len(seconds)
    positions = [b for b in range(1, n) if allowed[b]]
    if not positions or segments <= 1:
        return []
    prefix = np.concatenate([[0.0], np.cumsum(seconds)])
    total = prefix[-1]
    chosen: list[int] = []
    for j in range(1, segments):
        target = total * j / segments
        b = min(positions, key=lambda p: abs(prefix[p] - target))
        if not chosen or b > chosen[-1]:
            chosen.append(b)
    return chosen


def correct(seconds: Sequence[float], boundaries: Sequence[int], measured_per_sample: Sequence[float]) -> tuple[list[float], list[Segment]]:
    """Scale each op's estimate by its segment's measured/estimated ratio; keep the estimate's total."""
    edges = [0, *boundaries, len(seconds)]
    if len(measured_per_sample) != len(edges) - 1:
        raise PartitionError(f"expected {len(edges) - 1} segment times, received {len(measured_per_sample)}")
    out: list[float] = []
    parts = []
    for (a, b), meas in zip(itertools.pairwise(edges), measured_per_sample):
        est = float(sum(seconds[a:b]))
        ratio = meas / est if est > 0 else 1.0
        out.extend(float(x) * ratio for x in seconds[a:b])
        parts.append(Segment(first=a, end=b, estimated_s=est, measured_s=float(meas)))
    total, new_total = float(sum(seconds)), float(sum(out))
    if new_total > 0:
        out = [s * total / new_total for s in out]
    return out, parts


def measure(
    model: Any,
    seconds: Sequence[float],
    allowed: Sequence[bool],
    conditions: Conditions,
    *,
    segments: int = DEFAULT_SEGMENTS,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    unsafe: bool = False,
    imports: Sequence[str] = (),
) -> Measurement:
    """Time the model's segments in a child process and return the corrected per-op costs."""
    boundaries = segment_boundaries(seconds, allowed, segments)
    with tempfile.TemporaryDirectory(prefix="pipeline-measure-") as tmp:
        path = Path(tmp) / "model.keras"
        model.save(path)
        request = {
            "model": str(path),
            "boundaries": boundaries,
            "batch": conditions.batch,
            "neighbours": conditions.neighbours,
            "threads": conditions.threads,
            "input_shapes": {k: list(v) for k, v in (input_shapes or {}).items()},
            "unsafe": bool(unsafe),
            "imports": list(imports),
        }
        (Path(tmp) / "request.json").write_text(json.dumps(request))
        try:
            proc = subprocess.run(
                [sys.executable, "-m", "pipeline.partition.measure", str(Path(tmp) / "request.json")],
                capture_output=True,
                text=True,
                timeout=CHILD_TIMEOUT_S,
                env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2")},
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise PartitionError(f"--measure: timing the model's segments took over {CHILD_TIMEOUT_S:g} s; stopped") from exc
    if proc.returncode != 0:
        tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
        raise PartitionError(f"--measure: timing the model's segments failed (exit {proc.returncode}):\n{tail}")
    try:
        per_call = json.loads(proc.stdout.strip().splitlines()[-1])["seconds_per_call"]
    except (ValueError, KeyError, IndexError) as exc:
        raise PartitionError(f"--measure: the timing process printed no result; expected JSON, received {proc.stdout[-200:]!r}") from exc
    corrected, parts = correct(seconds, boundaries, [t / conditions.batch for t in per_call])
    return Measurement(conditions=conditions, segments=tuple(parts), seconds=tuple(corrected))


# -- the child process ---------------------------------------------------------------------------------------


def _time_segments(request: dict[str, Any]) -> list[float]:
    from pipeline.serving.runtime import configure_tensorflow

    neighbours = int(request["neighbours"])
    configure_tensorflow(int(request["threads"]), max(2, neighbours + 1))
    import tensorflow as tf

    from pipeline.bench.local import call
    from pipeline.partition import cost
    from pipeline.partition.build import build_shard_model, split
    from pipeline.partition.graph import build_graph
    from pipeline.partition.reference import compiled, random_inputs
    from pipeline.partition.source import load_keras_file
    from pipeline.topology import TensorSpec

    model = load_keras_file(Path(request["model"]), unsafe=bool(request["unsafe"]), imports=request["imports"], needed_by="--measure")
    graph = build_graph(model)
    shapes = cost.concrete_shapes(graph, {k: tuple(v) for k, v in request["input_shapes"].items()} or None)
    # the model's inputs as the topology declares them, filled the way verify fills them
    specs = [
        TensorSpec(name=t.name, dtype=t.dtype, shape=tuple(-1 if d is None else d for d in t.shape))
        for t in (graph.tensors[tid] for tid in graph.inputs)
    ]
    whole_inputs = random_inputs(specs, int(request["batch"]), np.random.default_rng(0), {s.name: shapes[tid] for s, tid in zip(specs, graph.inputs)})
    values: dict[str, Any] = dict(whole_inputs)
    functions = []
    for plan in split(graph, list(request["boundaries"]), prefix="segment"):
        sub = build_shard_model(graph, plan)
        fn = tf.function(lambda x, sub=sub: sub(x, training=False))
        args = {n: tf.convert_to_tensor(values[n]) for n in (graph.tensors[t].name for t in plan.inputs)}
        for name, value in fn(args).items():
            values[name] = value.numpy()
        functions.append((fn, args))

    stop = threading.Event()
    whole = compiled(model, specs)

    def neighbour() -> None:
        while not stop.is_set():
            call(whole, whole_inputs)

    if neighbours:
        call(whole, whole_inputs)  # traced here, not while a segment is timed
    threads = [threading.Thread(target=neighbour, daemon=True) for _ in range(neighbours)]
    for t in threads:
        t.start()
    try:
        return [_median_call(fn, args) for fn, args in functions]
    finally:
        stop.set()
        for t in threads:
            t.join()


def _median_call(fn: Any, args: Any) -> float:
    from pipeline.bench.local import call

    for _ in range(WARMUP_CALLS):
        call(fn, args)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < MIN_CALLS or time.perf_counter() - start < SECONDS_PER_SEGMENT:
        t0 = time.perf_counter()
        call(fn, args)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.partition.measure", description="time a model's segments (used by partition --measure)")
    p.add_argument("request", type=Path)
    args = p.parse_args(argv)
    request = json.loads(args.request.read_text())
    print(json.dumps({"seconds_per_call": _time_segments(request)}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
