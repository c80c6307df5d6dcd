"""``pipeline soak``: replay a file through the ingress for a while, check every answer, report.

One ``grpc.aio`` channel, one asyncio loop. The replay's requests are sent
in a loop, either **closed loop** (``--concurrency C`` requests in flight,
each sending the next as soon as its answer is in) or **open loop**
(``--rate R`` requests per second whatever the answers do, at most
``--max-inflight`` at once). Every answer is compared with the replay's
reference outputs: within the replay's batching tolerance by default (see
``pipeline/oracle.py``; bitwise when the replay has none), or ``--tolerance``.
Before sending anything it checks that the replay's reference outputs of
different inputs differ by more than that tolerance, so that a misrouted answer
would show.
Each request ends as exactly one of:

- ``correct``: every output matches;
- ``wrong``: an output is missing or differs (the first few are kept, with the
  largest difference);
- an error, counted by gRPC status code (``DEADLINE_EXCEEDED``, ``UNAVAILABLE``...);
- ``lost``: it had not ended ``--grace`` seconds after its own deadline
  (the client gives up on it; a healthy pipeline never has one).

Every ``--interval`` seconds the ingress's admin RPC
(``pipeline.admin.PipelineAdmin/Processes``) gives the resident memory of
every pipeline process (the workers' from their heartbeats), so this works
whatever machines the workers run on.

The exit status is 1 on any wrong answer, any lost request, no correct
answer at all, or a process whose memory grew by more than
``--max-rss-growth`` MiB between just after the warm-up and the end (each
measured as the median of a window of samples, so one noisy sample does not
decide), and 0 otherwise. Errors are counted and reported but do not fail
the soak unless ``--max-errors`` says so, since a fault injected on purpose
produces them.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as _dt
import itertools
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

import grpc
import numpy as np

from pipeline import oracle
from pipeline.errors import Unavailable, UsageError
from pipeline.pb import admin_pb2 as apb
from pipeline.pb import admin_pb2_grpc as apb_grpc
from pipeline.pb import grpc_service_pb2 as kpb
from pipeline.pb import grpc_service_pb2_grpc as kpb_grpc
from pipeline.security import tls
from pipeline.serving import kserve
from pipeline.soak import replay as replay_mod
from pipeline.wire.codec import dtype_name
from pipeline.topology import DEFAULT_GRPC_ADDRESS

REPORT_FORMAT = "keras-pipeline-soak-report"
REPORT_VERSION = 1
MIB = 1 << 20
DEFAULT_CONCURRENCY = 4
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_INTERVAL_S = 1.0
#: a request that has not ended this long after its deadline is lost.
DEFAULT_GRACE_S = 5.0
#: see docs/SOAK.md, "Memory": well above the plateau noise of a healthy process, well below one leaked tensor per request.
DEFAULT_MAX_RSS_GROWTH_MIB = 64.0
#: the warm-up is this fraction of the duration, within the bounds below.
WARMUP_FRACTION = 0.2
WARMUP_MIN_S = 5.0
WARMUP_MAX_S = 120.0
#: open loop: requests in flight at most, beyond which a due request is not sent (and counted).
DEFAULT_MAX_INFLIGHT = 1024
DEFAULT_WAIT_READY_S = 120.0
#: examples kept of wrong answers and of each error code.
MAX_EXAMPLES = 10
MESSAGE_BYTES = 256 << 20


# ------------------------------------------------------------------ config
@dataclass(frozen=True)
class SoakConfig:
    target: str
    replay: Path
    duration_s: float
    concurrency: int = DEFAULT_CONCURRENCY
    rate: float = 0.0  # > 0: open loop at this many requests per second
    timeout_s: float = DEFAULT_TIMEOUT_S
    tolerance: float | None = None  # None: the replay's batching tolerance (else bitwise); 0: bitwise
    allow_input_independent: bool = False
    tls: bool = False  # connect with TLS (implied by any of the three below)
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    interval_s: float = DEFAULT_INTERVAL_S
    warmup_s: float = -1.0  # < 0: WARMUP_FRACTION of the duration, bounded
    max_rss_growth_mib: float = DEFAULT_MAX_RSS_GROWTH_MIB
    max_errors: int = -1  # < 0: errors do not fail the soak
    grace_s: float = DEFAULT_GRACE_S
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    wait_ready_s: float = DEFAULT_WAIT_READY_S
    report: Path | None = None
    chart: Path | None = None
    progress: bool | None = None  # None: when stderr is a TTY

    @property
    def warmup(self) -> float:
        if self.warmup_s >= 0:
            return min(self.warmup_s, self.duration_s)
        return min(WARMUP_MAX_S, max(WARMUP_MIN_S, WARMUP_FRACTION * self.duration_s), self.duration_s)

    def check(self) -> None:
        bad = []
        if self.duration_s <= 0:
            bad.append(f"--duration {self.duration_s} (expected > 0)")
        if self.concurrency < 1:
            bad.append(f"--concurrency {self.concurrency} (expected >= 1)")
        if self.rate < 0:
            bad.append(f"--rate {self.rate} (expected > 0, or 0 for closed loop)")
        if self.timeout_s <= 0:
            bad.append(f"--timeout {self.timeout_s} (expected > 0)")
        if self.tolerance is not None and self.tolerance < 0:
            bad.append(f"--tolerance {self.tolerance} (expected >= 0)")
        if self.interval_s <= 0:
            bad.append(f"--interval {self.interval_s} (expected > 0)")
        if self.max_inflight < 1:
            bad.append(f"--max-inflight {self.max_inflight} (expected >= 1)")
        if bad:
            raise UsageError("bad soak settings: " + ", ".join(bad))


# ------------------------------------------------------------ pure logic
def compare(
    expected: Mapping[str, np.ndarray], response: kpb.ModelInferResponse, tolerance: float = 0.0
) -> tuple[bool, dict[str, Any] | None]:
    """Check an answer against the reference; return ``(ok, detail of the first mismatch)``."""
    index = {t.name: i for i, t in enumerate(response.outputs)}
    for name, want in expected.items():
        if name not in index:
            return False, {"output": name, "problem": f"missing; the answer holds {sorted(index)}"}
        try:
            got = kserve.output_array(response, index[name])
        except Exception as exc:  # a malformed answer is a wrong answer, not a crash of the soak
            return False, {"output": name, "problem": f"cannot be decoded: {exc}"}
        ok, detail = compare_arrays(want, got, tolerance)
        if not ok:
            return False, {"output": name, **(detail or {})}
    return True, None


def compare_arrays(want: np.ndarray, got: np.ndarray, tolerance: float = 0.0) -> tuple[bool, dict[str, Any] | None]:
    """Bitwise (``tolerance`` 0) or within an absolute tolerance; NaN matches NaN in the same place."""
    if want.shape != got.shape or dtype_name(want.dtype) != dtype_name(got.dtype):
        return False, {
            "problem": f"expected {dtype_name(want.dtype)}{list(want.shape)}, "
            f"received {dtype_name(got.dtype)}{list(got.shape)}"
        }
    if np.ascontiguousarray(want).tobytes() == np.ascontiguousarray(got).tobytes():
        return True, None
    a, b = want.astype(np.float64), got.astype(np.float64)
    nan_a, nan_b = np.isnan(a), np.isnan(b)
    # NaN matches NaN in the same place; NaN against a number is an infinite difference
    with np.errstate(invalid="ignore"):  # inf - inf
        diff = np.where((a == b) | (nan_a & nan_b), 0.0, np.where(nan_a | nan_b, np.inf, np.abs(a - b)))
    max_diff = float(diff.max()) if diff.size else 0.0
    if tolerance > 0 and max_diff <= tolerance:
        return True, None
    shown: float | str = max_diff if math.isfinite(max_diff) else "inf"  # the JSON report takes finite numbers only
    return False, {"problem": "values differ", "max_abs_diff": shown, "differing": int(np.count_nonzero(diff))}


def percentiles(values: Sequence[float]) -> dict[str, float]:
    """p50, p95, p99, max and mean of ``values`` (0 for none), nearest-rank."""
    if not len(values):
        return {"p50": 0.0, "p95": 0.0, "p99": 0.0, "max": 0.0, "mean": 0.0}
    ordered = np.sort(np.asarray(values, dtype=np.float64))
    n = len(ordered)

    def rank(q: float) -> float:
        return float(ordered[min(n - 1, max(0, math.ceil(q * n) - 1))])

    return {"p50": rank(0.50), "p95": rank(0.95), "p99": rank(0.99), "max": float(ordered[-1]), "mean": float(ordered.mean())}


@dataclass
class Bucket:
    """What ended within one interval."""

    correct: int = 0
    wrong: int = 0
    lost: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)


def memory_growth(
    samples: Sequence[tuple[float, int, int]], warmup_s: float, end_s: float, interval_s: float
) -> dict[str, Any] | None:
    """Growth of one process's RSS after the warm-up: ``samples`` are ``(t, pid, rss_bytes)``.

    The start is the median of the samples in a window just after the
    warm-up, the end the median of a window at the end (each a tenth of the
    measured span, at least three intervals), both of the pid alive at the
    end (a restarted process is measured from the end of its own warm-up,
    as long again as the soak's, after its first sample). ``None`` when there
    are too few samples.
    """
    if not samples:
        return None
    pid = samples[-1][1]
    begin = warmup_s
    born = min(t for t, p, _ in samples if p == pid)
    if born > samples[0][0]:  # restarted during the soak: it loads and warms up again, so skip its own warm-up
        begin = max(warmup_s, born + warmup_s)
    mine = [(t, rss) for t, p, rss in samples if p == pid and t >= begin and rss > 0]
    if len(mine) < 2:
        return None
    first_t, last_t = mine[0][0], mine[-1][0]
    window = max(3 * interval_s, 0.1 * (end_s - warmup_s))
    head = [rss for t, rss in mine if t <= first_t + window]
    tail = [rss for t, rss in mine if t >= last_t - window]
    start, end = float(np.median(head)), float(np.median(tail))
    return {"pid": pid, "start_bytes": int(start), "end_bytes": int(end), "growth_bytes": int(end - start), "samples": len(mine)}


# ------------------------------------------------------------------ runner
def oracle_for(config: SoakConfig, replay: replay_mod.Replay) -> tuple[float, dict[str, Any]]:
    """The tolerance answers are checked with, and the report's ``oracle`` entry.

    Raises :class:`pipeline.oracle.NotDiscriminating` when the replay's
    reference outputs of different inputs are not further apart than the
    tolerance (unless the config allows it: then the entry carries the warning).
    """
    if config.tolerance is not None:
        tolerance, kind = config.tolerance, ("bitwise" if config.tolerance == 0 else "tolerance (--tolerance)")
    elif replay.tolerance is not None:
        tolerance = replay.tolerance
        kind = "bitwise (batching changes nothing)" if tolerance == 0 else "batching tolerance (from the replay)"
    else:
        tolerance, kind = 0.0, "bitwise (the replay records no batching tolerance)"
    found = oracle.spread([r.inputs for r in replay.requests], [r.outputs for r in replay.requests])
    warning = oracle.require_discriminating(
        found, tolerance, what=f"replay {str(config.replay)!r}", allow=config.allow_input_independent
    )
    margin = found.margin(tolerance)
    description = (
        f"{kind} {tolerance:.3g}; different inputs' outputs differ by >= {found.smallest:.3g} "
        f"(margin {margin:.3g}x)" if warning is None else f"{kind} {tolerance:.3g}; WARNING: {warning}"
    )
    return tolerance, {
        "kind": kind,
        "tolerance": tolerance,
        "batching_difference_measured": replay.tolerance_measured,
        "spread": found.to_dict(),
        "margin": margin if margin != float("inf") else None,
        "warning": warning,
        "description": description,
    }


class Soak:
    """One soak run: the senders, the memory sampler, the progress line, and the tallies."""

    def __init__(self, config: SoakConfig, replay: replay_mod.Replay, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.config = config
        self.replay = replay
        self.out = out
        self.err = err
        self.requests: list[kpb.ModelInferRequest] = []
        self.buckets: dict[int, Bucket] = {}
        self.latencies_ms: list[float] = []
        self.totals: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.error_examples: dict[str, str] = {}
        self.wrong_examples: list[dict[str, Any]] = []
        self.memory: dict[str, list[tuple[float, int, int]]] = {}
        self.process_info: dict[str, dict[str, Any]] = {}
        self.admin_note = ""
        self.started = 0.0
        self.started_wall = ""
        self.ended_s = 0.0
        self.model = replay.model
        self.tolerance, self.oracle = oracle_for(config, replay)
        self._inflight: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()

    # ------------------------------------------------------------- set-up
    def build_requests(self, meta: kpb.ModelMetadataResponse) -> None:
        served = {t.name: t for t in meta.inputs}
        if meta.name != self.replay.model or set(served) != set(self.replay.input_names):
            raise UsageError(
                f"the replay holds model {self.replay.model!r} with inputs {list(self.replay.input_names)}; "
                f"the ingress at {self.config.target} serves {meta.name!r} with inputs {sorted(served)}"
            )
        outputs = {t.name for t in meta.outputs}
        if not set(self.replay.output_names) <= outputs:
            raise UsageError(f"the replay's outputs {list(self.replay.output_names)} are not all served (served: {sorted(outputs)})")
        datatypes = {name: served[name].datatype for name in self.replay.input_names}
        for r in self.replay.requests:
            arrays = {name: r.inputs[name] for name in self.replay.input_names}
            self.requests.append(kserve.infer_request(meta.name, arrays, datatypes=datatypes))

    # ---------------------------------------------------------------- run
    async def run(self) -> dict[str, Any]:
        cfg = self.config
        options = [("grpc.max_send_message_length", MESSAGE_BYTES), ("grpc.max_receive_message_length", MESSAGE_BYTES)]
        channel_cm = tls.open_aio_channel(
            cfg.target, options, tls=cfg.tls, ca=cfg.tls_ca, cert=cfg.tls_cert, key=cfg.tls_key
        )
        async with channel_cm as channel:
            infer = kpb_grpc.GRPCInferenceServiceStub(channel)
            admin = apb_grpc.PipelineAdminStub(channel)
            await self._wait_ready(infer)
            meta = await infer.ModelMetadata(kpb.ModelMetadataRequest(name=self.replay.model), timeout=10)
            self.build_requests(meta)
            self.started = time.monotonic()
            self.started_wall = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
            background = [
                asyncio.create_task(self._sample_memory(admin), name="soak-memory"),
                asyncio.create_task(self._progress(), name="soak-progress"),
            ]
            try:
                if cfg.rate > 0:
                    await self._open_loop(infer)
                else:
                    order = itertools.count()  # one order for all clients: the replay's mix whatever their speeds
                    await asyncio.gather(*(self._closed_loop(infer, order) for _ in range(cfg.concurrency)))
                # the requests still in flight end by their own deadline plus grace
                if self._inflight:
                    await asyncio.wait(set(self._inflight), timeout=cfg.timeout_s + cfg.grace_s + 1)
                self.ended_s = time.monotonic() - self.started
                await self._sample_once(admin)
            finally:
                self._stop.set()
                for task in [*background, *self._inflight]:
                    task.cancel()
                await asyncio.gather(*background, *self._inflight, return_exceptions=True)
                if self._progress_shown:
                    print(file=self.err)
        return self.report()

    async def _wait_ready(self, infer: kpb_grpc.GRPCInferenceServiceStub) -> None:
        deadline = time.monotonic() + self.config.wait_ready_s
        last = "no answer"
        while True:
            try:
                if (await infer.ServerReady(kpb.ServerReadyRequest(), timeout=2)).ready:
                    return
                last = "it answers, but not every shard is up"
            except grpc.aio.AioRpcError as exc:
                last = f"{exc.code().name}: {exc.details()}"
            if time.monotonic() >= deadline:
                raise Unavailable(f"the ingress at {self.config.target} was not ready within {self.config.wait_ready_s:g} s ({last})")
            await asyncio.sleep(0.25)

    def _due(self) -> bool:
        return time.monotonic() - self.started < self.config.duration_s

    async def _closed_loop(self, infer: kpb_grpc.GRPCInferenceServiceStub, order: Iterator[int]) -> None:
        while self._due():
            await self._one(infer, next(order) % len(self.requests))

    async def _open_loop(self, infer: kpb_grpc.GRPCInferenceServiceStub) -> None:
        period = 1.0 / self.config.rate
        next_t = self.started
        for n in itertools.count():
            now = time.monotonic()
            if now - self.started >= self.config.duration_s:
                return
            if next_t > now:
                await asyncio.sleep(next_t - now)
            next_t += period
            if len(self._inflight) >= self.config.max_inflight:
                self.totals["not_sent"] += 1
                continue
            task = asyncio.create_task(self._one(infer, n % len(self.requests)))
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    async def _one(self, infer: kpb_grpc.GRPCInferenceServiceStub, i: int) -> None:
        cfg = self.config
        self.totals["sent"] += 1
        sent = time.monotonic()
        outcome: str
        detail: Any = None
        try:
            response = await asyncio.wait_for(infer.ModelInfer(self.requests[i], timeout=cfg.timeout_s), cfg.timeout_s + cfg.grace_s)
        except TimeoutError:
            outcome = "lost"
        except grpc.aio.AioRpcError as exc:
            outcome = exc.code().name
            detail = exc.details()
        else:
            ok, detail = compare(self.replay.requests[i].outputs, response, self.tolerance)
            outcome = "correct" if ok else "wrong"
        done = time.monotonic()
        self._count(i, outcome, (done - sent) * 1e3, done - self.started, detail)

    def _count(self, i: int, outcome: str, latency_ms: float, t: float, detail: Any) -> None:
        # answers to the last requests, which end after the duration, count in the last interval
        last = max(0, math.ceil(self.config.duration_s / self.config.interval_s) - 1)
        bucket = self.buckets.setdefault(min(int(t // self.config.interval_s), last), Bucket())
        if outcome in ("correct", "wrong"):
            self.totals[outcome] += 1
            self.latencies_ms.append(latency_ms)
            bucket.latencies_ms.append(latency_ms)
            if outcome == "correct":
                bucket.correct += 1
            else:
                bucket.wrong += 1
                if len(self.wrong_examples) < MAX_EXAMPLES:
                    self.wrong_examples.append({"request": i, "t_s": round(t, 3), **(detail or {})})
        elif outcome == "lost":
            self.totals["lost"] += 1
            bucket.lost += 1
        else:
            self.errors[outcome] += 1
            bucket.errors[outcome] += 1
            self.error_examples.setdefault(outcome, str(detail))

    # ------------------------------------------------------------- memory
    async def _sample_memory(self, admin: apb_grpc.PipelineAdminStub) -> None:
        while not self._stop.is_set():
            await self._sample_once(admin)
            try:
                await asyncio.wait_for(self._stop.wait(), self.config.interval_s)
            except TimeoutError:
                pass

    async def _sample_once(self, admin: apb_grpc.PipelineAdminStub) -> None:
        if self.admin_note.startswith("UNIMPLEMENTED"):
            return
        try:
            response = await admin.Processes(apb.ProcessesRequest(), timeout=max(1.0, self.config.interval_s))
        except grpc.aio.AioRpcError as exc:
            self.admin_note = f"{exc.code().name}: {exc.details()}"
            return
        t = time.monotonic() - self.started
        for p in response.processes:
            if p.pid and p.rss_bytes:
                self.memory.setdefault(p.name, []).append((t, int(p.pid), int(p.rss_bytes)))
            info = self.process_info.setdefault(p.name, {"role": p.role, "pids": []})
            info["host"] = p.host
            if p.pid and p.pid not in info["pids"]:
                info["pids"].append(int(p.pid))
            info["last_state"] = p.state
            info["last_stats"] = dict(p.stats)

    # ----------------------------------------------------------- progress
    _progress_shown = False

    async def _progress(self) -> None:
        """A bar on a TTY (or with --progress), a line every 10 s otherwise, nothing with --no-progress."""
        if self.config.progress is False:
            return
        tty = self.config.progress or self.err.isatty()
        period = 0.5 if tty else 10.0
        while not self._stop.is_set():
            try:
                await asyncio.wait_for(self._stop.wait(), period)
            except TimeoutError:
                pass
            line = self._progress_line()
            if tty:
                self._progress_shown = True
                print("\r" + line, end="", file=self.err, flush=True)
            else:
                print(line, file=self.err, flush=True)

    def _progress_line(self) -> str:
        elapsed = time.monotonic() - self.started
        total = self.config.duration_s
        width = 24
        filled = min(width, int(width * elapsed / total))
        recent = [b for k, b in self.buckets.items() if k * self.config.interval_s >= elapsed - 5]
        lat = percentiles([x for b in recent for x in b.latencies_ms])
        rps = sum(b.correct for b in recent) / 5
        rss = sum(s[-1][2] for s in self.memory.values() if s)
        t = self.totals
        return (
            f"[{'#' * filled}{'.' * (width - filled)}] {min(elapsed, total):.0f}/{total:.0f} s  "
            f"{t['correct']} ok {t['wrong']} wrong {sum(self.errors.values())} err {t['lost']} lost  "
            f"p99 {lat['p99']:.1f} ms  {rps:.1f}/s  rss {rss / MIB:.0f} MiB"
        )

    # -------------------------------------------------------------- report
    def report(self) -> dict[str, Any]:
        cfg = self.config
        duration = self.ended_s or (time.monotonic() - self.started)
        last = max(self.buckets, default=-1)
        intervals = []
        for k in range(last + 1):
            b = self.buckets.get(k, Bucket())
            lat = percentiles(b.latencies_ms)
            # the last interval is shorter when the duration is not a multiple of the interval
            span = max(1e-3, min((k + 1) * cfg.interval_s, cfg.duration_s) - k * cfg.interval_s)
            intervals.append(
                {
                    "t_s": round(k * cfg.interval_s + span, 3),
                    "correct": b.correct,
                    "wrong": b.wrong,
                    "errors": sum(b.errors.values()),
                    "lost": b.lost,
                    "throughput_rps": round(b.correct / span, 3),
                    **{f"{q}_ms": round(v, 3) for q, v in lat.items()},
                }
            )
        warmup = cfg.warmup
        processes: dict[str, Any] = {}
        failed_memory = []
        limit = int(cfg.max_rss_growth_mib * MIB)
        for name, samples in self.memory.items():
            growth = memory_growth(samples, warmup, duration, cfg.interval_s)
            entry = {
                **self.process_info.get(name, {}),
                "first_rss_bytes": samples[0][2],
                "last_rss_bytes": samples[-1][2],
                "growth": growth,
                "samples": [[round(t, 3), pid, rss] for t, pid, rss in samples],
            }
            entry.pop("last_stats", None)
            entry["stats"] = self.process_info.get(name, {}).get("last_stats", {})
            if growth is not None and growth["growth_bytes"] > limit:
                failed_memory.append(name)
            processes[name] = entry
        reasons = []
        t = self.totals
        if t["wrong"]:
            reasons.append(f"{t['wrong']} wrong answers")
        if t["lost"]:
            reasons.append(f"{t['lost']} lost requests")
        if not t["correct"]:
            reasons.append("no correct answer")
        for name in failed_memory:
            g = processes[name]["growth"]
            reasons.append(
                f"{name} memory grew by {g['growth_bytes'] / MIB:.1f} MiB after the warm-up (limit {cfg.max_rss_growth_mib:g} MiB)"
            )
        errors = sum(self.errors.values())
        if cfg.max_errors >= 0 and errors > cfg.max_errors:
            reasons.append(f"{errors} errors (limit {cfg.max_errors})")
        lat = percentiles(self.latencies_ms)
        return {
            "format": REPORT_FORMAT,
            "version": REPORT_VERSION,
            "target": cfg.target,
            "model": self.model,
            "started": self.started_wall,
            "duration_s": round(duration, 3),
            "warmup_s": warmup,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "replay": {"path": str(cfg.replay), "requests": len(self.replay), "reference": self.replay.reference},
            "oracle": self.oracle,
            "totals": {
                "sent": t["sent"],
                "correct": t["correct"],
                "wrong": t["wrong"],
                "errors": dict(self.errors),
                "lost": t["lost"],
                "not_sent": t["not_sent"],
            },
            "latency_ms": {q: round(v, 3) for q, v in lat.items()},
            "throughput_rps": round(t["correct"] / duration, 3) if duration else 0.0,
            "intervals": intervals,
            "memory": {
                "checked": bool(self.memory),
                "max_rss_growth_bytes": limit,
                "failed": failed_memory,
                "note": self.admin_note,
            },
            "processes": processes,
            "wrong_examples": self.wrong_examples,
            "error_examples": self.error_examples,
            "verdict": {"ok": not reasons, "reasons": reasons},
        }


# ------------------------------------------------------------------ output
def summary(report: Mapping[str, Any]) -> str:
    """The human summary printed at the end of a soak."""
    t = report["totals"]
    lat = report["latency_ms"]
    errors = ", ".join(f"{k} {v}" for k, v in sorted(t["errors"].items())) or "none"
    lines = [
        f"soak of {report['model']} at {report['target']}: {report['duration_s']:.1f} s, warm-up {report['warmup_s']:g} s",
        f"  requests {t['sent']}: correct {t['correct']}, wrong {t['wrong']}, lost {t['lost']}, errors: {errors}"
        + (f", not sent (client limit) {t['not_sent']}" if t["not_sent"] else ""),
        f"  latency ms: p50 {lat['p50']:.2f}  p95 {lat['p95']:.2f}  p99 {lat['p99']:.2f}  max {lat['max']:.2f}",
        f"  throughput {report['throughput_rps']:.2f} correct answers/s",
    ]
    o = report.get("oracle")
    if o:
        lines.append(f"  oracle: {o['description']}")
    if report["processes"]:
        lines.append("  memory (RSS MiB): process, first sample, after warm-up, end, growth")
        for name, p in report["processes"].items():
            g = p.get("growth")
            if g:
                lines.append(
                    f"    {name:<12} {p['first_rss_bytes'] / MIB:8.1f} {g['start_bytes'] / MIB:8.1f} {g['end_bytes'] / MIB:8.1f} "
                    f"{g['growth_bytes'] / MIB:+8.1f}   pids {p.get('pids')}"
                )
            else:
                lines.append(f"    {name:<12} {p['first_rss_bytes'] / MIB:8.1f}  (too few samples after the warm-up)")
    elif report["memory"]["note"]:
        lines.append(f"  memory not measured: {report['memory']['note']}")
    for example in report["wrong_examples"][:3]:
        lines.append(f"  wrong: {example}")
    for code, message in report["error_examples"].items():
        lines.append(f"  first {code}: {message}")
    verdict = report["verdict"]
    lines.append("PASSED" if verdict["ok"] else "FAILED: " + "; ".join(verdict["reasons"]))
    return "\n".join(lines)


# --------------------------------------------------------------------- cli
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", default=DEFAULT_GRPC_ADDRESS, help=f"ingress host:port (default {DEFAULT_GRPC_ADDRESS})")
    p.add_argument("--replay", type=Path, required=True, metavar="FILE", help="replay file (pipeline record, or ingress --record)")
    p.add_argument("--duration", type=float, required=True, metavar="SECONDS", help="how long to send requests")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY, metavar="C", help=f"closed loop: requests in flight (default {DEFAULT_CONCURRENCY})")
    p.add_argument("--rate", type=float, default=0.0, metavar="R", help="open loop: requests per second, whatever the answers do")
    p.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S, metavar="S", help=f"deadline of each request (default {DEFAULT_TIMEOUT_S:g} s)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest absolute difference accepted (default: the replay's batching tolerance, bitwise when it has none; 0: bitwise)",
    )
    p.add_argument(
        "--allow-input-independent",
        action="store_true",
        help="soak (with a warning) even when the replay's reference outputs do not depend on the input",
    )
    p.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, metavar="S", help=f"report and memory sampling interval (default {DEFAULT_INTERVAL_S:g} s)")
    p.add_argument(
        "--warmup",
        type=float,
        default=-1.0,
        metavar="S",
        help=f"memory is measured from this point on (default {WARMUP_FRACTION * 100:.0f}%% of the duration, {WARMUP_MIN_S:g} to {WARMUP_MAX_S:g} s)",
    )
    p.add_argument(
        "--max-rss-growth",
        type=float,
        default=DEFAULT_MAX_RSS_GROWTH_MIB,
        metavar="MIB",
        help=f"fail when a process's memory grows by more after the warm-up (default {DEFAULT_MAX_RSS_GROWTH_MIB:g} MiB)",
    )
    p.add_argument("--max-errors", type=int, default=-1, metavar="N", help="fail on more errors than this (default: errors do not fail)")
    p.add_argument("--grace", type=float, default=DEFAULT_GRACE_S, metavar="S", help=f"a request not ended this long after its deadline is lost (default {DEFAULT_GRACE_S:g})")
    p.add_argument("--max-inflight", type=int, default=DEFAULT_MAX_INFLIGHT, help=f"open loop: requests in flight at most (default {DEFAULT_MAX_INFLIGHT})")
    p.add_argument("--wait-ready", type=float, default=DEFAULT_WAIT_READY_S, metavar="S", help=f"wait this long for the pipeline to be ready (default {DEFAULT_WAIT_READY_S:g})")
    p.add_argument("--report", type=Path, metavar="FILE.json", help="write the JSON report here")
    p.add_argument("--chart", type=Path, metavar="FILE.png", help="write a PNG chart of latency, throughput and memory here")
    p.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's roots unless --tls-ca")
    p.add_argument("--tls-ca", metavar="PEM", help="trust this CA (implies --tls)")
    p.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS (implies --tls)")
    p.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    progress = p.add_mutually_exclusive_group()
    progress.add_argument("--progress", dest="progress", action="store_const", const=True, help="a progress bar even when not on a TTY")
    progress.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress output")


def config_from_args(args: argparse.Namespace) -> SoakConfig:
    config = SoakConfig(
        target=args.target,
        replay=args.replay,
        duration_s=args.duration,
        concurrency=args.concurrency,
        rate=args.rate,
        timeout_s=args.timeout,
        tolerance=args.tolerance,
        allow_input_independent=args.allow_input_independent,
        tls=args.tls,
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        interval_s=args.interval,
        warmup_s=args.warmup,
        max_rss_growth_mib=args.max_rss_growth,
        max_errors=args.max_errors,
        grace_s=args.grace,
        max_inflight=args.max_inflight,
        wait_ready_s=args.wait_ready,
        report=args.report,
        chart=args.chart,
        progress=args.progress,
    )
    config.check()
    return config


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    replay = replay_mod.load(config.replay)
    if not len(replay):
        raise UsageError(f"replay file {str(config.replay)!r} holds no request")
    report = asyncio.run(Soak(config, replay).run())
    write_outputs(report, config)
    print(summary(report))
    return 0 if report["verdict"]["ok"] else 1


def write_outputs(report: Mapping[str, Any], config: SoakConfig) -> None:
    if config.report is not None:
        config.report.parent.mkdir(parents=True, exist_ok=True)
        config.report.write_text(json.dumps(report, indent=1, allow_nan=False, default=_json_default) + "\n")
    if config.chart is not None:
        from pipeline.soak.chart import render

        render(report, config.chart)


def _json_default(value: Any) -> Any:
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to the report")
