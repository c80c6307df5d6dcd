"""``pipeline bench DIR --only replicas``: a bottleneck shard served by one replica, then by two (issue 16).

The shard with the highest estimated cost (the partition plan's, else the middle one) is made the bottleneck:
each of its replicas runs with one intra-op thread pinned to one core (``--threads 1 --cpus K``), replica k on
core k. The other shards and the ingress run unpinned. Both configurations are served in turn (``rounds``
times, the best of each kept: the machine is shared), and measured through the same load generator as the
co-location section: p50 at concurrency 1 and the rate at concurrency 16.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pipeline import replicas
from pipeline import topology as topo


def bottleneck(t: topo.Topology) -> str:
    """The shard the plan estimates slowest (``plan.shards[].estimated_ms``), else the middle shard."""
    rows = (t.extra.get("plan") or {}).get("shards") or []
    costs: dict[str, float] = {}
    for row in rows:
        name = row.get("shard", row.get("name")) if isinstance(row, dict) else None
        if name in {s.name for s in t.shards}:
            for key in ("estimated_ms", "share"):
                if isinstance(row.get(key), (int, float)):
                    costs[str(name)] = float(row[key])
                    break
    if costs:
        return max(costs, key=lambda k: costs[k])
    return t.shards[len(t.shards) // 2].name


def served(source: topo.Topology, work: Path, logs: Path, shard: str, count: int, requests: int) -> dict[str, Any]:
    """Serve ``source`` with ``count`` replicas of ``shard`` (each on one core) and measure it."""
    from pipeline.bench.colocation import measure
    from pipeline.launch import Cluster, relocate

    label = f"replicas{count}"
    copy = relocate(source.directory, work / label)
    copy = replicas.with_replicas(copy, {shard: count})
    copy.write()
    copy = topo.load(copy.directory)
    cpus = sorted(os.sched_getaffinity(0))
    names = replicas.process_names(copy.shard(shard))
    worker_args = {name: ["--threads", "1", "--cpus", str(cpus[k % len(cpus)])] for k, name in enumerate(names)}
    with Cluster(copy, logs / label, worker_args=worker_args) as cluster:
        out = measure(cluster.target, copy.name, copy, requests, pids=[p.pid for p in cluster.procs.values()])
    out["replicas"] = count
    return out


def bench_replicas(source: topo.Topology, work: Path, logs: Path, requests: int, rounds: int = 1) -> dict[str, Any]:
    """One replica then two of the bottleneck shard, ``rounds`` times in turn; the best of each and the ratios."""
    shard = bottleneck(source)
    runs: dict[str, list[dict[str, Any]]] = {"one": [], "two": []}
    for _ in range(max(1, rounds)):
        runs["one"].append(served(source, work, logs, shard, 1, requests))
        runs["two"].append(served(source, work, logs, shard, 2, requests))
    best = {k: max(v, key=lambda r: r["rate"]) for k, v in runs.items()}
    p50 = {k: min(r["p50_ms"] for r in v) for k, v in runs.items()}
    return {
        "shard": shard,
        "cores": len(os.sched_getaffinity(0)),
        "rounds": runs,
        "cpu_cores_one": best["one"].get("load_cpu_cores", float("nan")),
        "cpu_cores_two": best["two"].get("load_cpu_cores", float("nan")),
        "rate_one": best["one"]["rate"],
        "rate_two": best["two"]["rate"],
        "rate_ratio": best["two"]["rate"] / best["one"]["rate"] if best["one"]["rate"] else float("nan"),
        "p50_one_ms": p50["one"],
        "p50_two_ms": p50["two"],
        "p50_ratio": p50["two"] / p50["one"] if p50["one"] else float("nan"),
        "round_ratios": [b["rate"] / a["rate"] if a["rate"] else float("nan") for a, b in zip(runs["one"], runs["two"])],
    }


def render(r: dict[str, Any]) -> list[str]:
    lines = [
        f"replicas of {r['shard']} (each on one core, --threads 1; {r['cores']} cores here):",
        f"  rate at c=16: one replica {r['rate_one']:.1f}/s, two {r['rate_two']:.1f}/s, ratio {r['rate_ratio']:.2f} (goal >= 1.7)",
        f"  p50 at c=1:   one {r['p50_one_ms']:.2f} ms, two {r['p50_two_ms']:.2f} ms, ratio {r['p50_ratio']:.2f} (goal within 10%)",
        "  rate ratio per round: " + ", ".join(f"{x:.2f}" for x in r["round_ratios"]),
        f"  CPU busy under that load (the pipeline's processes and the load generator): one replica "
        f"{r.get('cpu_cores_one', float('nan')):.2f} cores, two {r.get('cpu_cores_two', float('nan')):.2f} cores, of {r['cores']}",
    ]
    for k in ("one", "two"):
        errs = [run["errors"] for run in r["rounds"][k] if run["errors"]]
        if errs:
            lines.append(f"  errors ({k}): {errs}")
    return lines
