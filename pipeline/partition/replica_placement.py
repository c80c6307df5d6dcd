"""Where the replicas of a shard go on a cluster (issue 16): ``--replicas shard2=2`` or ``shard2=h2,h3``.

``partition --cluster FILE --replicas S=...``, ``place DIR --cluster FILE --replicas S=...`` and
``pipeline replicas DIR S=...`` on a placed topology take either form:

- ``S=N``: ``N`` replicas in all; the planner puts each added one on the host that keeps the pipeline's
  slowest stage smallest by its cost model (below), preferring a host that does not hold a replica of
  ``S`` yet, then the least loaded host, then the cluster file's order;
- ``S=HOST[,HOST...]``: one replica more than the shard's own on each host named (a name or an address of
  the cluster file; a host may be named twice), so ``shard2=h2,h3`` serves ``shard2`` with three replicas:
  where the planner puts the shard, on ``h2`` and on ``h3``.

The cost model is the planner's (:mod:`pipeline.partition.placement`) with each shard's work spread evenly
over its replicas (the ingress spreads requests over replicas by their ids): a host's compute stage is the
estimate of every replica on it, each ``shard seconds / replicas``, divided by the host's speed; a link's
stage is the bytes per sample it carries, a tensor's bytes weighted by the share of requests whose producer
and consumer replicas sit on its two ends, over its bandwidth. The shards' own hosts and cuts are the
planner's exact choice; the replicas' hosts are chosen greedily, one replica at a time, the shard with the
most work per replica first (exact search would multiply the planner's state by every replica's host).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pipeline import topology as topo
from pipeline.cluster import Cluster
from pipeline.errors import ClusterError, UsageError

_COUNT = re.compile(r"^\s*[+-]?\d+\s*$")


@dataclass(frozen=True)
class ReplicaRequest:
    """How many replicas ``shard`` has in all, and the hosts of replicas 1.. when they were named."""

    shard: str
    count: int
    hosts: tuple[str, ...] = ()


def parse(items: Iterable[str], t: topo.Topology | None = None, cluster: Cluster | None = None) -> dict[str, ReplicaRequest]:
    """``["shard2=3", "shard1=h2,h3"]`` -> requests by shard; :class:`UsageError` naming the item and the shard.

    Host names need ``cluster`` (a name or an address of one of its hosts); ``t`` checks the shard names."""
    from pipeline import replicas

    out: dict[str, ReplicaRequest] = {}
    given: dict[str, str] = {}
    for item in items:
        name, sep, raw = str(item).partition("=")
        if not sep or not name or not raw.strip() or _COUNT.match(raw):
            n = replicas.parse_counts([item])[name]  # the errors of `pipeline replicas`
            request = ReplicaRequest(name, n)
        else:
            hosts = [h.strip() for h in raw.split(",")]
            if any(not h for h in hosts):
                raise UsageError(
                    f"replicas {item!r}: shard {name!r}: expected SHARD=N or SHARD=HOST[,HOST...], received an empty host name"
                )
            if cluster is None:
                raise UsageError(
                    f"replicas {item!r}: shard {name!r}: naming hosts ({hosts}) needs a cluster (--cluster FILE, or a "
                    "topology placed on one); without one write SHARD=N"
                )
            names = []
            for h in hosts:
                try:
                    names.append(cluster.host(h).name)
                except ClusterError:
                    raise UsageError(
                        f"replicas {item!r}: shard {name!r}: unknown host {h!r}; the hosts are {cluster.names} "
                        f"(addresses {[x.address for x in cluster.hosts]})"
                    ) from None
            request = ReplicaRequest(name, 1 + len(names), tuple(names))
        if name in given:
            raise UsageError(f"replicas: shard {name!r} is given twice ({given[name]!r}, {item!r}); expected one SHARD=... per shard")
        given[name] = str(item)
        if t is not None:
            t.shard(name)  # a clear error naming the shards there are
        out[name] = request
    return out


def as_requests(
    values: Mapping[str, int | ReplicaRequest] | None,
) -> dict[str, ReplicaRequest]:
    """Requests from ``{shard: count}`` or requests (the Python API takes either)."""
    out = {}
    for shard, v in (values or {}).items():
        out[shard] = v if isinstance(v, ReplicaRequest) else ReplicaRequest(shard, int(v))
        if out[shard].count < 1:
            raise UsageError(f"shard {shard!r} needs at least 1 replica, received {out[shard].count}")
    return out


# ------------------------------------------------------------------ cost model
@dataclass(frozen=True)
class ReplicaEstimate:
    """Stages per sample with replicas: each host's compute and each link's transfer (seconds)."""

    compute: dict[str, float]
    links: dict[tuple[str, str], float]

    @property
    def bottleneck(self) -> tuple[str, float]:
        """The slowest stage's name (``compute HOST`` or ``link A->B``) and its seconds per sample."""
        stages = [(f"compute {h}", s) for h, s in self.compute.items()]
        stages += [(f"link {a}->{b}", s) for (a, b), s in self.links.items()]
        return max(stages, key=lambda x: x[1])


def estimate(problem: Any, cluster: Cluster, hosts: Sequence[Sequence[str]]) -> ReplicaEstimate:
    """The cost model of the module's docstring; ``hosts[i]``: host names of shard ``i``'s replicas, replica 0 first."""
    compute = {h: 0.0 for h in cluster.names}
    share: list[dict[str, float]] = []
    for i, seconds in enumerate(problem.seconds):
        frac: dict[str, float] = {}
        for h in hosts[i]:
            frac[h] = frac.get(h, 0.0) + 1.0 / len(hosts[i])
            compute[h] += seconds / len(hosts[i]) / cluster.host(h).speed
        share.append(frac)
    ingress = {cluster.ingress: 1.0}
    moved: dict[tuple[str, str], float] = {}
    for f in problem.flows:
        src = ingress if f.producer is None else share[f.producer]
        dst: dict[str, float] = {}
        for c in f.consumers:
            for h, x in share[c].items():
                dst[h] = dst.get(h, 0.0) + x
        if f.to_ingress:
            dst[cluster.ingress] = dst.get(cluster.ingress, 0.0) + 1.0
        for a, pa in src.items():
            for b, pb in dst.items():
                if a != b:  # a tensor reaches a host once, whatever number of its shards consume it
                    moved[(a, b)] = moved.get((a, b), 0.0) + f.nbytes * pa * min(1.0, pb)
    links = {(a, b): nbytes / cluster.link(a, b).bytes_per_s for (a, b), nbytes in moved.items()}
    return ReplicaEstimate(compute={h: s for h, s in compute.items() if s > 0}, links=links)


def choose_hosts(
    problem: Any,
    cluster: Cluster,
    shard_hosts: Sequence[str],
    requests: Mapping[str, ReplicaRequest],
    existing: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, tuple[str, ...]]:
    """Host names of replicas 1.. of every shard (none for one replica; the shard's own host is ``shard_hosts[i]``).

    ``existing``: hosts of replicas a shard already has (kept, the first ones, when its count allows); a request
    naming hosts takes exactly those; the others are chosen as the module's docstring says."""
    names = list(problem.names)
    index = {n: i for i, n in enumerate(names)}
    for shard in requests:
        if shard not in index:
            raise UsageError(f"replicas: no shard named {shard!r}; the shards are {names}")
    current = [[cluster.host(h).name] for h in shard_hosts]
    for shard, hs in (existing or {}).items():
        current[index[shard]] += [cluster.host(h).name for h in hs]
    wanted = {i: len(hs) for i, hs in enumerate(current)}
    for shard, r in requests.items():
        i = index[shard]
        if r.hosts:
            current[i] = [current[i][0], *r.hosts]
        else:
            current[i] = current[i][: r.count]
        wanted[i] = r.count
    order = cluster.names
    while True:
        short = [i for i in range(len(current)) if len(current[i]) < wanted[i]]
        if not short:
            break
        i = max(short, key=lambda j: (problem.seconds[j] / len(current[j]), -j))
        best: tuple[Any, ...] | None = None
        for h in order:
            trial = [list(x) for x in current]
            trial[i].append(h)
            est = estimate(problem, cluster, trial)
            key = (
                round(est.bottleneck[1], 12),
                h in current[i],
                round(est.compute.get(h, 0.0), 12),
                order.index(h),
            )
            if best is None or key < best[0]:
                best = (key, h)
        assert best is not None
        current[i].append(best[1])
    return {names[i]: tuple(hs[1:]) for i, hs in enumerate(current)}


#: a replica the planner proposes (``--propose-replicas``) must lower the estimated slowest stage by this share.
PROPOSE_MIN_GAIN = 0.10


def propose(
    problem: Any,
    cluster: Cluster,
    shard_hosts: Sequence[str],
    replica_hosts: Mapping[str, Sequence[str]],
    *,
    exclude: Iterable[str] = (),
    min_gain: float = PROPOSE_MIN_GAIN,
) -> dict[str, tuple[str, ...]]:
    """Replicas on hosts that would otherwise be left idle (no shard, no replica), while one clearly pays.

    Each round tries one more replica of every shard (but those in ``exclude``, whose count the user gave) on every
    idle host and keeps the one with the smallest estimated slowest stage, if that is at least ``min_gain`` below
    the current one; it stops when no idle host is left or no replica pays. Returns the hosts of replicas 1.. of
    every shard, the ones given included."""
    names = list(problem.names)
    current = [[cluster.host(h).name, *(cluster.host(x).name for x in replica_hosts.get(names[i], ()))] for i, h in enumerate(shard_hosts)]
    skip = set(exclude)
    while True:
        used = {h for hs in current for h in hs}
        idle = [h for h in cluster.names if h not in used]
        if not idle:
            break
        now = estimate(problem, cluster, current).bottleneck[1]
        best: tuple[float, int, str] | None = None
        for i, name in enumerate(names):
            if name in skip:
                continue
            for h in idle:
                trial = [list(x) for x in current]
                trial[i].append(h)
                value = estimate(problem, cluster, trial).bottleneck[1]
                if best is None or value < best[0] - 1e-15:
                    best = (value, i, h)
        if best is None or best[0] > now * (1.0 - min_gain) or best[0] >= now - 1e-15:
            break  # nothing pays enough (and nothing at all that does not lower the slowest stage)
        current[best[1]].append(best[2])
    return {names[i]: tuple(hs[1:]) for i, hs in enumerate(current)}


def existing_hosts(topology: topo.Topology, cluster: Cluster) -> dict[str, tuple[str, ...]]:
    """Host names of the replicas 1.. a topology already has, those whose address is a host of ``cluster``."""
    by_address = {h.address: h.name for h in cluster.hosts}
    out = {}
    for s in topology.shards:
        if s.extra_replicas:
            out[s.name] = tuple(by_address[r.host] for r in s.extra_replicas if r.host in by_address)
    return out


def plan_replicas(
    topology: topo.Topology,
    cluster: Cluster,
    shard_hosts: Sequence[str],
    requests: Mapping[str, int | ReplicaRequest] | None,
    *,
    propose_idle: bool = False,
) -> tuple[dict[str, tuple[str, ...]], dict[str, list[str]]]:
    """The hosts of every replica 1.. of ``topology``'s shards once shard ``i`` sits on ``shard_hosts[i]``:
    ``requests`` applied to the replicas the topology has (a count for a shard whose replicas were not on this
    cluster's hosts); with ``propose_idle``, then :func:`propose` on the hosts left idle. Also returns what
    :func:`propose` added (shard -> hosts)."""
    from pipeline.partition.placement import problem_from_topology, shard_seconds

    reqs = as_requests(requests)
    have = existing_hosts(topology, cluster)
    for s in topology.shards:  # replicas placed elsewhere (a loopback topology): placed anew, as many
        if s.extra_replicas and s.name not in reqs and len(have.get(s.name, ())) < len(s.extra_replicas):
            reqs[s.name] = ReplicaRequest(s.name, len(s.replicas))
    if not reqs and not have and not propose_idle:
        return {}, {}
    problem = problem_from_topology(topology, shard_seconds(topology))
    chosen = choose_hosts(problem, cluster, shard_hosts, reqs, have)
    if not propose_idle:
        return chosen, {}
    more = propose(problem, cluster, shard_hosts, chosen, exclude=reqs)
    return more, {s: list(hs[len(chosen.get(s, ())) :]) for s, hs in more.items() if len(hs) > len(chosen.get(s, ()))}


def note_proposed(topology: topo.Topology, proposed: Mapping[str, Sequence[str]]) -> topo.Topology:
    """``topology`` with the replicas the planner proposed under ``plan.placement.proposed_replicas``."""
    if not proposed:
        return topology
    extra = dict(topology.extra)
    plan = dict(extra.get("plan") or {})
    plan["placement"] = {**(plan.get("placement") or {}), "proposed_replicas": {s: list(hs) for s, hs in proposed.items()}}
    extra["plan"] = plan
    return topology.replace(extra=extra)


# ------------------------------------------------------------------ presentation
def replica_table(topology: topo.Topology, cluster: Cluster) -> str:
    """The replicas' hosts and the stages with the load spread over them (empty without replicas)."""
    from pipeline.partition.placement import problem_from_topology, shard_seconds

    if not any(s.extra_replicas for s in topology.shards):
        return ""
    by_address = {h.address: h.name for h in cluster.hosts}
    hosts = [[by_address.get(r.host, r.host) for r in s.replicas] for s in topology.shards]
    if any(h not in cluster.names for hs in hosts for h in hs):
        return "replicas: some replica is not on a host of the cluster; no estimate"
    est = estimate(problem_from_topology(topology, shard_seconds(topology)), cluster, hosts)
    lines = ["replicas (each shard's work spread evenly over its replicas)"]
    for s, hs in zip(topology.shards, hosts):
        if s.extra_replicas:
            lines.append(f"  {s.name:<10} {len(hs)} replicas on {', '.join(hs)}")
    for h, secs in est.compute.items():
        lines.append(f"  compute  {h:<26} {secs * 1e3:>9.3f} ms")
    for (a, b), secs in est.links.items():
        lines.append(f"  link     {a + '->' + b:<26} {secs * 1e3:>9.3f} ms")
    name, secs = est.bottleneck
    rate = f"{1.0 / secs:.0f}" if secs > 0 else "inf"
    lines.append(f"bottleneck with replicas: {name} {secs * 1e3:.3f} ms/sample (at most {rate} samples/s)")
    offered = ((topology.extra.get("plan") or {}).get("placement") or {}).get("proposed_replicas") or {}
    if offered:
        lines.append("proposed by the planner (--propose-replicas): " + "; ".join(f"{s} on {', '.join(hs)}" for s, hs in offered.items()))
    return "\n".join(lines)


__all__ = [
    "ReplicaEstimate",
    "ReplicaRequest",
    "as_requests",
    "choose_hosts",
    "estimate",
    "existing_hosts",
    "parse",
    "plan_replicas",
    "note_proposed",
    "propose",
    "replica_table",
]
