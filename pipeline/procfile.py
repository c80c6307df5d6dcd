"""``pipeline procfile``: the Procfile lines that start a topology under honcho (or foreman).

One line for the ingress and one per worker process (a shard alone, or the
shards that the topology's ``processes`` section groups: ``pipeline worker
DIR --process NAME``); with ``--host H``, only the
processes that the topology places on host H, so the same topology file
starts the right processes on each machine. Each line ``exec``s the command,
so the process honcho signals is the pipeline process itself (not a shell
around it): SIGTERM reaches it directly and its own exit status is reported.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from pipeline import colocation
from pipeline import replicas
from pipeline import topology as topo
from pipeline.errors import UsageError
from pipeline.topology import INGRESS, Topology


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, metavar="DIR", help="a topology directory")
    p.add_argument("--host", default=None, help="only the processes placed on this host (its name in the cluster file, or its address)")
    p.add_argument("--out", type=Path, default=None, help="write to this file instead of printing")
    p.add_argument("--invoke", default="pipeline", help="how to invoke the pipeline command (default: pipeline)")


def lines(topology: Topology, directory: str, host: str | None = None, command: str = "pipeline") -> list[str]:
    """The Procfile lines of every process, or of those on ``host`` (a cluster host's name or an address)."""
    from pipeline.cluster import resolve_host

    names = replicas.processes_on(topology, None if host is None else resolve_host(topology, host))
    if not names:
        from pipeline.cluster import host_names

        placed = host_names(topology)
        hosts = sorted(set(placed.values()))
        raise UsageError(
            f"no process of topology {topology.name!r} is placed on host {host!r} (the planner left it out, or the "
            f"topology was placed elsewhere); the hosts with processes are {hosts}"
        )
    d = shlex.quote(directory)
    out = []
    for name in names:
        selector = replicas.worker_selector(topology, name)
        if selector is not None:
            out.append(f"{name.replace(replicas.SEPARATOR, '_r')}: exec {command} worker {d} {shlex.join(selector)}")
        elif name == INGRESS:
            out.append(f"{INGRESS}: exec {command} ingress {d}")
        else:
            out.append(f"{name}: exec {command} worker {d} {shlex.join(colocation.worker_selector(topology, name))}")
    return out


def run(args: argparse.Namespace) -> int:
    topology = topo.load(args.directory, check_files=False)
    text = "\n".join(lines(topology, str(args.directory), args.host, args.invoke)) + "\n"
    if args.out:
        args.out.write_text(text)
    else:
        print(text, end="")
    return 0
