"""``pipeline bench DIR --only colocation``: one process per shard against co-located shards (and Triton).

In one run, through the same gRPC load generator (:mod:`pipeline.bench.load`,
KServe v2), one configuration after the other on the same machine:

- ``local``: the whole model compiled (``tf.function``) in the bench process,
  called directly (no server): the reference of the design budget;
- ``per-shard``: the pipeline with one worker process per shard (1 TensorFlow
  thread each, today's default);
- ``co-located``: the same shards in one worker process (threads joined by
  ``inproc://``, one TensorFlow runtime, its intra-op pool of one thread per
  CPU shared by the shards);
- ``triton``: a real Triton Inference Server serving the whole model through
  PyTriton with dynamic batching, when ``.venv-pytriton`` exists or
  ``scripts/pytriton_env.sh`` can build it.

Per configuration: p50 latency at concurrency 1, throughput at concurrency 16,
and the resident memory (RSS) of all its processes (the ingress included;
Triton's server, its Python backend stubs and the PyTriton process included),
measured warm after the load. ``--rounds N`` repeats the served
configurations in turn and keeps each one's best, so that a noisy minute of a
shared machine does not decide the ratio.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import colocation
from pipeline import topology as topo
from pipeline.log import get_logger
from pipeline.serving import kserve

ROOT = Path(__file__).resolve().parents[2]
PYTRITON_ENV_SCRIPT = ROOT / "scripts" / "pytriton_env.sh"
PYTRITON_VENV = Path(os.environ.get("PIPELINE_PYTRITON_VENV", ROOT / ".venv-pytriton"))
#: the load: concurrency for throughput, requests per measurement (at least).
LOAD_CONCURRENCY = 16
#: start of a served configuration (TensorFlow imports on a busy 2-core machine).
START_TIMEOUT_S = 300.0

log = get_logger("pipeline.bench.colocation")


def rss_bytes(pids: list[int]) -> int:
    """Resident memory of these processes and all their descendants (each counted once)."""
    import psutil

    seen: set[int] = set()
    total = 0
    for pid in pids:
        try:
            root = psutil.Process(pid)
            family = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for p in family:
            if p.pid in seen:
                continue
            seen.add(p.pid)
            try:
                total += p.memory_info().rss
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
        "p50_ms": float(np.percentile(np.asarray(one.latencies_s) * 1e3, 50)) if one.latencies_s else float("nan"),
        "rate": load.rate,
        "load_p50_ms": float(np.percentile(np.asarray(load.latencies_s) * 1e3, 50)) if load.latencies_s else float("nan"),
        "errors": dict(one.errors + load.errors),
    }


def served_pipeline(source: topo.Topology, work: Path, logs: Path, *, colocate: bool, requests: int, threads: int | None) -> dict[str, Any]:
    from pipeline.launch import Cluster, relocate

    label = "co-located" if colocate else "per-shard"
    copy = relocate(source.directory, work / label)
    copy = colocation.colocate(copy) if colocate else colocation.per_shard(copy)
    copy.write()
    args = ["--threads", str(threads)] if threads else []
    with Cluster(copy, logs / label, common_worker_args=args) as cluster:
        out = measure(cluster.target, copy.name, copy, requests)
        pids = [p.pid for p in cluster.procs.values()]
        out["rss_bytes"] = rss_bytes(pids)
        out["processes"] = len(pids)
        worker_pids = [p.pid for n, p in cluster.procs.items() if n != topo.INGRESS]
        out["workers_rss_bytes"] = rss_bytes(worker_pids)
    return out


def pytriton_python() -> Path | str:
    """The PyTriton venv's interpreter (built by scripts/pytriton_env.sh when missing), or why it is unavailable."""
    py = PYTRITON_VENV / "bin" / "python"
    r = subprocess.run(["bash", str(PYTRITON_ENV_SCRIPT)], capture_output=True, text=True, timeout=1800)
    if r.returncode != 0 or not py.exists():
        return f"PyTriton unavailable ({PYTRITON_ENV_SCRIPT.name} exited {r.returncode}: {r.stderr.strip()[-300:]})"
    return py


def _libpython_dir(py: Path) -> str:
    """The directory of the libpython that the venv's interpreter itself uses (its base installation's)."""
    r = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_config_var('LIBDIR'))"], capture_output=True, text=True, timeout=60)
    return r.stdout.strip()


def served_triton(source: topo.Topology, work: Path, logs: Path, *, requests: int, threads: int) -> dict[str, Any]:
    from pipeline import process
    from pipeline.launch import free_ports

    py = pytriton_python()
    if isinstance(py, str):
        return {"skipped": py}
    if len(source.inputs) != 1 or len(source.outputs) != 1:
        return {"skipped": "the Triton comparison serves one-input, one-output models only"}
    grpc_port, http_port, metrics_port = free_ports(3)
    (i,), (o,) = source.inputs, source.outputs
    sample = source.extra.get("sample_input_shapes", {}).get(i.name)
    in_shape = [int(d) for d in (sample[1:] if sample else i.shape[1:])]
    spec = lambda name, dtype, dims: f"{name}:{dtype}:{','.join(str(d) for d in dims)}"  # noqa: E731
    argv = [
        str(py), str(Path(__file__).with_name("pytriton_serve.py")), str(source.model_path.resolve()), source.name,
        str(grpc_port), str(http_port), str(metrics_port), str(threads),
        spec(i.name, i.dtype, in_shape), spec(o.name, o.dtype, o.shape[1:]),
    ]  # fmt: skip
    libdir = _libpython_dir(py)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("PYTHON")},
        "LD_LIBRARY_PATH": ":".join(x for x in (libdir, os.environ.get("LD_LIBRARY_PATH", "")) if x),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "PYTHONUNBUFFERED": "1",
    }
    proc = process.start("pytriton", argv, logs / "triton", env=env)
    target = f"127.0.0.1:{grpc_port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "pytriton_ready" not in proc.text() or not _triton_ready(target, source.name):
            if not proc.alive:
                return {"skipped": f"PyTriton exited {proc.returncode}: {proc.text()[-800:]}"}
            if time.monotonic() > deadline:
                return {"skipped": f"PyTriton not ready within {START_TIMEOUT_S:.0f} s: {proc.text()[-800:]}"}
            time.sleep(0.5)
        out = measure(target, source.name, source, requests)
        out["rss_bytes"] = rss_bytes([proc.pid])
        out["processes"] = 1 + len(_children(proc.pid))
        out["version"] = subprocess.run(
            [str(py), "-c", "import importlib.metadata as m; print(m.version('nvidia-pytriton'))"], capture_output=True, text=True, timeout=60
        ).stdout.strip()
        return out
    finally:
        proc.stop()


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _triton_ready(target: str, model: str) -> bool:
    import grpc

    from pipeline.pb import grpc_service_pb2 as kpb
    from pipeline.pb import grpc_service_pb2_grpc as kgrpc

    with grpc.insecure_channel(target) as channel:
        try:
            return bool(kgrpc.GRPCInferenceServiceStub(channel).ModelReady(kpb.ModelReadyRequest(name=model), timeout=2).ready)
        except grpc.RpcError:
            return False


def local_reference(source: topo.Topology, requests: int) -> dict[str, Any]:
    """The whole model compiled in this process: p50 at batch 1, and its best batched rate (no server)."""
    import psutil

    from pipeline.bench import local

    before = psutil.Process().memory_info().rss
    fn, t = local.compiled_whole(source.directory)
    x1 = local.sample_inputs(t, 1)
    times = local.latency(fn, x1, requests)
    tp = local.throughput(fn, t, [1, 8, 16], seconds=3.0)
    best = max(tp, key=tp.get)
    return {
        "p50_ms": float(np.percentile(np.asarray(times) * 1e3, 50)),
        "rate": tp[best],
        "best_batch": best,
        "rss_bytes": psutil.Process().memory_info().rss,
        "rss_added_bytes": psutil.Process().memory_info().rss - before,
    }


def bench_colocation(source: topo.Topology, work: Path, logs: Path, requests: int, threads: int | None = None, rounds: int = 1) -> dict[str, Any]:
    """Every configuration, side by side in this run (see the module docstring)."""
    cpus = len(os.sched_getaffinity(0))
    out: dict[str, Any] = {"cpus": cpus, "rounds": rounds, "shards": len(source.shards)}
    runs: dict[str, list[dict[str, Any]]] = {"per-shard": [], "co-located": [], "triton": []}
    for r in range(rounds):
        runs["per-shard"].append(served_pipeline(source, work / f"r{r}", logs, colocate=False, requests=requests, threads=threads))
        runs["co-located"].append(served_pipeline(source, work / f"r{r}", logs, colocate=True, requests=requests, threads=threads))
        tri = served_triton(source, work / f"r{r}", logs, requests=requests, threads=threads or cpus)
        runs["triton"].append(tri)
        if "skipped" in tri:
            break
    # the pools a co-located process uses (one inter-op thread per shard up to the CPUs), and one inter-op thread
    out["overlap"] = [overlap_in_subprocess(source.directory, n, i) for n in sorted({1, threads or cpus}) for i in (0, 1)]
    out["local"] = local_reference(source, requests)
    for name, rows in runs.items():
        good = [row for row in rows if "skipped" not in row]
        if not good:
            out[name] = rows[0] if rows else {"skipped": "not run"}
            continue
        out[name] = {
            "p50_ms": min(row["p50_ms"] for row in good),
            "rate": max(row["rate"] for row in good),
            "rss_bytes": min(row["rss_bytes"] for row in good),
            "processes": good[0]["processes"],
            "errors": {k: sum(row["errors"].get(k, 0) for row in good) for row in good for k in row["errors"]},
            "runs": good,
            **({"version": good[0]["version"]} if "version" in good[0] else {}),
        }
    return out


def render(c: dict[str, Any]) -> list[str]:
    """The section's table: absolute numbers and ratios to the local reference and to Triton."""
    base = c["local"]
    tri = c.get("triton", {})
    lines = [
        f"co-location: {c['shards']} shards, {c['cpus']} CPUs, best of {c['rounds']} round(s); same KServe v2 load generator",
        "                                  p50 c=1 ms  x local  rate c=16/s  x local   RSS MB  procs" + ("  p50 x triton  rate x triton  RSS x triton" if "rate" in tri else ""),
    ]
    names = {"local": "local, compiled, in-process", "per-shard": "pipeline, one process per shard", "co-located": "pipeline, shards co-located", "triton": f"Triton (PyTriton {tri.get('version', '')})"}
    for key in ("local", "per-shard", "co-located", "triton"):
        row = c.get(key, {})
        if "skipped" in row:
            lines.append(f"  {names[key]:<32} skipped: {row['skipped'][:200]}")
            continue
        if "rate" not in row:
            continue
        procs = row.get("processes", 1)
        text = (
            f"  {names[key]:<32} {row['p50_ms']:10.2f}  {row['p50_ms'] / base['p50_ms']:7.2f}  {row['rate']:11.1f}  {row['rate'] / base['rate']:7.2f}"
            f"  {row['rss_bytes'] / 2**20:7.0f}  {procs:5d}"
        )
        if "rate" in tri:
            text += f"  {row['p50_ms'] / tri['p50_ms']:12.2f}  {row['rate'] / tri['rate']:13.2f}  {row['rss_bytes'] / tri['rss_bytes']:12.2f}"
        if row.get("errors"):
            text += f"  errors {row['errors']}"
        lines.append(text)
    lines.append("  (local: no server, its rate at its best batch; RSS of local: the bench process itself)")
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
