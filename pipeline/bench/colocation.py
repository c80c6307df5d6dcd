"""``pipeline bench DIR --only colocation``: one process per shard against co-located shards (and Triton).

Through the same gRPC load generator (:mod:`pipeline.bench.load`, KServe v2),
on the same machine, these configurations:

- ``local``: the whole model compiled (``tf.function``) in the bench process,
  called directly (no server): the reference of the design budget;
- ``per-shard``: the pipeline with one worker process per shard (1 TensorFlow
  thread each, today's default);
- ``co-located``: the same shards in one worker process (threads joined by
  ``inproc://``, one TensorFlow runtime, its intra-op pool of one thread per
  CPU shared by the shards);
- ``with-ingress``: the same, with the ingress in that process too
  (``ingress: true``: its links to the shards are ``inproc://`` as well, and
  there is one process in all);
- ``triton``: a real Triton Inference Server serving the whole model through
  PyTriton with dynamic batching, when ``.venv-pytriton`` exists or
  ``scripts/pytriton_env.sh`` can build it (``--no-triton`` leaves it out).
  It is served four ways, one intra-op thread or one per CPU, each with a
  queue delay of 0 or 1 ms (:func:`triton_configs`), and the goals compare
  against its best configuration on each measure (:func:`best_of`). With no queue delay, Triton's dynamic
  batcher still batches what queued while it computed; here that was its
  best at both concurrency 1 and 16.

All of them are up at once and measured in interleaved rounds: each round
sends every configuration a block of requests one at a time, then a block at
concurrency 16, and each configuration leads a round in turn. A minute in
which the shared machine is slow then costs every configuration alike, and
the ratios compare the same minutes. (Measured one after the other, minutes
apart, the same configuration moved by 20-40 % on this machine.) An idle
configuration costs the others little: the pipelines' heartbeats, Triton's
idle threads.

Per configuration: p50 latency at concurrency 1 over all its rounds, the
throughput at concurrency 16 (all its load blocks' samples over their time),
and the resident memory (RSS) of all its processes (the ingress included;
Triton's server, its Python backend stubs and the PyTriton process included),
measured warm after the load. Against Triton, also round by round: the median
and range of the ratios and in how many rounds each was ahead.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import colocation
from pipeline import topology as topo
from pipeline.bench.load import p50_ms
from pipeline.log import get_logger
from pipeline.serving import kserve

ROOT = Path(__file__).resolve().parents[2]
PYTRITON_ENV_SCRIPT = ROOT / "scripts" / "pytriton_env.sh"
PYTRITON_VENV = Path(os.environ.get("PIPELINE_PYTRITON_VENV", ROOT / ".venv-pytriton"))
#: the load: concurrency for throughput, requests per measurement (at least).
LOAD_CONCURRENCY = 16
#: start of a served configuration (TensorFlow imports on a busy 2-core machine).
START_TIMEOUT_S = 300.0
#: interleaved rounds when the caller does not say (``--rounds``).
DEFAULT_ROUNDS = 5
#: requests one at a time per configuration and round, at least.
MIN_BLOCK = 20
#: seconds the local reference computes at its best batch per round (a served configuration's load block
#: is at least 8 x 16 requests, about two seconds here).
LOCAL_RATE_BLOCK_S = 2.0

log = get_logger("pipeline.bench.colocation")


def rss_bytes(pids: Sequence[int]) -> int:
    """Resident memory of these processes and all their descendants (each counted once)."""
    import psutil

    total = 0
    for pid in _family(pids):
        try:
            total += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    return total


def cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system CPU time of these processes so far (a process that is gone counts 0)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def measure(target: str, model: str, t: topo.Topology, requests: int, pids: Sequence[int] = ()) -> dict[str, Any]:
    """p50 at concurrency 1 and the rate at concurrency 16, through the KServe v2 load generator; with ``pids``,
    also the CPU the load used, in cores (those processes and this one, the load generator)."""
    from pipeline.bench import local
    from pipeline.bench.load import run_load

    req1 = kserve.infer_request(model, local.sample_inputs(t, 1))
    reqs = [kserve.infer_request(model, local.sample_inputs(t, 1, seed=i)) for i in range(8)]
    asyncio.run(run_load(target, [req1], total=20, concurrency=1))  # warm the path
    one = asyncio.run(run_load(target, [req1], total=requests, concurrency=1))
    asyncio.run(run_load(target, reqs, total=2 * LOAD_CONCURRENCY, concurrency=LOAD_CONCURRENCY))
    watched = [*pids, os.getpid()]
    cpu0, wall0 = cpu_seconds(watched), time.perf_counter()
    load = asyncio.run(run_load(target, reqs, total=max(requests, 8 * LOAD_CONCURRENCY), concurrency=LOAD_CONCURRENCY))
    cores = (cpu_seconds(watched) - cpu0) / (time.perf_counter() - wall0)
    return {
        **({"load_cpu_cores": cores} if pids else {}),
        "p50_ms": p50_ms(one.latencies_s),
        "rate": load.rate,
        "load_p50_ms": p50_ms(load.latencies_s),
        "errors": dict(one.errors + load.errors),
    }


@dataclass
class Served:
    """One configuration under measurement: where to send requests, and what it has measured so far."""

    label: str
    target: str
    pids: list[int]
    version: str = ""
    latencies_s: list[float] = field(default_factory=list)
    samples: int = 0
    wall_s: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)
    rounds: list[dict[str, float]] = field(default_factory=list)

    @property
    def p50_ms(self) -> float:
        return p50_ms(self.latencies_s)

    @property
    def rate(self) -> float:
        return self.samples / self.wall_s if self.wall_s else float("nan")


#: the pipeline's configurations: one process per shard; the shards in one process; and the ingress in it too.
PIPELINES = ("per-shard", "co-located", "with-ingress")


def _served_pipeline(stack: contextlib.ExitStack, source: topo.Topology, work: Path, logs: Path, *, label: str, threads: int | None) -> Served:
    from pipeline.launch import Cluster, relocate

    copy = relocate(source.directory, work / label)
    copy = colocation.per_shard(copy) if label == "per-shard" else colocation.colocate(copy, ingress=label == "with-ingress")
    copy.write()
    args = ["--threads", str(threads)] if threads else []
    cluster = stack.enter_context(Cluster(copy, logs / label, common_worker_args=args))
    return Served(label, cluster.target, [p.pid for p in cluster.procs.values()])


@dataclass(frozen=True)
class PyTriton:
    """The PyTriton venv, looked up once per bench: its interpreter, its libpython's directory, its version."""

    python: Path
    libdir: str
    version: str


def pytriton_env() -> PyTriton | str:
    """The PyTriton venv (built by scripts/pytriton_env.sh when missing), or why it is unavailable."""
    py = PYTRITON_VENV / "bin" / "python"
    r = subprocess.run(["bash", str(PYTRITON_ENV_SCRIPT)], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0 or not py.exists():
        return f"PyTriton unavailable ({PYTRITON_ENV_SCRIPT.name} exited {r.returncode}: {r.stderr.strip()[-300:]})"

    def ask(code: str) -> str:
        return subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=60).stdout.strip()

    # the libpython the venv's interpreter itself uses (its base installation's), for LD_LIBRARY_PATH
    return PyTriton(
        python=py,
        libdir=ask("import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"),
        version=ask("import importlib.metadata as m; print(m.version('nvidia-pytriton'))"),
    )


def _served_triton(
    stack: contextlib.ExitStack, source: topo.Topology, logs: Path, pytriton: PyTriton, *, threads: int, delay_us: int = 1000
) -> Served | str:
    """A real Triton serving the whole model (stopped with ``stack``), or why it cannot run here."""
    from pipeline import process
    from pipeline.launch import free_ports

    if len(source.inputs) != 1 or len(source.outputs) != 1:
        return "the Triton comparison serves one-input, one-output models only"
    grpc_port, http_port, metrics_port = free_ports(3)
    (i,), (o,) = source.inputs, source.outputs
    sample = source.extra.get("sample_input_shapes", {}).get(i.name)
    in_shape = [int(d) for d in (sample[1:] if sample else i.shape[1:])]
    spec = lambda name, dtype, dims: f"{name}:{dtype}:{','.join(str(d) for d in dims)}"  # noqa: E731
    argv = [
        str(pytriton.python), str(Path(__file__).with_name("pytriton_serve.py")), str(source.model_path.resolve()), source.name,
        str(grpc_port), str(http_port), str(metrics_port), str(threads),
        spec(i.name, i.dtype, in_shape), spec(o.name, o.dtype, o.shape[1:]), str(delay_us),
    ]  # fmt: skip
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
        "LD_LIBRARY_PATH": ":".join(x for x in (pytriton.libdir, os.environ.get("LD_LIBRARY_PATH", "")) if x),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONUNBUFFERED": "1",
    }
    proc = process.start("pytriton", argv, logs / "triton", env=env)
    stack.callback(proc.stop)
    target = f"127.0.0.1:{grpc_port}"
    deadline = time.monotonic() + START_TIMEOUT_S
    while "pytriton_ready" not in proc.text() or not _triton_ready(target, source.name):
        if not proc.alive:
            return f"PyTriton exited {proc.returncode}: {proc.text()[-800:]}"
        if time.monotonic() > deadline:
            return f"PyTriton not ready within {START_TIMEOUT_S:.0f} s: {proc.text()[-800:]}"
        time.sleep(0.5)
    return Served("triton", target, [proc.pid], version=pytriton.version)  # its children are counted by _family


def _triton_ready(target: str, model: str) -> bool:
    import grpc

    from pipeline.pb import grpc_service_pb2 as kpb
    from pipeline.pb import grpc_service_pb2_grpc as kgrpc

    with grpc.insecure_channel(target) as channel:
        try:
            return bool(kgrpc.GRPCInferenceServiceStub(channel).ModelReady(kpb.ModelReadyRequest(name=model), timeout=2).ready)
        except grpc.RpcError:
            return False


class LocalReference:
    """The whole model compiled in this process, measured in the same blocks as the servers (no server)."""

    def __init__(self, source: topo.Topology) -> None:
        import psutil

        from pipeline.bench import local

        before = psutil.Process().memory_info().rss
        self.fn, self.t = local.compiled_whole(source.directory)
        self.x1 = local.sample_inputs(self.t, 1)
        tp = local.throughput(self.fn, self.t, [1, 8, 16], seconds=2.0)
        self.best_batch = max(tp, key=tp.get)
        self.xb = local.sample_inputs(self.t, self.best_batch)
        self.rss_bytes = psutil.Process().memory_info().rss
        self.rss_added_bytes = self.rss_bytes - before
        self.served = Served("local", "", [os.getpid()])

    def latency_block(self, requests: int) -> float:
        """``requests`` calls one at a time; their p50 in ms."""
        from pipeline.bench import local

        times = local.latency(self.fn, self.x1, requests, warmup=2)
        self.served.latencies_s += times
        return p50_ms(times)

    def rate_block(self, seconds: float) -> float:
        from pipeline.bench import local

        local.call(self.fn, self.xb)
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds:
            local.call(self.fn, self.xb)
            n += self.best_batch
        wall = time.perf_counter() - start
        self.served.samples += n
        self.served.wall_s += wall
        return n / wall


def local_reference(source: topo.Topology, requests: int) -> dict[str, Any]:
    """The whole model compiled in this process: p50 at batch 1, and its best batched rate (no server)."""
    ref = LocalReference(source)
    ref.latency_block(requests)
    ref.rate_block(3.0)
    return {
        "p50_ms": ref.served.p50_ms,
        "rate": ref.served.rate,
        "best_batch": ref.best_batch,
        "rss_bytes": ref.rss_bytes,
        "rss_added_bytes": ref.rss_added_bytes,
    }


def _latency_block(s: Served, req1: Any, requests: int) -> float:
    from pipeline.bench.load import run_load

    one = asyncio.run(run_load(s.target, [req1], total=requests, concurrency=1, warmup=2))
    s.latencies_s += one.latencies_s
    s.errors.update(one.errors)
    return p50_ms(one.latencies_s)


def _rate_block(s: Served, reqs: Sequence[Any], requests: int) -> float:
    from pipeline.bench.load import run_load

    load = asyncio.run(run_load(s.target, reqs, total=requests, concurrency=LOAD_CONCURRENCY, warmup=2))
    s.samples += load.samples
    s.wall_s += load.wall_s
    s.errors.update(load.errors)
    return load.rate


def bench_colocation(
    source: topo.Topology, work: Path, logs: Path, requests: int, threads: int | None = None, rounds: int = DEFAULT_ROUNDS, triton: bool = True
) -> dict[str, Any]:
    """Every configuration up at once, measured in interleaved rounds (see the module docstring)."""
    from pipeline.bench import local

    cpus = len(os.sched_getaffinity(0))
    rounds = max(1, rounds)
    out: dict[str, Any] = {"cpus": cpus, "rounds": rounds, "shards": len(source.shards)}
    # the pools a co-located process uses (one inter-op thread per shard up to the CPUs), and one inter-op thread;
    # measured first, in processes of their own, while nothing else runs
    out["overlap"] = [overlap_in_subprocess(source.directory, n, i) for n in sorted({1, threads or cpus}) for i in (0, 1)]
    per_round_c1 = max(MIN_BLOCK, -(-requests // rounds))
    per_round_load = max(8 * LOAD_CONCURRENCY, -(-requests // rounds))
    req1 = kserve.infer_request(source.name, local.sample_inputs(source, 1))
    reqs = [kserve.infer_request(source.name, local.sample_inputs(source, 1, seed=i)) for i in range(8)]
    with contextlib.ExitStack() as stack:
        served = {label: _served_pipeline(stack, source, work, logs, label=label, threads=threads) for label in PIPELINES}
        # Triton at each thread count and queue delay worth trying (one intra-op thread answered one request
        # faster here, the CPUs' worth served more at concurrency 16): the goals compare against its best.
        pytriton = pytriton_env() if triton else "not asked for (--no-triton)"
        tritons: dict[str, dict[str, int]] = {}
        for n, delay_us in [] if isinstance(pytriton, str) else triton_configs(threads, cpus):
            key = f"triton-{n}t-{delay_us}us"
            tri = _served_triton(stack, source, logs / key, pytriton, threads=n, delay_us=delay_us)
            if isinstance(tri, str):
                pytriton = tri
                break
            served[key] = tri
            tritons[key] = {"threads": n, "queue_delay_us": delay_us}
        if isinstance(pytriton, str):
            out["triton"] = {"skipped": pytriton}
        ref = LocalReference(source)
        for s in served.values():  # warm every path: first calls trace, connect and allocate
            _latency_block(s, req1, 10)
            _rate_block(s, reqs, 2 * LOAD_CONCURRENCY)
            s.latencies_s.clear()
            s.samples, s.wall_s = 0, 0.0
        names = ["local", *served]
        everyone = {"local": ref.served, **served}
        for r in range(rounds):
            order = names[r % len(names):] + names[: r % len(names)]  # each configuration leads a round in turn
            row: dict[str, dict[str, float]] = {n: {} for n in names}
            for n in order:
                row[n]["p50_ms"] = ref.latency_block(per_round_c1) if n == "local" else _latency_block(served[n], req1, per_round_c1)
            for n in order:
                row[n]["rate"] = ref.rate_block(LOCAL_RATE_BLOCK_S) if n == "local" else _rate_block(served[n], reqs, per_round_load)
            for n in names:
                everyone[n].rounds.append(row[n])
            log.info("colocation_round", round=r + 1, of=rounds, **{n: row[n] for n in names})
        out["local"] = {
            "p50_ms": ref.served.p50_ms,
            "rate": ref.served.rate,
            "best_batch": ref.best_batch,
            "rss_bytes": ref.rss_bytes,
            "rss_added_bytes": ref.rss_added_bytes,
            "runs": ref.served.rounds,
        }
        for n, s in served.items():
            out[n] = {
                "p50_ms": s.p50_ms,
                "rate": s.rate,
                "rss_bytes": rss_bytes(s.pids),
                "processes": len(_family(s.pids)),
                "errors": dict(s.errors),
                "runs": s.rounds,
                **({"version": s.version} if s.version else {}),
                **tritons.get(n, {}),
            }
    configs = [n for n in out if n.startswith("triton-")]
    if configs and "skipped" not in out.get("triton", {}):
        out["triton"] = best_of(out, configs)
        out["paired"] = {n: paired_ratios(out[n]["runs"], out["triton"]["runs"]) for n in ("local", *PIPELINES)}
    return out


#: Triton's dynamic batching queue delays tried: none, and the pipeline's own default (1 ms).
TRITON_QUEUE_DELAYS_US = (0, 1000)


def triton_configs(threads: int | None, cpus: int) -> list[tuple[int, int]]:
    """(intra-op threads, queue delay in us) Triton is served with: the thread count asked for, else one and
    the CPUs'; each with every delay of ``TRITON_QUEUE_DELAYS_US``."""
    counts = [threads] if threads else sorted({1, cpus})
    return [(n, d) for n in counts for d in TRITON_QUEUE_DELAYS_US]


def best_of(out: Mapping[str, Any], configs: Sequence[str]) -> dict[str, Any]:
    """Triton's best: on each measure its best configuration (lowest p50 over all rounds, highest rate), whose
    rounds are the ones the pipelines are paired with.

    Not the best of the configurations in each round: that takes the least of several noisy numbers every
    round, which favours whichever side has more configurations. Four Tritons alike would beat any one of
    them in most rounds (measured: the least of the four per round was 2-9 % below the best single one).
    """
    rows = {n: out[n] for n in configs}
    p50_of = min(configs, key=lambda n: rows[n]["p50_ms"])
    rate_of = max(configs, key=lambda n: rows[n]["rate"])
    rounds = min(len(r["runs"]) for r in rows.values())
    first = rows[configs[0]]
    return {
        "p50_ms": rows[p50_of]["p50_ms"],
        "rate": rows[rate_of]["rate"],
        "rss_bytes": min(r["rss_bytes"] for r in rows.values()),
        "processes": min(r["processes"] for r in rows.values()),
        "errors": dict(sum((Counter(r["errors"]) for r in rows.values()), Counter())),
        "runs": [{"p50_ms": rows[p50_of]["runs"][i]["p50_ms"], "rate": rows[rate_of]["runs"][i]["rate"]} for i in range(rounds)],
        "of": list(configs),
        "p50_of": p50_of,
        "rate_of": rate_of,
        **({"version": first["version"]} if "version" in first else {}),
    }


def _family(pids: Sequence[int]) -> set[int]:
    """These processes and all their descendants (those still running)."""
    import psutil

    seen: set[int] = set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            seen.update(p.pid for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            continue
    return seen


def paired_ratios(runs: Sequence[Mapping[str, float]], against: Sequence[Mapping[str, float]]) -> dict[str, Any]:
    """Round by round, this configuration's p50 and rate over the other's (measured in the same minute).

    ``p50``/``rate``: the median ratio and its range; ``p50_won``/``rate_won``: in how many rounds this
    configuration was faster (lower p50, higher rate).
    """
    p50 = [a["p50_ms"] / b["p50_ms"] for a, b in zip(runs, against)]
    rate = [a["rate"] / b["rate"] for a, b in zip(runs, against)]
    return {
        "rounds": len(p50),
        "p50": {"median": float(np.median(p50)), "min": min(p50), "max": max(p50)} if p50 else {},
        "rate": {"median": float(np.median(rate)), "min": min(rate), "max": max(rate)} if rate else {},
        "p50_won": sum(x < 1.0 for x in p50),
        "rate_won": sum(x > 1.0 for x in rate),
    }


def render(c: dict[str, Any]) -> list[str]:
    """The section's table: absolute numbers and ratios to the local reference and to Triton."""
    base = c["local"]
    tri = c.get("triton", {})
    lines = [
        f"co-location: {c['shards']} shards, {c['cpus']} CPUs, every configuration up at once, {c['rounds']} interleaved round(s); same KServe v2 load generator",
        "                                      p50 c=1 ms  x local  rate c=16/s  x local   RSS MB  procs" + ("  p50 x triton  rate x triton  RSS x triton" if "rate" in tri else ""),
    ]
    pytriton = f"PyTriton {tri['version']}" if tri.get("version") else "PyTriton"
    names = {
        "local": "local, compiled, in-process",
        "per-shard": "pipeline, one process per shard",
        "co-located": "pipeline, shards co-located",
        "with-ingress": "pipeline, co-located with ingress",
    }
    configs = [k for k in c if k.startswith("triton-")]
    for k in configs:
        n, delay_us = c[k].get("threads"), c[k].get("queue_delay_us")
        names[k] = f"Triton, {n} thread{'s' if n != 1 else ''}, delay {delay_us / 1000:g} ms"
    names["triton"] = f"Triton's best of {len(configs)}" if len(configs) > 1 else f"Triton ({pytriton})"
    keys = ["local", *PIPELINES, *(configs if len(configs) > 1 else []), "triton"]
    for key in keys:
        row = c.get(key, {})
        if "skipped" in row:
            lines.append(f"  {names[key]:<36} skipped: {row['skipped'][:200]}")
            continue
        if "rate" not in row:
            continue
        procs = row.get("processes", 1)
        text = (
            f"  {names[key]:<36} {row['p50_ms']:10.2f}  {row['p50_ms'] / base['p50_ms']:7.2f}  {row['rate']:11.1f}  {row['rate'] / base['rate']:7.2f}"
            f"  {row['rss_bytes'] / 2**20:7.0f}  {procs:5d}"
        )
        if "rate" in tri:
            text += f"  {row['p50_ms'] / tri['p50_ms']:12.2f}  {row['rate'] / tri['rate']:13.2f}  {row['rss_bytes'] / tri['rss_bytes']:12.2f}"
        if row.get("errors"):
            text += f"  errors {row['errors']}"
        lines.append(text)
    lines.append("  (local: no server, its rate at its best batch; RSS of local: the bench process itself)")
    if len(configs) > 1:
        lines.append(
            f"  (Triton: {pytriton}, dynamic batching up to 8 with the queue delay shown; its best: on each measure its best"
            f" configuration, p50 {names.get(tri.get('p50_of', ''), '?')}, rate {names.get(tri.get('rate_of', ''), '?')};"
            " x triton and the rounds are against it)"
        )
    paired = c.get("paired", {})
    if paired:
        lines.append(f"  round by round against Triton's best (the same minute; median, range, rounds won of {paired['co-located']['rounds']}):")
        for key in ("local", *PIPELINES):
            if key not in paired or not paired[key]["p50"]:
                continue
            pr = paired[key]
            lines.append(
                f"    {names[key]:<36} p50 x triton {pr['p50']['median']:.2f} ({pr['p50']['min']:.2f}-{pr['p50']['max']:.2f}, lower in {pr['p50_won']})"
                f"   rate x triton {pr['rate']['median']:.2f} ({pr['rate']['min']:.2f}-{pr['rate']['max']:.2f}, higher in {pr['rate_won']})"
            )
    for o in c.get("overlap", []):
        if "skipped" in o:
            lines.append(f"  overlap: skipped ({o['skipped'][:200]})")
            continue
        lines.append(
            f"  overlap of the {c['shards']} shards on threads of one process, {o['threads']} intra-op / {o.get('inter_threads', 1)} inter-op thread(s): "
            f"{o['work']:.2f} shards' worth of work at once (1.00: they only take turns)"
        )
    return lines


# ------------------------------------------------------------------ overlap of shards in one process
def overlap(directory: Path, threads: int, seconds: float = 4.0, inter_threads: int = 0) -> dict[str, Any]:
    """How much the shards of one process compute at once: each shard alone, then all on threads together.

    ``work`` is the sum over shards of (calls per second together / calls per second alone): 1.0 means the
    shards only took turns (no overlap), N means N shards' worth of work got done at once. Run it in a
    process of its own (``python -m pipeline.bench.colocation DIR --threads N``): TensorFlow's pools are
    sized once per process.
    """
    import threading

    from pipeline.serving.runtime import ShardRuntime, configure_tensorflow, zeros_like_spec

    from pipeline.serving.group import default_inter_threads

    t = topo.load(directory)
    inter = inter_threads or default_inter_threads(len(t.shards))  # as a co-located process sizes it
    configure_tensorflow(threads, inter)
    runtimes = [ShardRuntime.load(t, s.name) for s in t.shards]
    for r in runtimes:
        r.warm_up(2, 1)
    rng = np.random.default_rng(0)
    inputs = [{n: rng.standard_normal(zeros_like_spec(s).shape).astype(np.float32) for n, s in r.input_specs.items()} for r in runtimes]

    def loop(r: ShardRuntime, x: dict[str, np.ndarray], out: list[float]) -> None:
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            r(x)
            n += 1
        out.append(n / seconds)

    alone = []
    for r, x in zip(runtimes, inputs):
        o: list[float] = []
        loop(r, x, o)
        alone.append(o[0])
    outs: list[list[float]] = [[] for _ in runtimes]
    threads_ = [threading.Thread(target=loop, args=(r, x, o)) for r, x, o in zip(runtimes, inputs, outs)]
    for th in threads_:
        th.start()
    for th in threads_:
        th.join()
    together = [o[0] for o in outs]
    return {
        "threads": threads,
        "inter_threads": inter,
        "alone_per_s": alone,
        "together_per_s": together,
        "work": sum(c / a for c, a in zip(together, alone)),
    }


def overlap_in_subprocess(directory: Path, threads: int, inter_threads: int = 0) -> dict[str, Any]:
    import json

    r = subprocess.run(
        [sys.executable, "-m", "pipeline.bench.colocation", str(directory), "--threads", str(threads), "--inter-threads", str(inter_threads)],
        capture_output=True, text=True, timeout=900, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
    )  # fmt: skip
    if r.returncode != 0:
        return {"skipped": f"overlap run failed: {r.stderr[-500:]}"}
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.bench.colocation DIR --threads N``: print the overlap measurement as one JSON line."""
    import argparse
    import json

    p = argparse.ArgumentParser(description="overlap of a topology's shards computing on threads of one process")
    p.add_argument("directory", type=Path)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--inter-threads", type=int, default=0, help="inter-op threads (default: as a co-located process, one per shard up to the CPUs)")
    p.add_argument("--seconds", type=float, default=4.0)
    args = p.parse_args(argv)
    print(json.dumps(overlap(args.directory, args.threads, args.seconds, args.inter_threads)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
