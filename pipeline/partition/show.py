"""``pipeline show``: the plan table and the shard graph as Graphviz DOT or Mermaid."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline import topology as topo
from pipeline.topology import INGRESS, Topology


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, metavar="DIR", help="a topology directory")
    p.add_argument("--format", choices=["table", "dot", "mermaid"], default="table", help="what to print")
    p.add_argument("--out", type=Path, default=None, help="write the graph to this file instead of printing it")


def run(args: argparse.Namespace) -> int:
    topology = topo.load(args.directory, check_files=False)
    if args.format == "table":
        plan = topology.extra.get("plan") or {}
        text = plan_table(plan.get("shards", []), name=topology.name, operations=plan.get("operations"), batch=plan.get("batch"))
        text += "\n" + cost_line(plan)
        text += "\n" + weights_lines(topology.extra.get("weights"))
        text += placement_text(topology)
        from pipeline import colocation

        groups = colocation.describe(topology)
        if colocation.is_grouped(topology) or colocation.ingress_process(topology) is not None:
            text += "\nprocesses (shards of one process: threads joined by inproc://):\n" + "\n".join(
                f"  {name}: {', '.join(shards)}" for name, shards in groups.items()
            )
        else:
            text += "\nprocesses: one per shard"
    elif args.format == "dot":
        text = to_dot(topology)
    else:
        text = to_mermaid(topology)
    if args.out:
        args.out.write_text(text + "\n")
        print(f"wrote {args.out}")
    else:
        print(text)
    return 0


def placement_text(topology: Topology) -> str:
    """The hosts of the shards, bytes and estimated ms per link, the stages and the bottleneck, for a
    topology placed on a cluster (empty for one that was not)."""
    from pipeline.cluster import cluster_of
    from pipeline.partition.placement import estimate_topology, placement_table

    cluster = cluster_of(topology)
    if cluster is None:
        return ""
    estimate, hosts = estimate_topology(topology, cluster)
    plan = topology.extra.get("plan") or {}
    objective = (plan.get("placement") or {}).get("objective")
    rows = {r.get("shard"): r for r in plan.get("shards") or [] if isinstance(r, dict)}
    spans = [(str(rows[s.name].get("first", "")), str(rows[s.name].get("last", ""))) if s.name in rows else ("", "") for s in topology.shards]
    from pipeline.partition.replica_placement import replica_table

    text = "\n\n" + placement_table(
        estimate,
        shard_names=[s.name for s in topology.shards],
        hosts=hosts,
        cluster=cluster,
        objective=objective,
        first_last=spans,
    )
    replicas = replica_table(topology, cluster)  # the table above counts each shard's first replica only
    return text + ("\n\n" + replicas if replicas else "")


def cost_line(plan: dict[str, Any]) -> str:
    """What the plan balanced: the estimate alone, or corrected by times measured on the partitioning host."""
    measured = plan.get("measured")
    if isinstance(measured, dict) and measured.get("segments"):
        return (
            f"costs: the estimate corrected by times measured on the host that partitioned ({measured.get('conditions', '?')}, "
            f"{len(measured['segments'])} segments; plan.measured in topology.yaml)"
        )
    return "costs: the estimate from FLOPs and bytes (pipeline partition --measure corrects it with times measured here)"


def weights_lines(weights: Any) -> str:
    """How the served weights were made (``weights`` in topology.yaml), one line per fact."""
    if not isinstance(weights, dict) or not weights:
        return "weights: not recorded (a topology written before the record existed)"
    lines = [f"weights: {weights.get('source', '?')}, {weights.get('init', '?')}"]
    lines += [f"  {key}: {weights[key]}" for key in ("calibration", "layer_scale") if key in weights]
    return "\n".join(lines)


def plan_rows(
    graph: Any, plans: list[Any], costs: list[Any], tensor_bytes: list[int], seconds_per_op: list[float]
) -> list[dict[str, Any]]:
    """One row per shard: operations, parameters, compute share, bytes out per sample, crossing tensors.

    ``seconds_per_op`` is the cost model's estimate per sample at the batch the plan balanced for. A row
    lists under ``estimated`` the operations the cost model knew only by output size and parameters.
    """
    total = sum(seconds_per_op) or 1.0
    rows = []
    for plan in plans:
        seconds = sum(seconds_per_op[i] for i in plan.ops)
        params = sum(costs[i].params for i in plan.ops)
        sent = [graph.tensors[t].name for t in plan.outputs]
        bytes_out = sum(tensor_bytes[t] * len(plan.consumers[t]) for t in plan.outputs)
        estimated = [
            f"{graph.ops[i].name} ({graph.ops[i].class_name.rsplit('.', 1)[-1]})"
            for i in plan.ops
            if getattr(costs[i], "estimated", False)
        ]
        rows.append(
            {
                "shard": plan.name,
                "operations": len(plan.ops),
                "first": graph.ops[plan.ops[0]].name,
                "last": graph.ops[plan.ops[-1]].name,
                "params": int(params),
                "share": round(seconds / total, 4),
                "estimated_ms": round(seconds * 1e3, 3),
                "bytes_out": int(bytes_out),
                "sends": sent,
                **({"estimated": estimated} if estimated else {}),
            }
        )
    return rows


def plan_table(rows: list[dict[str, Any]], *, name: str, operations: int | None = None, batch: int | None = None) -> str:
    """The plan as a table; ``est ms`` is the estimated compute per sample in batches of ``batch`` rows."""
    if not rows:
        return f"{name}: no plan recorded in topology.yaml"
    k = len(rows)
    header = f"{'shard':<8} {'ops':>5} {'params':>11} {'compute':>8} {'est ms':>8} {'bytes out':>11}  tensors sent (first op .. last op)"
    title = f"plan for {name}: {k} shard(s)" + (f", {operations} operations" if operations else "")
    if batch:
        title += f", balanced for batches of {batch} (est ms: per sample)"
    lines = [title, header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r['shard']:<8} {r['operations']:>5} {r['params']:>11,} {r['share'] * 100:>7.1f}% {r['estimated_ms']:>8.2f} "
            f"{r['bytes_out']:>11,}  {', '.join(r['sends'])}  ({r['first']} .. {r['last']})"
        )
    slowest = max(r["share"] for r in rows)
    lines.append(f"slowest shard: {slowest * 100:.1f}% of the compute (ideal 1/{k} = {100 / k:.1f}%)")
    guessed = [(r["shard"], op) for r in rows for op in r.get("estimated", [])]
    if guessed:
        lines.append(
            f"{len(guessed)} operation(s) of layer types the cost model does not know, estimated from their output "
            "size and parameters:"
        )
        for shard, op in guessed:
            lines.append(f"  {shard}: {op}")
    return "\n".join(lines)


def _host_names(t: Topology) -> dict[str, str]:
    """``"NAME "`` per process for a topology placed on a cluster, else ``""``: prefixes the endpoint in labels."""
    from pipeline.cluster import cluster_of, host_names

    if cluster_of(t) is None:
        return {s.name: "" for s in t.shards}
    return {k: f"{v} " for k, v in host_names(t).items()}


def _edges(t: Topology) -> list[tuple[str, str, list[str]]]:
    edges = [(INGRESS, shard, list(names)) for shard, names in t.entry_routes().items()]
    for shard in t.shards:
        for consumer, names in t.routes(shard.name).items():
            edges.append((shard.name, consumer if consumer != INGRESS else "results", list(names)))
    return edges


def _label(names: list[str], t: Topology) -> str:
    parts = []
    for n in names:
        spec = t.tensors.get(n)
        shape = "x".join("?" if d == -1 else str(d) for d in spec.shape[1:]) if spec else ""
        parts.append(f"{n} [{shape}]")
    return "\\n".join(parts)


def to_dot(t: Topology) -> str:
    lines = [f'digraph "{t.name}" {{', "  rankdir=LR;", '  node [shape=box, style=rounded, fontname="Helvetica"];']
    lines.append(f'  ingress [label="ingress\\n{t.ingress.grpc}", shape=oval];')
    lines.append('  results [label="ingress\\nresults", shape=oval];')
    hosts = _host_names(t)
    for s in t.shards:
        lines.append(f'  "{s.name}" [label="{s.name}\\n{s.file}\\n{hosts[s.name]}{s.endpoint}"];')
    for a, b, names in _edges(t):
        lines.append(f'  "{a}" -> "{b}" [label="{_label(names, t)}", fontsize=9];')
    lines.append("}")
    return "\n".join(lines)


def to_mermaid(t: Topology) -> str:
    def node_id(name: str) -> str:
        return "".join(c if c.isalnum() else "_" for c in name)

    lines = ["flowchart LR", f'  ingress(["ingress {t.ingress.grpc}"])', '  results(["ingress results"])']
    hosts = _host_names(t)
    for s in t.shards:
        lines.append(f'  {node_id(s.name)}["{s.name}<br/>{hosts[s.name]}{s.endpoint}"]')
    for a, b, names in _edges(t):
        label = "<br/>".join(_label([n], t).replace('"', "'") for n in names)
        lines.append(f'  {node_id(a)} -->|"{label}"| {node_id(b)}')
    return "\n".join(lines)
