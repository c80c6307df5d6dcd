"""``pipeline partition``: split a model into shards and write the topology directory.

The directory is written to a temporary sibling and renamed at the end, so a
failure leaves nothing half-written.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.cluster import Cluster
from pipeline.errors import PartitionError, UsageError
from pipeline.log import get_logger
from pipeline.partition.planner import DEFAULT_SLACK
from pipeline.topology import (
    DEFAULT_GRPC_ADDRESS,
    DTYPES,
    MODEL_FILE,
    Batching,
    IngressSpec,
    ShardOutput,
    ShardSpec,
    TensorSpec,
    Topology,
    bind_address,
)

log = get_logger("pipeline.partition")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", metavar="SOURCE", help="a .keras file, or a keras.applications model name (e.g. mobilenet_v3_large)")
    p.add_argument("--shards", "-k", type=int, default=None, help="number of shards; the planner chooses the cuts")
    p.add_argument("--cut", action="append", default=[], metavar="NAME", help="cut right after this operation (repeatable)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default: topology/<name>)")
    p.add_argument("--name", default=None, help="model name the ingress serves (default: from SOURCE)")
    p.add_argument(
        "--input-shape",
        action="append",
        default=[],
        metavar="[NAME=]D1,D2,...",
        help="input shape without the batch axis, for models with unknown axes (repeat per input as NAME=...)",
    )
    p.add_argument("--host", default=None, help="host of every process in the topology (default 127.0.0.1; see --cluster to spread them)")
    p.add_argument(
        "--cluster",
        type=Path,
        default=None,
        metavar="FILE",
        help="a cluster file (hosts, ingress host, links): choose the cuts and each shard's host together",
    )
    p.add_argument(
        "--objective",
        choices=["throughput", "latency"],
        default=None,
        help="with --cluster: the slowest stage first, then latency (throughput, the default), or the latency first",
    )
    p.add_argument("--base-port", type=int, default=None, help="first port to use (default: free local ports)")
    p.add_argument("--grpc-address", default=None, help=f"ingress gRPC address (default {DEFAULT_GRPC_ADDRESS})")
    p.add_argument("--max-batch", type=int, default=Batching.max_batch, help="dynamic batching: largest batch per shard")
    p.add_argument("--max-delay-ms", type=float, default=Batching.max_delay_ms, help="dynamic batching: gather window")
    p.add_argument(
        "--plan-batch",
        type=int,
        default=None,
        metavar="N",
        help="balance the shards for batches of N rows (default: --max-batch, the batch size under load; "
        "1 balances for one request at a time)",
    )
    p.add_argument("--slack", type=float, default=DEFAULT_SLACK, help="balance slack the planner may trade for fewer bytes")
    p.add_argument(
        "--measure",
        action="store_true",
        help="time the model on this host in small segments, as the shards will run (under load: the other cores "
        "busy), and balance those times instead of the estimate alone; adds half a minute on MobileNetV3Large "
        "(pipeline/partition/measure.py)",
    )
    p.add_argument("--unsafe", action="store_true", help="allow models that need unsafe deserialization (Lambda layers)")
    p.add_argument(
        "--import",
        dest="imports",
        action="append",
        default=[],
        metavar="MODULE",
        help="import this Python module (custom layers registered with keras.saving.register_keras_serializable) "
        "before loading SOURCE, and record it in topology.yaml so every process imports it (repeatable; the module "
        "must be importable on every host, see docs/CUSTOM_LAYERS.md)",
    )
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    grouping = p.add_mutually_exclusive_group()
    grouping.add_argument(
        "--colocate",
        dest="colocate",
        action="store_const",
        const=True,
        default=None,
        help="run the shards of each host in one process (threads joined by inproc://; topology 'processes' section); "
        "the default with --cluster",
    )
    grouping.add_argument(
        "--per-shard", dest="colocate", action="store_const", const=False, help="one process per shard (the default without --cluster)"
    )
    p.add_argument(
        "--with-ingress",
        action="store_true",
        help="with the shards grouped (--colocate, or --cluster): the process on the ingress's host serves the ingress "
        "too, its links to those shards inproc:// (one process less; docs/BENCHMARKS.md)",
    )
    p.add_argument(
        "--replicas",
        action="append",
        default=[],
        metavar="SHARD=N|SHARD=HOST,...",
        help="serve SHARD with N replica processes, each with its own endpoint and metrics address; with --cluster, "
        "SHARD=HOST,... puts one more replica on each HOST named, and the planner chooses the hosts of a count "
        "(repeatable; see docs/REPLICAS.md)",
    )
    p.add_argument(
        "--propose-replicas",
        action="store_true",
        help="with --cluster: let the planner add replicas of the slowest shards on hosts it would leave idle, "
        "when its cost model says each lowers the slowest stage by at least 10%% (off by default)",
    )
    p.add_argument("--no-verify", action="store_true", help="skip the exactness check at the end")
    p.add_argument("--list-ops", action="store_true", help="print every operation (the names --cut takes) and exit")


@dataclass
class PartitionResult:
    topology: Topology
    table: str
    seconds: float
    warning: str | None = None  # the exactness check could not tell right from wrong (see pipeline.oracle)


def run(args: argparse.Namespace) -> int:
    if args.shards is None and not args.cut and not args.list_ops and args.cluster is None:
        raise UsageError("expected --shards K, at least one --cut NAME, or --cluster FILE (or --list-ops); received none of them")
    if args.cluster is not None and args.host is not None:
        raise UsageError(f"--host {args.host} with --cluster: the cluster file says where each process goes; pass one or the other")
    if getattr(args, "propose_replicas", False) and args.cluster is None:
        raise UsageError("--propose-replicas needs --cluster FILE: replicas are proposed for hosts the plan leaves idle")
    if args.objective is not None and args.cluster is None:
        raise UsageError(f"--objective {args.objective} needs --cluster FILE: without hosts and links there is only the compute to balance")
    if args.with_ingress and not (args.colocate or (args.colocate is None and args.cluster)):
        raise UsageError("--with-ingress puts the ingress into the shards' process: it needs --colocate (or --cluster FILE)")
    cluster = None
    if args.cluster is not None:
        from pipeline.cluster import load_cluster

        cluster = load_cluster(args.cluster)  # before the model loads: a typo fails fast
    if args.shards is not None and args.cut:
        if args.shards != len(args.cut) + 1:
            raise UsageError(f"--shards {args.shards} with {len(args.cut)} --cut names: expected --shards {len(args.cut) + 1} or no --shards")
    if args.shards is not None and args.shards < 1:
        raise UsageError(f"--shards must be at least 1, received {args.shards}")
    from pipeline.custom_objects import check_module_names, import_modules
    from pipeline.partition import replica_placement
    from pipeline.partition.source import load_source

    replica_counts = replica_placement.parse(getattr(args, "replicas", None) or [], cluster=cluster)
    imports = check_module_names(args.imports)
    shapes = parse_input_shapes(args.input_shape)
    single_shape = shapes.pop("", None)
    import_modules(imports, needed_by=f"SOURCE {args.source!r}", recorded=False)
    model, default_name = load_source(args.source, input_shape=single_shape, unsafe=args.unsafe)
    if args.list_ops:
        from pipeline.partition.graph import build_graph

        graph = build_graph(model)
        for op in graph.ops:
            outs = ", ".join(f"{graph.tensors[t].name} {list(graph.tensors[t].shape)}" for t in op.outputs)
            kind = op.class_name.rsplit(".", 1)[-1] + ("" if op.kind == "layer" else " (op)")
            print(f"{op.id:5d}  {op.name:40s} {kind:26s} -> {outs}")
        return 0
    result = partition(
        model,
        name=args.name or default_name,
        out=args.out or Path("topology") / (args.name or default_name),
        shards=args.shards,
        cuts=args.cut,
        input_shapes={**({model.inputs[0]._keras_history.operation.name: single_shape} if single_shape else {}), **shapes},
        host=args.host or "127.0.0.1",
        base_port=args.base_port,
        grpc_address=args.grpc_address,
        batching=Batching(max_batch=args.max_batch, max_delay_ms=args.max_delay_ms),
        plan_batch=args.plan_batch,
        slack=args.slack,
        force=args.force,
        colocate=args.colocate,
        with_ingress=args.with_ingress,
        measure=args.measure,
        verify=not args.no_verify,
        unsafe=args.unsafe,
        imports=imports,
        cluster=cluster,
        objective=args.objective or "throughput",
        replicas=replica_counts,
        propose_replicas=getattr(args, "propose_replicas", False),
    )
    print(result.table)
    if result.warning:
        print(f"warning: {result.warning}")
    print(f"\nwrote {result.topology.directory} ({len(result.topology.shards)} shards) in {result.seconds:.1f} s")
    return 0


def parse_input_shapes(values: list[str]) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for value in values:
        name, _, dims = value.rpartition("=")
        try:
            shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
        except ValueError:
            raise UsageError(f"--input-shape {value!r}: expected [NAME=]D1,D2,... with positive integers") from None
        if not shape or any(d < 1 for d in shape):
            raise UsageError(f"--input-shape {value!r}: expected [NAME=]D1,D2,... with positive integers")
        shapes[name] = shape
    return shapes


def partition(
    model: Any,
    *,
    name: str,
    out: Path,
    shards: int | None = None,
    cuts: list[str] | None = None,
    input_shapes: dict[str, tuple[int, ...]] | None = None,
    host: str = "127.0.0.1",
    base_port: int | None = None,
    grpc_address: str | None = None,
    batching: Batching = Batching(),
    plan_batch: int | None = None,
    slack: float = DEFAULT_SLACK,
    force: bool = False,
    colocate: bool | None = None,
    with_ingress: bool = False,
    measure: bool = False,
    verify: bool = True,
    unsafe: bool = False,
    imports: tuple[str, ...] = (),
    cluster: Cluster | None = None,
    objective: str = "throughput",
    replicas: Mapping[str, Any] | None = None,
    propose_replicas: bool = False,
) -> PartitionResult:
    """Split ``model`` and write the topology directory ``out``; return the topology and the plan table.

    With ``cluster``, the cuts and the host of every shard are chosen together
    (:mod:`pipeline.partition.placement`; ``shards=None`` lets the planner choose how many), and every
    process gets its host's address, ports unique per host; ``host`` is then ignored.
    ``replicas``: shard -> replica count, or a :class:`~pipeline.partition.replica_placement.ReplicaRequest`
    (hosts named: with ``cluster`` only); with ``cluster`` the replicas' hosts are chosen with the shards', and
    ``propose_replicas`` lets the planner add replicas on hosts it would leave idle when they clearly pay.
    """
    from pipeline.partition import cost, planner
    from pipeline.partition.build import build_shard_model, split
    from pipeline.partition.graph import build_graph
    from pipeline.partition.show import plan_rows, plan_table
    from pipeline.partition.source import weights_of

    start = time.perf_counter()
    out = Path(out)
    plan_batch = batching.max_batch if plan_batch is None else plan_batch
    if plan_batch < 1:
        raise UsageError(f"--plan-batch must be at least 1, received {plan_batch}")
    if out.exists() and not force:
        raise UsageError(f"output directory {str(out)!r} already exists; pass --force to replace it, or choose another --out")
    graph = build_graph(model)
    _warn_foreign_classes(graph, imports)
    known = set(graph.input_names)
    for key in input_shapes or {}:
        if key not in known:
            raise UsageError(f"--input-shape names {key!r}, but the model's inputs are {sorted(known)}")
    for tid in graph.inputs:
        t = graph.tensors[tid]
        if t.dtype not in DTYPES:
            raise PartitionError(f"model input {t.name!r} has dtype {t.dtype}; the pipeline carries {sorted(DTYPES)}")
    for tid in graph.outputs:
        t = graph.tensors[tid]
        if t.dtype not in DTYPES:
            raise PartitionError(f"model output {t.name!r} has dtype {t.dtype}; the pipeline carries {sorted(DTYPES)}")
    shapes = cost.concrete_shapes(graph, input_shapes)
    costs = cost.op_costs(graph, shapes)
    seconds = [c.seconds(plan_batch) for c in costs]
    tbytes = [cost.tensor_bytes(graph, shapes, t.id) if t.id in shapes else 0 for t in graph.tensors]
    cross = planner.crossings(graph, tbytes)
    grouped = bool(colocate or (colocate is None and cluster is not None))  # with a cluster file: one process per host by default
    cpus = len(os.sched_getaffinity(0))
    measured = None
    if measure and cuts:
        raise UsageError("--measure corrects the costs the planner balances; with --cut the cuts are given, so there is nothing to balance")
    if measure:
        from pipeline.partition import measure as measuring

        conditions = measuring.default_conditions(plan_batch=plan_batch, shards=shards, colocate=grouped, cpus=cpus)
        measured = measuring.measure(
            model, seconds, cross.allowed, conditions, input_shapes=input_shapes, unsafe=unsafe, imports=imports
        )
        seconds = list(measured.seconds)
    placed = None
    if cuts:
        boundaries = planner.boundaries_for_cuts(graph, cuts, cross)
    elif cluster is None:
        boundaries = planner.plan_balanced(seconds, cross, shards or 1, slack)
    if cluster is not None:
        from pipeline.partition import placement

        problem = placement.problem_from_graph(graph, seconds, tbytes, cross)
        if cuts:  # the cuts are given: choose the hosts only
            allowed = [False] * (len(graph.ops) + 1)
            for b in boundaries:
                allowed[b] = True
            problem = dataclasses.replace(problem, allowed=tuple(allowed), fixed=True)
        placed = placement.plan(problem, cluster, objective=objective, shards=None if cuts else shards, slack=slack)
        boundaries = placed.boundaries
    plans = split(graph, boundaries)

    endpoints = list(range(2 * len(plans) + 2)) if cluster is not None else _allocate(host, base_port, 2 * len(plans) + 2)
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=parent))
    warning = None
    try:
        model.save(tmp / MODEL_FILE)  # before the shards re-call its layers
        shard_specs = []
        tensors: dict[str, TensorSpec] = {}
        for i, plan in enumerate(plans):
            sub = build_shard_model(graph, plan)
            file = f"{plan.name}.keras"
            sub.save(tmp / file)
            for tid in plan.inputs + plan.outputs:
                t = graph.tensors[tid]
                tensors[t.name] = _spec(t, graph.tensors[t.mask_of].name if t.mask_of is not None else "")
            port, metrics_port = endpoints[2 + 2 * i], endpoints[3 + 2 * i]
            endpoint = f"tcp://{host}:{port}"
            shard_specs.append(
                ShardSpec(
                    name=plan.name,
                    file=file,
                    inputs=tuple(graph.tensors[t].name for t in plan.inputs),
                    outputs=tuple(
                        ShardOutput(name=graph.tensors[t].name, consumers=tuple(plan.consumers[t])) for t in plan.outputs
                    ),
                    endpoint=endpoint,
                    host=host,
                    bind=bind_address(endpoint),
                    metrics=f"{host}:{metrics_port}",
                    batching=batching,
                )
            )
        results = f"tcp://{host}:{endpoints[0]}"
        rows = plan_rows(graph, plans, costs, tbytes, seconds)
        topology = Topology(
            name=name,
            inputs=tuple(_spec(graph.tensors[t]) for t in graph.inputs),
            outputs=tuple(_spec(graph.tensors[t]) for t in graph.outputs),
            tensors=tensors,
            shards=tuple(shard_specs),
            ingress=IngressSpec(
                grpc=grpc_address or DEFAULT_GRPC_ADDRESS,
                results=results,
                host=host,
                bind=bind_address(results),
                metrics=f"{host}:{endpoints[1]}",
            ),
            directory=tmp,
            imports=tuple(imports),
            extra={
                "sample_input_shapes": {graph.tensors[t].name: list(shapes[t]) for t in graph.inputs},
                "unsafe": bool(unsafe),
                "weights": weights_of(model),
                "plan": {
                    "method": "cuts" if cuts else ("placed" if cluster is not None else "balanced"),
                    "cost_model": "estimated FLOPs and bytes (pipeline/partition/cost.py)"
                    + (", corrected by times measured on this host (pipeline/partition/measure.py)" if measured else ""),
                    "batch": plan_batch,
                    "operations": len(graph.ops),
                    "shards": rows,
                    **({"measured": measured.record([op.name for op in graph.ops])} if measured else {}),
                },
            },
        )
        from pipeline.partition import replica_placement

        requests = replica_placement.as_requests(replicas)
        for shard in requests:
            topology.shard(shard)  # a clear error naming the shards there are
        if cluster is not None and placed is not None:
            from pipeline.partition import placement

            replica_hosts, proposed = replica_placement.plan_replicas(
                topology, cluster, placed.hosts, requests, propose_idle=propose_replicas
            )
            topology = placement.assign_hosts(
                topology, cluster, placed.hosts, base_port=base_port, grpc_address=grpc_address, replica_hosts=replica_hosts
            )
            topology = replica_placement.note_proposed(placement.record_placement(topology, placed, cluster), proposed)
        elif requests:  # new replicas get free ports on their shard's host (pipeline.replicas)
            from pipeline import replicas as replicas_module

            topology = replicas_module.with_replicas(topology, {s: r.count for s, r in requests.items()})
        if grouped:
            from pipeline import colocation
            from pipeline.cluster import worker_process_namer

            # a replicated shard stays in processes of its own (one per replica)
            topology = colocation.colocate(
                topology, name=worker_process_namer(cluster) if cluster is not None else None, ingress=with_ingress
            )
        if any(s.extra_replicas for s in topology.shards):
            from pipeline import replicas as replicas_module

            replicas_module.validate(topology, str(out / "topology.yaml"))
        topology.write(tmp)
        if verify:
            from pipeline.partition.verify import verify_directory

            # the project's own models (keras.applications, calibrated) must answer differently per input;
            # a user's model may not (untrained, or built that way): then the split is still checked, with a warning
            report = verify_directory(
                tmp, batch_sizes=(1, 2, 3), tolerance=0.0, unsafe=unsafe, allow_input_independent=weights_of(model)["source"] == "file"
            )
            warning = report.warning
            if not report.ok:
                raise PartitionError(
                    "the shards chained do not reproduce the whole model:\n" + report.table() + "\nThis is a bug; please report it with the model."
                )
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    topology = topology.replace(directory=out)
    table = plan_table(rows, name=name, operations=len(graph.ops), batch=plan_batch)
    if measured is not None:
        table = measured.table([op.name for op in graph.ops]) + "\n\n" + table
        if cluster is None and len(plans) > cpus:
            table += (
                f"\nnote: {len(plans)} shards on {cpus} CPUs: at most {cpus} run at once whatever the cuts, so the measured "
                "balance matters less than the bytes between shards (docs/BENCHMARKS.md, 'Planning on times measured on this host')"
            )
    if cluster is not None and placed is not None:
        from pipeline.partition.placement import placement_table

        table += "\n\n" + placement_table(
            placed.estimate,
            shard_names=[p.name for p in plans],
            hosts=placed.hosts,
            cluster=cluster,
            objective=objective,
            first_last=[(graph.ops[p.ops[0]].name, graph.ops[p.ops[-1]].name) for p in plans],
        )
        from pipeline.partition.replica_placement import replica_table

        replicas_text = replica_table(topology, cluster)
        table += "\n\n" + replicas_text if replicas_text else ""
    return PartitionResult(topology=topology, table=table, seconds=time.perf_counter() - start, warning=warning)


def _warn_foreign_classes(graph: Any, imports: tuple[str, ...]) -> None:
    """Say which layer classes come from a module no process will import (it would fail to load there)."""
    from pipeline.custom_objects import DOCS, foreign_classes

    foreign = foreign_classes([op.class_name for op in graph.ops], imports)
    if foreign:
        log.warning(
            "custom_layers_not_imported",
            classes=foreign,
            detail="the workers, verify and record load the shards in other processes: pass --import MODULE for the "
            f"module that registers these classes (importable on every host, see {DOCS})",
        )


def _spec(t: Any, mask_of: str = "") -> TensorSpec:
    return TensorSpec(name=t.name, dtype=t.dtype, shape=tuple(-1 if d is None else d for d in t.shape), mask_of=mask_of)


def partition_source(
    source: str | Path,
    out: Path,
    *,
    cluster: Cluster | str | Path | None = None,
    shards: int | None = None,
    objective: str = "throughput",
    unsafe: bool = False,
    **options: Any,
) -> PartitionResult:
    """``pipeline partition SOURCE [--cluster FILE]`` as a function: load ``source`` (a ``.keras`` file or a
    ``keras.applications`` name) and :func:`partition` it, placed on ``cluster`` (a :class:`Cluster` or a
    cluster file) when given. ``options`` are :func:`partition`'s other keyword arguments."""
    from pipeline.cluster import load_cluster
    from pipeline.partition.source import load_source

    if cluster is not None and not isinstance(cluster, Cluster):
        cluster = load_cluster(cluster)
    if cluster is None and shards is None and not options.get("cuts"):
        raise UsageError("expected shards, cuts or a cluster; received none of them")
    model, default_name = load_source(str(source), unsafe=unsafe)
    name = options.pop("name", None) or default_name
    return partition(model, name=name, out=out, shards=shards, cluster=cluster, objective=objective, unsafe=unsafe, **options)


def _allocate(host: str, base_port: int | None, count: int) -> list[int]:
    """``count`` ports: consecutive from ``base_port``, or free ones on ``host`` (on loopback when ``host``
    is another machine's address: the ports are only a starting point for a multi-host topology)."""
    from pipeline.launch import free_ports

    if base_port is not None:
        if not 0 < base_port <= 65535 - count:
            raise UsageError(f"--base-port {base_port}: expected a port between 1 and {65535 - count}")
        return list(range(base_port, base_port + count))
    return free_ports(count, host if _can_bind(host) else "127.0.0.1")


def _can_bind(host: str) -> bool:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
        return True
    except OSError:
        return False

