"""``pipeline colocate DIR``: regroup an existing topology's shards into processes, without re-cutting.

``pipeline colocate DIR`` puts all shards of each host in one process (as
``pipeline partition --colocate`` does); ``--with-ingress`` puts the ingress
into the process on its host too; ``--per-shard`` goes back to one process per
shard (and the ingress to one of its own); ``--threads N`` records the
intra-op pool of each process.
Endpoints, keys and shard files are left as they are. Restart the pipeline
afterwards, with the Procfile written anew (``pipeline procfile DIR``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import colocation
from pipeline import topology as topo
from pipeline.errors import UsageError


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, metavar="DIR", help="a topology directory")
    p.add_argument("--per-shard", action="store_true", help="one process per shard (undo the grouping)")
    p.add_argument(
        "--with-ingress",
        action="store_true",
        help="the process on the ingress's host serves the ingress too (its links to those shards inproc://)",
    )
    p.add_argument("--threads", type=int, default=0, metavar="N", help="TensorFlow intra-op threads of each process (default: its CPUs divided among its shards, at least one)")


def run(args: argparse.Namespace) -> int:
    if args.threads < 0:
        raise UsageError(f"--threads must be >= 1 (or absent), received {args.threads}")
    if args.per_shard and args.with_ingress:
        raise UsageError("--with-ingress puts the ingress into the shards' process; --per-shard has none: pass one or the other")
    t = topo.load(args.directory, check_files=False)
    t = colocation.per_shard(t) if args.per_shard else colocation.colocate(t, threads=args.threads, ingress=args.with_ingress)
    t.write()
    for name, shards in colocation.describe(t).items():
        print(f"{name}: {', '.join(shards)}")
    return 0
