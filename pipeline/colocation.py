"""Shards that share a process: the ``processes:`` section of ``topology.yaml`` and the links it implies.

A topology says which shards run in one worker process::

    processes:                 # absent, or "per-shard": one process per shard (the default)
    - name: workers            # the Procfile line, the `pipeline worker DIR --process NAME`
      shards: [shard0, shard1, shard2, shard3]
      threads: 2               # optional: the process's TensorFlow intra-op pool, shared by its shards
                               # (default: its CPUs divided among its shards, at least one)
      ingress: true            # optional: this process serves the ingress too (on the ingress's host)

Every shard is in exactly one process; a shard left out of a ``processes``
list runs alone in a process named after it, so a hand-written list need only
name the groups. The shards of one process must sit on one host.

Inside a process each shard keeps its own network loop, batching, join buffer
and sockets (:mod:`pipeline.serving.group`). A link between two shards of one
process goes over ``inproc://shard/<consumer>`` (same wire format, no TCP
stack, no encryption: it never leaves the process); every other link stays on
the consumer's ``endpoint``. A shard binds its TCP endpoint only when a
producer outside its process (the ingress, or a shard elsewhere) feeds it,
and its ``inproc`` endpoint only when a producer inside does; a shard fed
from both sides binds both.

With ``ingress: true`` the process also serves the ingress (gRPC server and
all) on a thread of its own, and the ingress has no process of its own. Its
links to the shards of that process are ``inproc://`` too: requests go to
``inproc://shard/<entry shard>``, results and heartbeats come back over
``inproc://shard/ingress``; shards in other processes still reach the
ingress's TCP ``results`` endpoint.

This module is pure logic: no sockets, no processes.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from pipeline import topology as topo
from pipeline.errors import TopologyError, UsageError

#: prefix of the inproc endpoint a shard binds for producers in its own process.
INPROC_PREFIX = "inproc://shard/"
#: name of the one process when every shard of a topology sits on one host.
DEFAULT_GROUP = "workers"
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class Binds:
    """Where one shard's PULL sockets bind: ``tcp`` for producers in other processes, ``inproc`` for its own."""

    tcp: str | None
    inproc: str | None


def groups(t: topo.Topology) -> tuple[topo.ProcessSpec, ...]:
    """Every worker process of the topology in shard order: the ``processes`` listed, plus one per shard not listed."""
    listed = {s: p for p in t.processes for s in p.shards}
    out: list[topo.ProcessSpec] = []
    seen: set[str] = set()
    for shard in t.shards:
        p = listed.get(shard.name) or topo.ProcessSpec(name=shard.name, shards=(shard.name,))
        if p.name not in seen:
            seen.add(p.name)
            out.append(p)
    return tuple(out)


def is_grouped(t: topo.Topology) -> bool:
    """True when some process serves more than one shard."""
    return any(len(p.shards) > 1 for p in t.processes)


def process_of(t: topo.Topology, shard: str) -> topo.ProcessSpec:
    """The process that serves ``shard``."""
    t.shard(shard)  # a clear error for an unknown shard
    return next(p for p in groups(t) if shard in p.shards)


def group(t: topo.Topology, name: str) -> topo.ProcessSpec:
    """The worker process called ``name``; :class:`UsageError` naming the processes there are."""
    for p in groups(t):
        if p.name == name:
            return p
    raise UsageError(f"no worker process named {name!r} in topology {t.name!r}; its processes are {[p.name for p in groups(t)]}")


def ingress_process(t: topo.Topology) -> topo.ProcessSpec | None:
    """The worker process that serves the ingress too (``ingress: true``), or ``None`` when the ingress runs alone."""
    return next((p for p in t.processes if p.ingress), None)


def worker_selector(t: topo.Topology, name: str) -> list[str]:
    """How ``pipeline worker`` picks worker process ``name``: ``--shard NAME`` for a shard alone in its process,
    ``--process NAME`` for a group of shards or a process that serves the ingress too."""
    spec = group(t, name)  # a clear error for an unknown process
    return ["--shard", name] if spec.shards == (name,) and not spec.ingress else ["--process", name]


def process_names_on(t: topo.Topology, host: str | None) -> list[str]:
    """Process names placed on ``host`` (all for ``None``): the ingress first (unless a worker process serves it),
    then the worker processes."""
    alone = ingress_process(t) is None
    names = [topo.INGRESS] if alone and (host is None or t.ingress.host == host) else []
    for p in groups(t):
        if host is None or t.shard(p.shards[0]).host == host:
            names.append(p.name)
    return names


def same_process(t: topo.Topology, a: str, b: str) -> bool:
    """True when ``a`` and ``b`` (shard names or ``ingress``) run in one worker process."""
    if topo.INGRESS in (a, b):
        other = b if a == topo.INGRESS else a
        host = ingress_process(t)
        return other != topo.INGRESS and host is not None and other in host.shards
    return process_of(t, a).name == process_of(t, b).name


def inproc_endpoint(shard: str) -> str:
    return INPROC_PREFIX + shard


def link_endpoint(t: topo.Topology, sender: str, consumer: str) -> str:
    """Where ``sender`` connects to reach ``consumer``: inproc inside one process, the consumer's endpoint otherwise."""
    if same_process(t, sender, consumer):
        return inproc_endpoint(consumer)
    return t.endpoint_of(consumer)


def binds(t: topo.Topology, shard: str, tcp_bind: str | None = None) -> Binds:
    """Which PULL endpoints ``shard`` binds (``tcp_bind`` overrides the topology's ``bind``)."""
    producers = t.producers(shard)
    local = any(same_process(t, p, shard) for p in producers)
    remote = any(not same_process(t, p, shard) for p in producers)
    return Binds(tcp=(tcp_bind or t.shard(shard).bind) if remote else None, inproc=inproc_endpoint(shard) if local else None)


def ingress_binds(t: topo.Topology, tcp_bind: str) -> Binds:
    """Which PULL endpoints the ingress binds for results and heartbeats: ``tcp_bind`` when a shard runs in another
    process (every shard sends the ingress its heartbeats), ``inproc://shard/ingress`` when one runs in its own."""
    local = any(same_process(t, topo.INGRESS, s.name) for s in t.shards)
    remote = any(not same_process(t, topo.INGRESS, s.name) for s in t.shards)
    return Binds(tcp=tcp_bind if remote else None, inproc=inproc_endpoint(topo.INGRESS) if local else None)


def is_inproc(endpoint: str) -> bool:
    return endpoint.startswith("inproc://")


# ------------------------------------------------------------------ making groups
def by_host(t: topo.Topology, name: Callable[[str, int], str] | None = None) -> tuple[topo.ProcessSpec, ...]:
    """One process per host holding every shard placed there, in shard order (a shard with replicas runs alone).

    ``name(host, hosts)`` names the process of a host (default: ``workers`` when
    there is one host, ``workers-<host>`` otherwise); the cluster planner can pass
    its host names here.
    """
    hosts: dict[str, list[str]] = {}
    for s in t.shards:
        if not s.extra_replicas:  # a replicated shard runs in processes of its own, one per replica
            hosts.setdefault(s.host, []).append(s.name)

    def default(host: str, count: int) -> str:
        return DEFAULT_GROUP if count == 1 else f"{DEFAULT_GROUP}-{re.sub(r'[^A-Za-z0-9_.-]', '_', host)}"

    namer = name or default
    return tuple(topo.ProcessSpec(name=namer(h, len(hosts)), shards=tuple(names)) for h, names in hosts.items())


def colocate(
    t: topo.Topology, *, threads: int = 0, name: Callable[[str, int], str] | None = None, ingress: bool = False
) -> topo.Topology:
    """The topology with all shards of a host in one process (``threads``: each process's intra-op pool, 0 default);
    with ``ingress``, the process on the ingress's host serves the ingress too."""
    specs = tuple(topo.ProcessSpec(p.name, p.shards, threads) for p in by_host(t, name))
    if ingress:
        if not ingress_can_join(t):
            hosts = sorted({t.shard(p.shards[0]).host for p in by_host(t)})
            alone = [s.name for s in t.shards if s.extra_replicas]
            raise UsageError(
                f"the ingress cannot join a worker process: no shard of {t.name!r} runs on the ingress's host "
                f"{t.ingress.host!r} (its shards run on {hosts})"
                + (f"; {alone} have replicas, each in a process of its own" if alone else "")
            )
        here = next(p for p in specs if t.shard(p.shards[0]).host == t.ingress.host)
        specs = tuple(topo.ProcessSpec(p.name, p.shards, p.threads, ingress=p is here) for p in specs)
    out = t.replace(processes=specs)
    validate(out)
    return out


def ingress_can_join(t: topo.Topology) -> bool:
    """True when :func:`colocate` can put the ingress into a process: a shard without replicas sits on its host."""
    return any(t.shard(p.shards[0]).host == t.ingress.host for p in by_host(t))


def per_shard(t: topo.Topology) -> topo.Topology:
    """The topology with one process per shard (today's default)."""
    return t.replace(processes=())


# ------------------------------------------------------------------ validation
def validate(t: topo.Topology, where: str = topo.TOPOLOGY_FILE) -> None:
    """Check the ``processes`` section; raise :class:`TopologyError` naming the process and the shard."""
    shard_names = [s.name for s in t.shards]
    owner: dict[str, str] = {}
    names: set[str] = set()
    for p in t.processes:
        pwhere = f"{where}: process {p.name!r}"
        if not _NAME.match(p.name):
            raise TopologyError(f"{pwhere}: a process name may hold only letters, digits, '_', '.' and '-'")
        if p.name == topo.INGRESS:
            raise TopologyError(f"{pwhere}: {topo.INGRESS!r} is reserved for the ingress and cannot name a worker process")
        if p.name in names:
            raise TopologyError(f"{pwhere}: process names must be unique; {p.name!r} appears more than once")
        names.add(p.name)
        if not p.shards:
            raise TopologyError(f"{pwhere}: expected at least one shard, received none")
        for s in p.shards:
            if s not in shard_names:
                raise TopologyError(f"{pwhere}: names shard {s!r}, which is not in the topology; its shards are {shard_names}")
            if s in owner:
                raise TopologyError(f"{pwhere}: shard {s!r} is already in process {owner[s]!r}; a shard runs in exactly one process")
            owner[s] = p.name
        hosts = {s: t.shard(s).host for s in p.shards}
        if len(set(hosts.values())) > 1:
            raise TopologyError(f"{pwhere}: its shards must sit on one host, received {hosts}")
        if p.ingress and p.shards and hosts[p.shards[0]] != t.ingress.host:
            raise TopologyError(
                f"{pwhere}: has ingress: true, so its shards must sit on the ingress's host {t.ingress.host!r}; "
                f"they sit on {hosts[p.shards[0]]!r}"
            )
    serving = [p.name for p in t.processes if p.ingress]
    if len(serving) > 1:
        raise TopologyError(f"{where}: one process at most may serve the ingress (ingress: true), received {serving}")
    for p in t.processes:
        if p.name in shard_names and owner.get(p.name) != p.name:
            where_it_runs = f"process {owner[p.name]!r}" if p.name in owner else "a process of its own (it is not listed)"
            raise TopologyError(
                f"{where}: process {p.name!r} has the name of shard {p.name!r}, which runs in {where_it_runs}; "
                "a process may take a shard's name only when it serves that shard"
            )


def default_intra_threads(shards: int, cpus: int) -> int:
    """The intra-op pool of a process serving ``shards`` shards on ``cpus`` CPUs: the CPUs divided among the
    shards, at least one thread.

    Each shard's graph already runs on an inter-op thread of its own, so the shards fill the cores by running
    at once; a larger pool only splits every kernel across threads. Measured with MobileNetV3Large in two
    co-located shards on 2 CPUs (docs/BENCHMARKS.md): with one intra-op thread the two shards did 2.36 shards'
    worth of work at once (117 and 100 calls/s at batch 1) against 1.43 (68 and 48 calls/s) with two, and the
    served pipeline answered one request at a time faster (p50 33.9 ms against 38.3 ms, interleaved rounds)
    and 1.14x the requests at concurrency 16.
    """
    return max(1, cpus // max(1, shards))


def worker_threads(t: topo.Topology) -> int:
    """The intra-op threads the workers' processes run with by default: 0 for one process per shard (the worker's
    own default), else the largest pool of a grouped process (``threads``, or :func:`default_intra_threads`). A
    reference computed with this count matches the co-located shards bitwise, one request at a time."""
    import os

    cpus = len(os.sched_getaffinity(0))
    pools = [p.threads or default_intra_threads(len(p.shards), cpus) for p in t.processes if len(p.shards) > 1]
    return max(pools, default=0)


def describe(t: topo.Topology) -> Mapping[str, tuple[str, ...]]:
    """Process name -> what it serves, ``ingress`` first where a worker process serves it (for ``pipeline show``
    and logs)."""
    return {p.name: ((topo.INGRESS,) if p.ingress else ()) + p.shards for p in groups(t)}
