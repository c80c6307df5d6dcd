"""``pipeline bench DIR --sections multihost``: one model over three namespace hosts with shaped links.

Three hosts are network namespaces on an isolated bridge (:mod:`pipeline.netns`,
needs root and iproute2), each host's link shaped with ``tc tbf`` in both
directions. The same model is served one plan after the other, each measured
by a closed-loop load at ``concurrency`` running *inside the ingress's host*:

- single host: the compute-only plan (``--shards 3``, balanced for compute)
  with every process on the ingress's host (loopback; the reference);
- for each link rate: the compute-only plan placed in order (shard ``i`` on
  host ``i+1``), and the cluster-aware plan (``pipeline partition --cluster``
  with the three hosts and that rate);
- heterogeneous (at the last rate): one host made faster (its workers get every
  CPU and as many TensorFlow threads, the others one CPU and one thread) and
  declared twice as fast in the cluster file, against the plan made with every
  host at one speed, both run on the same uneven hosts.

Every host's ``speed`` in the cluster files is what the machine measurably
computes (the whole model in-process at its best batch), in the cost model's
units, shared out over the three hosts: they share this machine's CPUs.

Every number comes from this run, plans side by side; the machine is shared,
so the report carries the load average before and after. The namespaces are
removed in a ``finally``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from pipeline import topology as topo

log = structlog.get_logger(__name__)

#: where the package lives: the processes started in a namespace import it from here.
PACKAGE_ROOT = Path(__file__).resolve().parents[2]
#: one-way latency the cluster file declares for a link (a bridge inside one machine: next to nothing).
LINK_LATENCY = "0.1ms"
#: starting a pipeline of four TensorFlow processes on a busy 2-core machine.
START_TIMEOUT_S = 600.0
FAST_HOST = "h2"

#: run on the ingress's host: exit 0 once the ingress is ready and every process it knows of (each replica too)
#: is up. ``ServerReady`` alone is true while one replica of a shard is up, so a load started then would route
#: every request to the replicas that happened to warm first.
READY_PROBE = """
import sys, grpc
from pipeline.pb import admin_pb2 as apb, admin_pb2_grpc as agrpc
from pipeline.pb import grpc_service_pb2 as kpb, grpc_service_pb2_grpc as kgrpc
with grpc.insecure_channel(sys.argv[1]) as ch:
    try:
        if not kgrpc.GRPCInferenceServiceStub(ch).ServerReady(kpb.ServerReadyRequest(), timeout=2).ready:
            sys.exit(1)
        processes = agrpc.PipelineAdminStub(ch).Processes(apb.ProcessesRequest(), timeout=2).processes
    except grpc.RpcError:
        sys.exit(1)
sys.exit(0 if processes and all(p.up for p in processes) else 1)
"""


@dataclass(frozen=True)
class Options:
    """What the section measures: link rates (tc units), load per plan, shards of the compute-only plan."""

    rates: tuple[str, ...] = ("100mbit", "1gbit")
    concurrency: int = 16
    seconds: float = 8.0
    warmup_s: float = 2.0
    latency_s: float = 3.0  # then one request at a time: the p50 of an idle pipeline
    shards: int = 3
    heterogeneous: bool = True
    fast_speed: float = 2.0


def cluster_yaml(network: Any, rate: str, speeds: Mapping[str, float] | None = None) -> str:
    """A cluster file for ``network``'s hosts: ingress on h1, every link at ``rate``."""
    from pipeline.cluster import format_bandwidth
    from pipeline.netns import Shaping

    speeds = speeds or {}
    lines = ["version: 1", "hosts:"]
    lines += [f"- {{name: {h.name}, address: {h.address}, speed: {speeds.get(h.name, 1.0):.4g}}}" for h in network.hosts]
    bandwidth = format_bandwidth(Shaping(rate).bits_per_s)
    lines += [f"ingress: {network.hosts[0].name}", "links:", f"  default: {{bandwidth: {bandwidth}, latency: {LINK_LATENCY}}}"]
    return "\n".join(lines) + "\n"


def plan_summary(t: topo.Topology, cluster: Any) -> dict[str, Any]:
    """Hosts of the shards, the cuts (each shard's last operation), estimated bytes per sample per link."""
    from pipeline.cluster import host_names
    from pipeline.partition.placement import estimate_topology

    estimate, hosts = estimate_topology(t, cluster)
    names = host_names(t, cluster)
    rows = {r.get("shard"): r for r in (t.extra.get("plan") or {}).get("shards") or [] if isinstance(r, dict)}
    cuts = [str(rows.get(s.name, {}).get("last", "?")) for s in t.shards[:-1]]
    share: dict[str, float] = {}
    total = sum(estimate.shard_seconds) or 1.0
    for h, sec, s in zip(hosts, estimate.shard_seconds, t.shards):
        speed = cluster.host(h).speed
        share[h] = share.get(h, 0.0) + sec * speed / total  # the share of the model's compute (speed-free)
    norm = sum(share.values()) or 1.0
    return {
        "ingress": names[topo.INGRESS],
        "hosts": hosts,
        "cuts": cuts,
        "compute_share": {h: round(v / norm, 3) for h, v in share.items()},
        "links": [
            {"from": u.src, "to": u.dst, "bytes": round(u.nbytes), "ms": round((u.transfer_s + u.hop_s) * 1e3, 3)}
            for u in estimate.links
            if u.src != u.dst
        ],
        "estimate_bottleneck_ms": round(estimate.bottleneck_s * 1e3, 3),
        "estimate_latency_ms": round(estimate.latency_s * 1e3, 3),
    }


def host_speed(t: topo.Topology, machine_rate: float, hosts: int, cluster: Any) -> float:
    """Each of ``hosts`` hosts sharing this machine, in cluster-file ``speed`` units: the machine's measured
    samples/s times the cost model's seconds per sample on its reference host (speed 1.0), shared out."""
    from pipeline.partition.placement import estimate_topology

    estimate, _ = estimate_topology(t, cluster)
    reference_s = sum(estimate.shard_seconds)  # the whole model, per sample, on one speed-1.0 host
    return max(0.01, machine_rate * reference_s / hosts)


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class _Runner:
    """Starts one placed topology on the namespace hosts, loads it from the ingress's host, stops it."""

    def __init__(self, network: Any, logs: Path, options: Options) -> None:
        self.network = network
        self.logs = logs
        self.options = options
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(PACKAGE_ROOT), os.environ.get("PYTHONPATH", "")]))}
        self.runs = 0

    def serve_and_load(self, t: topo.Topology, label: str, worker_args: Mapping[str, Sequence[str]] | None = None) -> dict[str, Any]:
        from pipeline.cluster import host_names
        from pipeline.launch import Cluster

        names = host_names(t)
        netns = {p: self.network.host(h).netns for p, h in names.items()}
        ingress = self.network.host(names[topo.INGRESS])
        self.runs += 1

        def ready() -> bool:
            r = subprocess.run(
                [*ingress.exec_prefix(), sys.executable, "-c", READY_PROBE, t.ingress.grpc],
                capture_output=True, timeout=30, env=self.env, cwd=PACKAGE_ROOT,
            )  # fmt: skip
            return r.returncode == 0

        log.info("bench.multihost.start", plan=label, hosts=names)
        started = time.monotonic()
        cluster = Cluster(t, self.logs / f"{self.runs:02d}-{label}", netns=netns, worker_args=worker_args, env=self.env, ready=ready)
        with cluster:
            start_s = time.monotonic() - started
            o = self.options
            argv = [
                *ingress.exec_prefix(), sys.executable, "-m", "pipeline.bench.netload", str(t.directory),
                "--target", t.ingress.grpc, "--concurrency", str(o.concurrency), "--seconds", str(o.seconds),
                "--warmup", str(o.warmup_s), "--wait-ready", "60", "--latency-seconds", str(o.latency_s),
            ]  # fmt: skip
            r = subprocess.run(argv, capture_output=True, text=True, timeout=o.seconds + o.warmup_s + o.latency_s + 180, env=self.env, cwd=PACKAGE_ROOT)
        lines = r.stdout.strip().splitlines()
        import json

        result = json.loads(lines[-1]) if lines else {"error": f"the load exited {r.returncode}: {r.stderr[-1000:]}"}
        result["start_s"] = round(start_s, 1)
        log.info("bench.multihost.measured", plan=label, **{k: v for k, v in result.items() if k != "errors"})
        return result


def _placed_copy(source_dir: Path, dest: Path, placed: topo.Topology) -> topo.Topology:
    """A copy of a topology directory (shard files linked) with ``placed``'s processes."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for item in source_dir.iterdir():
        if item.name != topo.TOPOLOGY_FILE:
            (dest / item.name).symlink_to(item.resolve())
    placed.replace(directory=dest).write(dest)
    return topo.load(dest)


def bench_multihost(source: topo.Topology, work: Path, logs: Path, options: Options = Options()) -> dict[str, Any]:
    """The section's numbers (``{"skipped": reason}`` where namespaces cannot be made)."""
    import yaml

    from pipeline import netns
    from pipeline.cluster import cluster_from_dict
    from pipeline.partition.command import partition_source
    from pipeline.partition.placement import assign_hosts

    reason = netns.unavailable_reason()
    if reason:
        return {"skipped": reason}
    out: dict[str, Any] = {"options": {**options.__dict__, "rates": list(options.rates)}, "load_before": load_average()}
    # The three namespace hosts share this machine's CPUs: no plan can serve more than the whole model run
    # in one process on every CPU at its best batch, nor answer faster than it at batch 1 (the ceiling).
    from pipeline.bench.colocation import local_reference

    out["local"] = {k: v for k, v in local_reference(source, 100).items() if k in ("p50_ms", "rate", "best_batch")}
    model = source.model_path
    unsafe = bool(source.extra.get("unsafe", False))
    imports = tuple(source.imports)
    common = {"verify": False, "unsafe": unsafe, "imports": imports, "name": source.name, "force": True}
    network = netns.Network(3)
    try:
        network.create()
        runner = _Runner(network, logs, options)

        # the compute-only plan, cut once
        compute = partition_source(model, work / "compute", shards=options.shards, **common).topology
        hosts_in_order = [network.hosts[i % 3].name for i in range(len(compute.shards))]
        base = iter(range(6000, 60000, 100))

        def placed(t: topo.Topology, cluster: Any, hosts: Sequence[str], label: str) -> topo.Topology:
            b = next(base)
            p = assign_hosts(t, cluster, hosts, base_port=b, grpc_address=f"{network.hosts[0].address}:{b + 99}")
            return _placed_copy(t.directory, work / label, p)

        # the single-host reference: every process on the ingress's host, links unshaped (never crossed)
        unit = cluster_from_dict(yaml.safe_load(cluster_yaml(network, options.rates[0])), source="bench cluster (speed 1.0)")
        single = placed(compute, unit, [network.hosts[0].name] * len(compute.shards), "single")
        # What the cluster files say of each host's speed, as a user would measure it: the namespace hosts
        # share this machine's CPUs, so each gets a third of what the machine computes (the local reference's
        # best rate), in units of the cost model's reference host (pipeline/partition/cost.py).
        speed = out["host_speed"] = host_speed(single, out["local"]["rate"], len(network.hosts), unit)

        def cluster_for(rate: str, speeds: Mapping[str, float] | None = None) -> Any:
            every = {h.name: speed * (speeds or {}).get(h.name, 1.0) for h in network.hosts}
            return cluster_from_dict(yaml.safe_load(cluster_yaml(network, rate, every)), source=f"bench cluster ({rate})")

        first = cluster_for(options.rates[0])
        out["single"] = {"plan": plan_summary(single, first), **runner.serve_and_load(single, "single")}

        out["rates"] = {}
        for rate in options.rates:
            for h in network.hosts:
                network.shape(h.name, netns.Shaping(rate))
            cluster = cluster_for(rate)
            row: dict[str, Any] = {}
            t = placed(compute, cluster, hosts_in_order, f"compute-{rate}")
            row["compute"] = {"plan": plan_summary(t, cluster), **runner.serve_and_load(t, f"compute-{rate}")}
            aware = partition_source(model, work / f"aware-{rate}-cut", cluster=cluster, **common).topology
            t = _placed_copy(aware.directory, work / f"aware-{rate}", aware)
            row["aware"] = {"plan": plan_summary(t, cluster), **runner.serve_and_load(t, f"aware-{rate}")}
            out["rates"][rate] = row

        if options.heterogeneous:
            rate = options.rates[-1]  # the links stay shaped at the last rate
            cpus = sorted(os.sched_getaffinity(0))
            fast_args = ["--cpus", ",".join(map(str, cpus)), "--threads", str(len(cpus))]
            slow_args = ["--cpus", str(cpus[-1]), "--threads", "1"]

            def pinned(t: topo.Topology) -> dict[str, list[str]]:
                from pipeline.cluster import host_names

                names = host_names(t)
                return {s.name: fast_args if names[s.name] == FAST_HOST else slow_args for s in t.shards}

            het: dict[str, Any] = {"fast_host": FAST_HOST, "fast_speed": options.fast_speed, "fast_args": fast_args, "slow_args": slow_args, "rate": rate}
            for label, speeds in (("uniform", {}), ("aware", {FAST_HOST: options.fast_speed})):
                cluster = cluster_for(rate, speeds)
                cut = partition_source(model, work / f"het-{label}-cut", cluster=cluster, **common).topology
                t = _placed_copy(cut.directory, work / f"het-{label}", cut)
                het[label] = {"plan": plan_summary(t, cluster), **runner.serve_and_load(t, f"het-{label}", pinned(t))}
            out["heterogeneous"] = het
        # the reference again, last: the shared machine drifts, and the ratios take the better of the two
        for h in network.hosts:
            network.unshape(h.name)
        out["single_after"] = {"plan": out["single"]["plan"], **runner.serve_and_load(single, "single-after")}
    finally:
        left = network.destroy()
        if left:
            log.warning("bench.multihost.leftovers", namespaces=left)
    out["load_after"] = load_average()
    return out


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "nan"


def _plan_line(p: Mapping[str, Any]) -> str:
    links = ", ".join(f"{l['from']}->{l['to']} {_bytes(l['bytes'])}" for l in p["links"]) or "none between hosts"
    cuts = ", ".join(p["cuts"]) or "none"
    return f"hosts {'/'.join(p['hosts'])} (ingress {p['ingress']}); cuts after {cuts}; per sample: {links}"


def _bytes(n: float) -> str:
    return f"{n / 1e3:.1f} KB" if n >= 1000 else f"{n:.0f} B"


def _row(x: Mapping[str, Any]) -> str:
    alone = x.get("p50_alone_ms")
    tail = f" {alone:8.1f}" if alone is not None else "        -"
    return f"{x.get('rate', 0):9.1f} {x.get('p50_ms', 0):8.1f} {x.get('p95_ms', 0):8.1f} {tail}{_errors(x)}"


def _errors(r: Mapping[str, Any]) -> str:
    if "error" in r:
        return f"  FAILED: {r['error']}"
    return f"  errors {r['errors']}" if r.get("errors") else ""


def render(r: Mapping[str, Any]) -> str:
    """The section as text: one row per plan and rate, the ratios against the goals, the plans."""
    if "skipped" in r:
        return f"multihost: skipped ({r['skipped']})"
    o = r["options"]
    s = r["single"]
    after = r.get("single_after")
    best = max((x for x in (s, after) if x), key=lambda x: x.get("rate", 0))
    lines = [
        f"multihost: 3 namespace hosts, tbf-shaped links, load at concurrency {o['concurrency']} for {o['seconds']:.0f} s from the ingress's host",
        f"  load average before {r['load_before']}, after {r.get('load_after')}",
        f"  every host declared at speed {r.get('host_speed', 1.0):.3g} in the cluster files (a third of this machine's measured compute, in the cost model's units)",
        "  plan                          link       samples/s   p50 ms   p95 ms   p50 ms at concurrency 1",
        f"  single host (reference)       loopback   {_row(s)}",
    ]
    for rate, row in r["rates"].items():
        for key, label in (("compute", "compute-only, in order"), ("aware", "cluster-aware")):
            x = row[key]
            lines.append(f"  {label:<29} {rate:<10} {_row(x)}")
    if after:
        lines.append(f"  single host again, last       loopback   {_row(after)}")
    lines.append("")
    for rate, row in r["rates"].items():
        c, a = row["compute"], row["aware"]
        lines.append(
            f"  at {rate}: cluster-aware / compute-only throughput x{_ratio(a.get('rate', 0), c.get('rate', 0))}, "
            f"cluster-aware / single host (the better run) {_ratio(a.get('rate', 0), best.get('rate', 0))}, p50 {a.get('p50_ms', 0):.1f} ms "
            f"(at concurrency 1: {a.get('p50_alone_ms', float('nan')):.1f} ms)"
        )
    lines.append("  (goals: at 100mbit x >= 8 and p50 <= 25 ms; at 1gbit cluster-aware within 10 % of the single host)")
    local = r.get("local")
    if local:
        fastest = max(local["rate"], best.get("rate", 0))
        lines.append(
            f"  the whole model in one process on every CPU: {local['rate']:.1f} samples/s at batch {local['best_batch']}, "
            f"p50 {local['p50_ms']:.1f} ms at batch 1 (the namespace hosts share these CPUs)"
        )
        for rate, row in r["rates"].items():
            c = row["compute"].get("rate", 0)
            lines.append(
                f"    at {rate}: x8 the compute-only plan needs {8 * c:.1f} samples/s; the fastest this machine served "
                f"the model in this run: {fastest:.1f} (x{_ratio(fastest, c)})"
            )
    lines.append(f"  (a closed loop keeps {o['concurrency']} requests in flight: p50 is about {o['concurrency']} / samples per second)")
    lines += ["", "  plans:", f"    single host: {_plan_line(s['plan'])}"]
    for rate, row in r["rates"].items():
        lines.append(f"    compute-only at {rate}: {_plan_line(row['compute']['plan'])}")
        lines.append(f"    cluster-aware at {rate}: {_plan_line(row['aware']['plan'])}")
    h = r.get("heterogeneous")
    if h:
        u, a = h["uniform"], h["aware"]
        lines += [
            "",
            f"  heterogeneous at {h['rate']}: {h['fast_host']} faster (workers {' '.join(h['fast_args'])}; others {' '.join(h['slow_args'])})",
            f"  {'plan with every host at one speed':<40} {_row(u)}",
            f"  {'plan with ' + h['fast_host'] + ' at ' + str(h.get('fast_speed', 2.0)) + 'x the speed':<40} {_row(a)}",
            f"  gain x{_ratio(a.get('rate', 0), u.get('rate', 0))}; share of the model's compute on {h['fast_host']}: "
            f"{u['plan']['compute_share'].get(h['fast_host'], 0):.0%} -> {a['plan']['compute_share'].get(h['fast_host'], 0):.0%}",
            f"    every host at one speed: {_plan_line(u['plan'])}",
            f"    {h['fast_host']} at {h.get('fast_speed', 2.0)}x: {_plan_line(a['plan'])}",
        ]
    return "\n".join(lines)
