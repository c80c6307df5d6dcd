"""A host's compute speed: a short compiled (``tf.function``) run of a reference model, in samples per second.

The number alone depends on the model and the batch; what goes into a
cluster file is a speed in the planner's units. The planner divides its cost
model's compute estimate (pipeline/partition/cost.py, seconds per sample on
its reference host) by a host's ``speed`` and weighs the result against link
seconds, so speed 1.0 must mean that reference host, not merely "the first
host": a host's ``speed`` is the cost model's estimate of the run's seconds
per sample over the measured seconds per sample (``reference_speed``). With
``--baseline`` the speed is instead relative to another host's run (the
ratio of the two rates), which keeps the hosts' proportions but not the
balance between compute and links.

The rate is the batch over the median time of one compiled call, after a
few warm-up calls (the first traces the function): the median keeps a
moment of other load on the host from moving the figure much. The mean rate
over the whole run is reported beside it.
"""

from __future__ import annotations

import os
import re
import statistics
import threading
import time
from dataclasses import dataclass

import numpy as np

from pipeline.errors import UsageError
from pipeline.log import get_logger
from pipeline.probe.measure import percentile

REFERENCE_MODEL = "mobilenet_v3_large"
#: the batch the planner plans for by default (``--plan-batch`` defaults to ``--max-batch``, 8).
DEFAULT_BATCH = 8
DEFAULT_SECONDS = 5.0
#: calls before the clock starts: the first traces and compiles the function.
WARMUP_CALLS = 3
#: at least this many timed calls, however long they take (a slow host still gets a median).
MIN_CALLS = 5
#: the whole run, warm-up and building included, may take at most this long beyond ``seconds``.
BUILD_BUDGET_S = 600.0

log = get_logger("pipeline.probe")


@dataclass(frozen=True)
class SpeedConfig:
    """What to run: the model (a keras.applications name or a .keras file), the batch, how long, how many threads."""

    model: str = REFERENCE_MODEL
    batch: int = DEFAULT_BATCH
    seconds: float = DEFAULT_SECONDS
    threads: int | None = None  # None: TensorFlow's default (all the CPUs this process may use)


@dataclass(frozen=True)
class SpeedResult:
    """The timed calls of one run and the rates they give."""

    model: str
    batch: int
    threads: int | None
    cpus: int
    call_s: tuple[float, ...]
    estimate_s: float = 0.0  # the cost model's seconds per sample for this model at this batch (speed 1.0)

    @property
    def samples_per_s(self) -> float:
        """The batch over the median call time."""
        return self.batch / statistics.median(self.call_s)

    @property
    def reference_speed(self) -> float:
        """The speed in the planner's units: the cost model's seconds per sample over the measured ones."""
        return self.estimate_s * self.samples_per_s

    @property
    def mean_samples_per_s(self) -> float:
        return self.batch * len(self.call_s) / sum(self.call_s)

    @property
    def p10_ms(self) -> float:
        return percentile(self.call_s, 10) * 1e3

    @property
    def p90_ms(self) -> float:
        return percentile(self.call_s, 90) * 1e3

    def to_dict(self) -> dict[str, object]:
        return {
            "model": self.model,
            "batch": self.batch,
            "threads": self.threads,
            "cpus": self.cpus,
            "calls": len(self.call_s),
            "samples_per_s": self.samples_per_s,
            "mean_samples_per_s": self.mean_samples_per_s,
            "median_call_ms": statistics.median(self.call_s) * 1e3,
            "p10_call_ms": self.p10_ms,
            "p90_call_ms": self.p90_ms,
            "estimate_ms_per_sample": self.estimate_s * 1e3,
            "reference_speed": self.reference_speed,
        }


def _configure_threads(threads: int | None) -> None:
    """Set TensorFlow's thread pools (only possible before its runtime starts: call first)."""
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads: expected at least 1 thread, received {threads}")
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    except RuntimeError as exc:
        raise UsageError(f"--threads {threads}: TensorFlow's runtime is already running in this process ({exc})") from exc


def reference_run(model_source: str, batch: int) -> tuple[object, dict[str, np.ndarray], float]:
    """The model as one ``tf.function``, a fixed-seed random batch for it, and the cost model's seconds per sample."""
    from pipeline.partition import cost
    from pipeline.partition.graph import build_graph
    from pipeline.partition.reference import compiled, random_inputs
    from pipeline.partition.source import load_source
    from pipeline.topology import TensorSpec

    model, _ = load_source(model_source)
    specs = [
        TensorSpec(
            name=t._keras_history.operation.name,
            dtype=str(t.dtype),
            shape=tuple(-1 if d is None else int(d) for d in t.shape),
        )
        for t in model.inputs
    ]
    inputs = random_inputs(specs, batch, np.random.default_rng(0))
    return compiled(model, specs), inputs, cost.seconds_per_sample(build_graph(model), batch)


def _block(result: object) -> None:
    values = result.values() if isinstance(result, dict) else result if isinstance(result, (list, tuple)) else [result]
    for v in values:
        v.numpy()  # type: ignore[attr-defined]


def measure_speed(config: SpeedConfig) -> SpeedResult:
    """Build the model, warm it up, and time compiled calls for ``config.seconds`` (at least :data:`MIN_CALLS`)."""
    if config.batch < 1:
        raise UsageError(f"--batch: expected at least 1, received {config.batch}")
    if not 0 < config.seconds <= 3600:
        raise UsageError(f"--seconds: expected a duration in (0, 3600], received {config.seconds}")
    _configure_threads(config.threads)
    began = time.monotonic()
    fn, inputs, estimate_s = reference_run(config.model, config.batch)
    for _ in range(WARMUP_CALLS):
        _block(fn(inputs))  # type: ignore[operator]
    log.info("probe_speed_ready", model=config.model, batch=config.batch, build_s=round(time.monotonic() - began, 2))
    times: list[float] = []
    end = time.monotonic() + config.seconds
    hard_end = began + config.seconds + BUILD_BUDGET_S
    while (time.monotonic() < end or len(times) < MIN_CALLS) and time.monotonic() < hard_end:
        t0 = time.perf_counter()
        _block(fn(inputs))  # type: ignore[operator]
        times.append(time.perf_counter() - t0)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return SpeedResult(model=config.model, batch=config.batch, threads=config.threads, cpus=cpus, call_s=tuple(times), estimate_s=estimate_s)


#: what a remote request may name as its model: a keras.applications name (no file paths: the peer loads nothing it was sent).
_REMOTE_MODEL = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
#: bounds of a remote request (the peer runs one at a time, answering nothing else meanwhile).
MAX_REMOTE_SECONDS = 60.0
MAX_REMOTE_BATCH = 256
#: how long the peer lets one speed run take, building the model included.
REMOTE_TIMEOUT_S = 600.0


def checked_remote_config(params: dict[str, object]) -> SpeedConfig:
    """A speed run a peer was asked for, checked against its bounds (a :class:`UsageError` saying which)."""
    model = params.get("model", REFERENCE_MODEL)
    batch, seconds, threads = params.get("batch", DEFAULT_BATCH), params.get("seconds", DEFAULT_SECONDS), params.get("threads")
    if not isinstance(model, str) or not _REMOTE_MODEL.match(model):
        raise UsageError(f"--model {model!r}: a peer runs only keras.applications models by name (e.g. {REFERENCE_MODEL}), not files")
    if not isinstance(batch, int) or not 1 <= batch <= MAX_REMOTE_BATCH:
        raise UsageError(f"--batch {batch!r}: a peer runs batches of 1 to {MAX_REMOTE_BATCH}")
    if not isinstance(seconds, (int, float)) or not 0 < seconds <= MAX_REMOTE_SECONDS:
        raise UsageError(f"--seconds {seconds!r}: a peer runs for at most {MAX_REMOTE_SECONDS:g} s")
    if threads is not None and (not isinstance(threads, int) or not 1 <= threads <= 1024):
        raise UsageError(f"--threads {threads!r}: expected 1 to 1024 threads, or none (TensorFlow's default)")
    return SpeedConfig(model=model, batch=batch, seconds=float(seconds), threads=threads)


def run_in_subprocess(config: SpeedConfig, timeout_s: float = REMOTE_TIMEOUT_S, stop: threading.Event | None = None) -> dict[str, object]:
    """Run ``pipeline probe speed --json`` in a child process (its own TensorFlow runtime) and return its report.

    The child is killed when ``timeout_s`` passes or ``stop`` is set (the peer was asked to exit).
    """
    import json
    import subprocess
    import sys
    import tempfile

    argv = [sys.executable, "-m", "pipeline.cli", "probe", "speed", "--json", "--model", config.model,
            "--batch", str(config.batch), "--seconds", str(config.seconds)]  # fmt: skip
    if config.threads is not None:
        argv += ["--threads", str(config.threads)]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(argv, stdout=out, stderr=err, text=True)
        try:
            deadline = time.monotonic() + timeout_s
            while child.poll() is None:
                if time.monotonic() > deadline:
                    raise UsageError(f"the speed run did not finish within {timeout_s:g} s on this host")
                if stop is not None and stop.wait(0.2):
                    raise UsageError("the speed run was stopped: the peer is shutting down")
                if stop is None:
                    time.sleep(0.2)
        finally:
            if child.poll() is None:
                child.kill()
            child.wait(10)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if child.returncode != 0:
        last = (stderr.strip().splitlines() or ["(no output)"])[-1]
        raise UsageError(f"the speed run failed with exit status {child.returncode}: {last}")
    return dict(json.loads(stdout.strip().splitlines()[-1]))
