"""The reference: the whole model run locally as a compiled function (``tf.function``).

Run in-process, or in a child process (``python -m pipeline.bench.local``) when
it must be pinned to CPUs and a thread count without touching the caller.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np


def compiled_whole(directory: Path) -> tuple[Any, Any]:
    """``(fn, topology)``: the unsplit model as a ``tf.function`` taking ``{input name: array}``."""
    from pipeline import topology as topo
    from pipeline.partition.reference import compiled
    from pipeline.partition.source import load_keras_file

    t = topo.load(directory, check_files=False)
    model = load_keras_file(
        t.model_path, unsafe=bool(t.extra.get("unsafe", False)), imports=t.imports, needed_by="the whole model (model.keras)"
    )
    return compiled(model, t.inputs), t


def sample_inputs(t: Any, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    from pipeline.partition.reference import random_inputs

    return random_inputs(t.inputs, batch, np.random.default_rng(seed), t.extra.get("sample_input_shapes"))


def latency(fn: Any, inputs: dict[str, np.ndarray], requests: int, warmup: int = 10) -> list[float]:
    """Seconds per call, ``requests`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        _block(fn(inputs))
    times = []
    for _ in range(requests):
        t0 = time.perf_counter()
        _block(fn(inputs))
        times.append(time.perf_counter() - t0)
    return times


def throughput(fn: Any, t: Any, batch_sizes: Sequence[int], seconds: float = 3.0) -> dict[int, float]:
    """Samples per second at each batch size (each run for about ``seconds``)."""
    out = {}
    for batch in batch_sizes:
        inputs = sample_inputs(t, batch)
        for _ in range(3):
            _block(fn(inputs))
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            _block(fn(inputs))
            n += 1
        out[batch] = n * batch / (time.perf_counter() - start)
    return out


def call(fn: Any, inputs: dict[str, np.ndarray]) -> None:
    """One call, returned only once its outputs are computed."""
    _block(fn(inputs))


def _block(result: Any) -> None:
    for v in result.values() if isinstance(result, dict) else (result if isinstance(result, (list, tuple)) else [result]):
        v.numpy()


def configure(threads: int | None, cpus: Sequence[int] | None) -> None:
    if cpus:
        os.sched_setaffinity(0, set(cpus))
    if threads:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)


def main(argv: Sequence[str] | None = None) -> int:
    """Child-process entry: print one JSON line with latency and throughput of the whole model."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    p = argparse.ArgumentParser()
    p.add_argument("directory", type=Path)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--cpus", default="")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32")
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args(argv)
    configure(args.threads, [int(c) for c in args.cpus.split(",") if c])
    fn, t = compiled_whole(args.directory)
    lat = latency(fn, sample_inputs(t, 1), args.requests)
    tp = throughput(fn, t, [int(b) for b in args.batch_sizes.split(",")], args.seconds)
    print(json.dumps({"latency_s": lat, "throughput": {str(k): v for k, v in tp.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
