"""``pipeline place DIR --cluster FILE``: put an existing topology's shards on a cluster's hosts, without re-cutting.

The shards (and their files) stay as they are, for example a topology cut by
hand with ``--cut``; the planner chooses the host of each shard
(:func:`pipeline.partition.placement.place_topology`, exact over the fixed
shards), and every process's endpoint, bind and metrics address and the
ingress's gRPC address are rewritten for those hosts. ``--replicas`` sets the
replicas of shards (a count, or the hosts of the added replicas), placed by
:mod:`pipeline.partition.replica_placement`; replicas the topology already
has are placed again too. ``topology.yaml`` is
replaced atomically; nothing else in the directory changes.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import topology as topo
from pipeline.partition.planner import DEFAULT_SLACK


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, metavar="DIR", help="a topology directory")
    p.add_argument("--cluster", type=Path, required=True, metavar="FILE", help="the cluster file (hosts, ingress host, links)")
    p.add_argument(
        "--objective",
        choices=["throughput", "latency"],
        default="throughput",
        help="the slowest stage first, then latency (throughput), or the latency first",
    )
    p.add_argument("--slack", type=float, default=DEFAULT_SLACK, help="throughput the planner may trade for a lower latency")
    p.add_argument("--base-port", type=int, default=None, help="first port on every host (default 5550)")
    p.add_argument("--grpc-address", default=None, help="ingress gRPC address (default: the ingress host's address, port 8001)")
    p.add_argument(
        "--replicas",
        action="append",
        default=[],
        metavar="SHARD=N|SHARD=HOST,...",
        help="serve SHARD with N replicas in all, their hosts chosen by the planner, or with one more replica on "
        "each HOST named (repeatable; see docs/REPLICAS.md)",
    )
    p.add_argument(
        "--propose-replicas",
        action="store_true",
        help="let the planner add replicas of the slowest shards on hosts it would leave idle, when its cost model "
        "says each lowers the slowest stage by at least 10%% (off by default)",
    )
    p.add_argument("--dry-run", action="store_true", help="print the placement without writing topology.yaml")
    p.add_argument(
        "--per-shard",
        action="store_true",
        help="one process per shard (default: the shards placed on one host share one process, threads joined by inproc://)",
    )


def run(args: argparse.Namespace) -> int:
    from pipeline.cluster import load_cluster
    from pipeline.partition import replica_placement
    from pipeline.partition.placement import estimate_topology, place_topology
    from pipeline.partition.show import placement_text

    cluster = load_cluster(args.cluster)
    topology = topo.load(args.directory, check_files=True)
    requests = replica_placement.parse(args.replicas, topology, cluster)
    placed = place_topology(
        topology,
        cluster,
        args.objective,
        slack=args.slack,
        base_port=args.base_port,
        grpc_address=args.grpc_address,
        replicas=requests,
        propose_replicas=args.propose_replicas,
    )
    from pipeline import colocation

    # the old grouping may join shards that now sit on different hosts: group them again, by host
    from pipeline.cluster import worker_process_namer

    placed = colocation.per_shard(placed)
    if not args.per_shard:
        # an ingress that served from the shards' process keeps doing so if shards still sit on its host
        keep = colocation.ingress_process(topology) is not None and colocation.ingress_can_join(placed)
        placed = colocation.colocate(placed, name=worker_process_namer(cluster), ingress=keep)
    topo.validate(placed, check_files=True)
    _, hosts = estimate_topology(placed, cluster)
    print(placement_text(placed).lstrip("\n"))
    if args.dry_run:
        print(f"\n(dry run: {args.directory / topo.TOPOLOGY_FILE} unchanged)")
        return 0
    placed.write(args.directory)
    print(f"\nplaced {placed.name!r} on {len(set(hosts))} of {len(cluster.hosts)} hosts; wrote {args.directory / topo.TOPOLOGY_FILE}")
    return 0
