"""Choosing the cuts and the host of every shard together, knowing the hosts and the links.

The problem is an ordered list of *units* (a model's operations in topological
order when partitioning; the shards of an existing topology when placing it)
with an estimated compute time each, and the tensors that flow between them:
who produces each, which units consume it, whether the ingress receives it (a
model output), and its bytes per sample.

A plan is a sequence of *runs*: a run is a contiguous range of units on one
host, cut into one or more shards. Each host has at most one run (its shards
are consecutive in the order), and a host may have none.

The cost model of a plan (:func:`evaluate`):

- **compute**: a host's shards share it, so a host is one stage whose time per
  sample is the estimate of all its units divided by its ``speed``;
- **links**: a tensor travels once from its producer's host to every other host
  that consumes it (workers send straight to each consumer, never relayed), so
  a skip connection spanning several cuts is paid once per destination host,
  not once per boundary; model inputs leave from the ingress's host and model
  outputs return to it. Each (source host, receiving run) pair, and each
  return of outputs to the ingress, is a stage: bytes / bandwidth.
  Same-host transfers are not a stage (their cost is CPU, inside the compute
  estimate's error);
- **latency**: in order, for each run the slowest of its incoming hops
  (:data:`pipeline.cluster.HOP_FLOOR_S` + bytes / bandwidth + the link's
  latency; the loopback link for same-host hops), its compute, and a loopback
  hop into each of its later shards; then the slowest hop returning outputs
  to the ingress. For a model whose shards each wait for the previous one
  (every chain- or block-structured model) this is the critical path; where
  branches could run side by side on different hosts it is an upper bound.

Objectives: ``throughput`` makes the slowest stage as small as possible, then,
among the plans within ``slack`` of that, the lowest latency (today's planner
makes the same trade with bytes). ``latency`` minimises the latency, then the
slowest stage.

Within a run of several shards, the shards are cut the way
:func:`pipeline.partition.planner.plan_balanced` cuts a model on one host
(balanced compute, then the fewest bytes within ``slack``): on one host, and
with fast links, the plan is exactly today's plan.

Exactness: :func:`plan` is a dynamic programme over the boundaries of the order
whose state is (boundary, the set of hosts used, the host of every tensor
still live across the boundary, the shards so far). The host of each live
tensor is in the state, so skip tensors spanning runs are charged to the right
link exactly. It is exact over plans in which each host's shards are
consecutive (a host visited once); a plan that leaves a host and comes back to
it (A, B, A) is not searched. Inside a run the cut rule above is fixed, not
searched jointly with the hosts. Two simplifications of the wire remain, both
documented in docs/MULTIHOST.md: when one host runs several shards that each
consume the same tensor from another host, the workers send it once per shard
(the model counts it once per host); and the return of model outputs to the
ingress is a stage of its own even when other tensors use the same link.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pipeline.cluster import HOP_FLOOR_S, LOOPBACK, Cluster, Link
from pipeline.errors import PartitionError, UsageError
from pipeline.partition.planner import DEFAULT_SLACK, Crossings, check_shard_count, plan_balanced

OBJECTIVES = ("throughput", "latency")
#: ties closer than this are ties (seconds).
_EPS = 1e-12


@dataclass(frozen=True)
class Flow:
    """A tensor between units: its producer (``None``: a model input, sent by the ingress), its consumers
    (unit positions, sorted), whether the ingress receives it (a model output), and bytes per sample."""

    name: str
    producer: int | None
    consumers: tuple[int, ...]
    to_ingress: bool
    nbytes: float


@dataclass(frozen=True)
class Problem:
    """Units in order (estimated seconds per sample each, at speed 1.0), the flows between them, and
    where the order may be cut (``allowed[b]``: a cut after unit ``b - 1``; ends excluded)."""

    seconds: tuple[float, ...]
    flows: tuple[Flow, ...]
    allowed: tuple[bool, ...]
    names: tuple[str, ...] = ()
    #: every allowed boundary is a cut (placing the shards of an existing topology).
    fixed: bool = False
    #: today's per-boundary crossing bytes, for cutting a run into several shards.
    boundary_bytes: tuple[float, ...] = ()

    @property
    def n(self) -> int:
        return len(self.seconds)


@dataclass(frozen=True)
class Segment:
    """One shard: units ``start`` .. ``stop - 1`` on ``host`` (a host name)."""

    start: int
    stop: int
    host: str


@dataclass(frozen=True)
class Stage:
    """A stage of the pipeline under load: a host's compute, or a transfer over a link."""

    kind: str  # "compute" or "link"
    name: str  # the host, or "src->dst"
    seconds: float


@dataclass(frozen=True)
class LinkUse:
    """Bytes per sample from host ``src`` to host ``dst``, the time they keep the link busy, and the hop time."""

    src: str
    dst: str
    nbytes: float
    transfer_s: float
    hop_s: float
    tensors: tuple[str, ...] = ()


@dataclass(frozen=True)
class Estimate:
    """What the cost model says of a plan."""

    bottleneck_s: float
    latency_s: float
    stages: tuple[Stage, ...]
    links: tuple[LinkUse, ...]
    shard_seconds: tuple[float, ...]  # per shard, on its host

    @property
    def bottleneck(self) -> Stage:
        return max(self.stages, key=lambda s: s.seconds)


@dataclass(frozen=True)
class Placement:
    """The chosen plan: the shards with their hosts, and its estimate."""

    segments: tuple[Segment, ...]
    estimate: Estimate
    objective: str

    @property
    def boundaries(self) -> list[int]:
        return [s.start for s in self.segments[1:]]

    @property
    def hosts(self) -> list[str]:
        return [s.host for s in self.segments]


# ---------------------------------------------------------------- building
def problem_from_graph(graph: Any, seconds: Sequence[float], tensor_bytes: Sequence[int], cross: Crossings) -> Problem:
    """The problem of partitioning a model: its operations, tensors and allowed cuts."""
    outputs = set(graph.outputs)
    flows = []
    for t in graph.tensors:
        consumers = tuple(sorted(set(t.consumers)))
        to_ingress = t.id in outputs
        if not consumers and not to_ingress:
            continue
        if t.producer is None and t.id not in graph.inputs:
            continue  # a constant: every consumer has it built in
        flows.append(Flow(t.name, t.producer, consumers, to_ingress, float(tensor_bytes[t.id])))
    return Problem(
        seconds=tuple(float(s) for s in seconds),
        flows=tuple(flows),
        allowed=tuple(bool(x) for x in cross.allowed),
        names=tuple(op.name for op in graph.ops),
        boundary_bytes=tuple(float(x) for x in cross.bytes),
    )


def problem_from_topology(topology: Any, seconds: Sequence[float]) -> Problem:
    """The problem of placing an existing topology's shards (fixed cuts): one unit per shard."""
    from pipeline.topology import INGRESS

    index = {s.name: i for i, s in enumerate(topology.shards)}
    sample = topology.extra.get("sample_input_shapes") or {}
    producer = topology.producer_of()
    consumers: dict[str, set[int]] = {}
    for i, s in enumerate(topology.shards):
        for name in s.inputs:
            consumers.setdefault(name, set()).add(i)
    flows = []
    for name, who in producer.items():
        to_ingress = name in topology.output_names
        spec = topology.tensors.get(name)
        nbytes = float(_spec_bytes(spec, sample.get(name))) if spec is not None else 0.0
        cons = tuple(sorted(consumers.get(name, set())))
        if not cons and not to_ingress:
            continue
        flows.append(Flow(name, None if who == INGRESS else index[who], cons, to_ingress, nbytes))
    n = len(topology.shards)
    return Problem(
        seconds=tuple(float(s) for s in seconds),
        flows=tuple(flows),
        allowed=tuple([False] + [True] * (n - 1) + [False]),
        names=tuple(s.name for s in topology.shards),
        fixed=True,
    )


def _spec_bytes(spec: Any, sample_shape: Sequence[int] | None) -> int:
    dims = list(sample_shape) if sample_shape else [1 if d == -1 else d for d in spec.shape[1:]]
    itemsize = 2 if spec.dtype == "bfloat16" else np.dtype(spec.dtype).itemsize
    return int(np.prod(dims, dtype=np.int64)) * itemsize if dims else itemsize


# -------------------------------------------------------------- evaluation
class _Index:
    """Per-boundary look-ups shared by :func:`evaluate` and the search."""

    def __init__(self, problem: Problem, cluster: Cluster) -> None:
        self.p = problem
        self.cluster = cluster
        n = problem.n
        self.n = n
        self.prefix = np.concatenate([[0.0], np.cumsum(np.asarray(problem.seconds, dtype=np.float64))])
        self.hosts = cluster.names
        self.speed = [h.speed for h in cluster.hosts]
        self.ingress = cluster.names.index(cluster.ingress)
        m = len(self.hosts)
        self.links: list[list[Link]] = [[cluster.link(a, b) for b in self.hosts] for a in self.hosts]
        self.flows = problem.flows
        self.last_use = [max(f.consumers[-1] if f.consumers else -1, n if f.to_ingress else -1) for f in self.flows]
        # live[b]: flows produced by a unit before b and still needed at or after b (ids, ascending)
        self.live: list[tuple[int, ...]] = [
            tuple(i for i, f in enumerate(self.flows) if f.producer is not None and f.producer < b <= self.last_use[i])
            for b in range(n + 1)
        ]
        self.live_pos = [{fid: j for j, fid in enumerate(self.live[b])} for b in range(n + 1)]
        self.inputs = [i for i, f in enumerate(self.flows) if f.producer is None and f.consumers]
        self.allowed_count = np.concatenate([[0], np.cumsum(np.asarray(problem.allowed[1:], dtype=np.int64))])
        self.outputs = [i for i, f in enumerate(self.flows) if f.to_ingress]
        self.m = m
        # arrivals[a]: what a run starting at a receives, by when it is first needed:
        # (first use, position in live[a] or -1 for a model input, bytes, name), sorted by first use
        self.arrivals: list[list[tuple[int, int, float, str]]] = []
        for a in range(n + 1):
            items = [(self.first_use(fid, a), -1, self.flows[fid].nbytes, self.flows[fid].name) for fid in self.inputs]
            items += [(self.first_use(fid, a), j, self.flows[fid].nbytes, self.flows[fid].name) for j, fid in enumerate(self.live[a])]
            self.arrivals.append(sorted((x for x in items if x[0] <= n), key=lambda x: (x[0], x[1])))
        self._run_cache: dict[tuple[Any, ...], Any] = {}
        self._inner_cache: dict[tuple[Any, ...], tuple[int, ...]] = {}
        self._incoming_cache: dict[tuple[Any, ...], tuple[tuple[int, float], ...]] = {}
        self._fast_cache: dict[tuple[Any, ...], tuple[float, float]] = {}
        self.bytes_per_s = [[link.bytes_per_s for link in row] for row in self.links]
        # twins: hosts that differ only by name (same speed, same links to every other host, neither the
        # ingress's) are interchangeable, so the search tries only the first unused one of each group
        self.twin_of: list[int] = list(range(m))
        for h in range(m):
            for t in range(h):
                if self.twin_of[t] == t and self._twins(t, h):
                    self.twin_of[h] = t
                    break
        self.latency = [[link.latency_s for link in row] for row in self.links]

    def _twins(self, x: int, y: int) -> bool:
        if self.ingress in (x, y) or self.speed[x] != self.speed[y]:
            return False
        return all(self.links[x][z] == self.links[y][z] for z in range(self.m) if z not in (x, y))

    def skip_twin(self, h: int, used: int) -> bool:
        """True when an unused host earlier in ``h``'s group of twins would give the same plans."""
        group = self.twin_of[h]
        return any(self.twin_of[t] == group and not used >> t & 1 for t in range(h))

    def first_use(self, fid: int, a: int) -> int:
        cons = self.flows[fid].consumers
        j = bisect.bisect_left(cons, a)
        return cons[j] if j < len(cons) else self.n + 1

    def inner_cuts_between(self, a: int, b: int) -> int:
        """How many allowed boundaries lie strictly between ``a`` and ``b``."""
        if b - a < 2:
            return 0
        return int(self.allowed_count[b - 1] - self.allowed_count[a])

    def incoming(self, a: int, b: int, live_hosts: tuple[int, ...]) -> dict[int, tuple[float, list[str]]]:
        """Bytes (and tensor names) a run over ``[a, b)`` receives from each source host."""
        got: dict[int, tuple[float, list[str]]] = {}
        for first, j, size, name in self.arrivals[a]:
            if first >= b:
                break
            g = self.ingress if j < 0 else live_hosts[j]
            nbytes, names = got.get(g, (0.0, []))
            got[g] = (nbytes + size, [*names, name])
        return got

    def incoming_bytes(self, a: int, b: int, live_hosts: tuple[int, ...]) -> tuple[tuple[int, float], ...]:
        """:meth:`incoming` without the names, cached: the search's hot path."""
        key = (a, b, live_hosts)
        hit = self._incoming_cache.get(key)
        if hit is None:
            got: dict[int, float] = {}
            for first, j, size, _ in self.arrivals[a]:
                if first >= b:
                    break
                g = self.ingress if j < 0 else live_hosts[j]
                got[g] = got.get(g, 0.0) + size
            hit = tuple(got.items())
            self._incoming_cache[key] = hit
        return hit

    def fast_run(self, a: int, b: int, h: int, s: int, live_hosts: tuple[int, ...], slack: float, with_inner: bool) -> tuple[float, float]:
        """(slowest stage, latency) of a run, as :meth:`run_cost` computes them, cached."""
        key = (a, b, h, s, live_hosts, with_inner)
        hit = self._fast_cache.get(key)
        if hit is not None:
            return hit
        compute = float(self.prefix[b] - self.prefix[a]) / self.speed[h]
        worst, hop = compute, 0.0
        for g, nbytes in self.incoming_bytes(a, b, live_hosts):
            t = nbytes / self.bytes_per_s[g][h]
            if g != h and t > worst:
                worst = t
            hop = max(hop, HOP_FLOOR_S + t + self.latency[g][h])
        latency = hop + compute
        if s > 1 and with_inner:
            edges = [a, *self.inner_cuts(a, b, s, slack), b]
            for c, d in zip(edges[1:], edges[2:]):
                latency += LOOPBACK.hop_s(self.inner_hop_bytes(a, c, d))
        self._fast_cache[key] = (worst, latency)
        return worst, latency

    def inner_hop_bytes(self, a: int, c: int, d: int) -> float:
        """Bytes a shard over ``[c, d)`` receives from the shards of its own run that start at ``a``."""
        return float(sum(self.flows[f].nbytes for f in self.live[c] if self.flows[f].producer >= a and self.first_use(f, c) < d))  # type: ignore[operator]

    def next_live(self, a: int, b: int, h: int, live_hosts: tuple[int, ...]) -> tuple[int, ...]:
        pos = self.live_pos[a]
        out = []
        for fid in self.live[b]:
            producer = self.flows[fid].producer
            out.append(h if producer is not None and producer >= a else live_hosts[pos[fid]])
        return tuple(out)

    def outputs_by_host(self, live_hosts: tuple[int, ...]) -> dict[int, tuple[float, list[str]]]:
        pos = self.live_pos[self.n]
        got: dict[int, tuple[float, list[str]]] = {}
        for fid in self.outputs:
            f = self.flows[fid]
            g = self.ingress if f.producer is None else live_hosts[pos[fid]]
            nbytes, names = got.get(g, (0.0, []))
            got[g] = (nbytes + f.nbytes, [*names, f.name])
        return got

    def inner_cuts(self, a: int, b: int, s: int, slack: float) -> tuple[int, ...]:
        """How a run over ``[a, b)`` is cut into ``s`` shards (the single-host rule; every boundary when fixed)."""
        key = (a, b, s, slack)
        hit = self._inner_cache.get(key)
        if hit is None:
            hit = _inner_cuts(self, a, b, s, slack)
            self._inner_cache[key] = hit
        return hit

    def run_cost(
        self, a: int, b: int, h: int, s: int, live_hosts: tuple[int, ...], slack: float, with_inner: bool = True
    ) -> tuple[list[tuple[str, str, float]], float, tuple[int, ...], dict[int, tuple[float, list[str]]]]:
        """Stages (kind, name, seconds), latency and inner cuts of a run ``[a, b)`` on host ``h`` in ``s`` shards."""
        key = (a, b, h, s, live_hosts, slack, with_inner)
        hit = self._run_cache.get(key)
        if hit is None:
            hit = self._run_cost(a, b, h, s, live_hosts, slack, with_inner)
            self._run_cache[key] = hit
        return hit

    def _run_cost(
        self, a: int, b: int, h: int, s: int, live_hosts: tuple[int, ...], slack: float, with_inner: bool
    ) -> tuple[list[tuple[str, str, float]], float, tuple[int, ...], dict[int, tuple[float, list[str]]]]:
        compute = float(self.prefix[b] - self.prefix[a]) / self.speed[h]
        stages: list[tuple[str, str, float]] = [("compute", self.hosts[h], compute)]
        incoming = self.incoming(a, b, live_hosts)
        hop = 0.0
        for g, (nbytes, _) in incoming.items():
            link = self.links[g][h]
            if g != h:
                stages.append(("link", f"{self.hosts[g]}->{self.hosts[h]}", link.transfer_s(nbytes)))
            hop = max(hop, link.hop_s(nbytes))
        latency = hop + compute
        cuts: tuple[int, ...] = ()
        if s > 1 and with_inner:
            cuts = self.inner_cuts(a, b, s, slack)
            edges = [a, *cuts, b]
            for c, d in zip(edges[1:], edges[2:]):
                latency += LOOPBACK.hop_s(self.inner_hop_bytes(a, c, d))
        return stages, latency, cuts, incoming

    def final_cost(self, live_hosts: tuple[int, ...]) -> tuple[list[tuple[str, str, float]], float, dict[int, tuple[float, list[str]]]]:
        stages: list[tuple[str, str, float]] = []
        hop = 0.0
        outs = self.outputs_by_host(live_hosts)
        for g, (nbytes, _) in outs.items():
            link = self.links[g][self.ingress]
            if g != self.ingress:
                stages.append(("link", f"{self.hosts[g]}->{self.hosts[self.ingress]}", link.transfer_s(nbytes)))
            hop = max(hop, link.hop_s(nbytes))
        return stages, hop, outs


def _inner_cuts(index: _Index, a: int, b: int, s: int, slack: float) -> tuple[int, ...]:
    p = index.p
    if p.fixed:
        return tuple(c for c in range(a + 1, b) if p.allowed[c])
    sub_allowed = np.array(p.allowed[a : b + 1], dtype=bool)
    sub_allowed[0] = sub_allowed[-1] = False
    sub_bytes = np.array(p.boundary_bytes[a : b + 1] if p.boundary_bytes else [0.0] * (b - a + 1), dtype=np.float64)
    cuts = plan_balanced(p.seconds[a:b], Crossings(bytes=sub_bytes, allowed=sub_allowed, reasons={}), s, slack)
    return tuple(a + c for c in cuts)


def evaluate(problem: Problem, cluster: Cluster, segments: Sequence[Segment]) -> Estimate:
    """The cost model's estimate of a plan (see the module's docstring); any plan, also one that
    visits a host twice (each visit is then a run of its own, and the host's compute adds up)."""
    index = _Index(problem, cluster)
    return _evaluate(index, segments)


def _evaluate(index: _Index, segments: Sequence[Segment]) -> Estimate:
    hosts = index.hosts
    host_of = {name: i for i, name in enumerate(hosts)}
    if not segments or segments[0].start != 0 or segments[-1].stop != index.n:
        raise PartitionError(f"a plan must cover units 0 .. {index.n - 1}; received {segments}")
    for x, y in zip(segments, segments[1:]):
        if x.stop != y.start:
            raise PartitionError(f"a plan's shards must be consecutive; received {x} then {y}")
    # group consecutive shards on one host into runs
    runs: list[list[Segment]] = []
    for seg in segments:
        if runs and runs[-1][-1].host == seg.host:
            runs[-1].append(seg)
        else:
            runs.append([seg])
    live_host: dict[int, int] = {}  # flow id -> host of its producer
    owner = np.empty(index.n, dtype=np.int64)
    for seg in segments:
        owner[seg.start : seg.stop] = host_of[seg.host]
    compute_by_host: dict[int, float] = {}
    stages: list[Stage] = []
    link_bytes: dict[tuple[int, int], tuple[float, list[str]]] = {}
    latency = 0.0
    for run in runs:
        a, b, h = run[0].start, run[-1].stop, host_of[run[0].host]
        live = tuple(live_host.get(fid, int(owner[index.flows[fid].producer])) for fid in index.live[a])  # type: ignore[index]
        run_stages, run_latency, _, incoming = index.run_cost(a, b, h, 1, live, 0.0, with_inner=False)
        edges = [seg.start for seg in run] + [b]
        for c, d in zip(edges[1:], edges[2:]):
            run_latency += LOOPBACK.hop_s(index.inner_hop_bytes(a, c, d))
        latency += run_latency
        for kind, name, seconds in run_stages:
            if kind == "compute":
                compute_by_host[h] = compute_by_host.get(h, 0.0) + seconds
            else:
                stages.append(Stage(kind, name, seconds))
        for g, (nbytes, names) in incoming.items():
            old, old_names = link_bytes.get((g, h), (0.0, []))
            link_bytes[(g, h)] = (old + nbytes, [*old_names, *names])
    final_live = tuple(int(owner[index.flows[fid].producer]) for fid in index.live[index.n])  # type: ignore[index]
    out_stages, out_hop, outs = index.final_cost(final_live)
    latency += out_hop
    stages.extend(Stage(k, n, s) for k, n, s in out_stages)
    for g, (nbytes, names) in outs.items():
        old, old_names = link_bytes.get((g, index.ingress), (0.0, []))
        link_bytes[(g, index.ingress)] = (old + nbytes, [*old_names, *names])
    stages = [Stage("compute", hosts[h], s) for h, s in sorted(compute_by_host.items())] + stages
    links = tuple(
        LinkUse(
            src=hosts[g],
            dst=hosts[h],
            nbytes=nbytes,
            transfer_s=index.links[g][h].transfer_s(nbytes),
            hop_s=index.links[g][h].hop_s(nbytes),
            tensors=tuple(names),
        )
        for (g, h), (nbytes, names) in sorted(link_bytes.items())
        if g != h
    )
    shard_seconds = tuple(float(index.prefix[s.stop] - index.prefix[s.start]) / index.speed[host_of[s.host]] for s in segments)
    return Estimate(
        bottleneck_s=max(s.seconds for s in stages),
        latency_s=latency,
        stages=tuple(stages),
        links=links,
        shard_seconds=shard_seconds,
    )


# ------------------------------------------------------------------ search
@dataclass
class _Entry:
    value: tuple[float, ...]
    back: tuple[Any, ...] | None  # (previous key, a, b, host, s)


def plan(
    problem: Problem,
    cluster: Cluster,
    *,
    objective: str = "throughput",
    shards: int | None = None,
    slack: float = DEFAULT_SLACK,
) -> Placement:
    """The best plan (see the module's docstring): cuts and hosts chosen together.

    ``shards``: exactly that many shards over the hosts (a host may get several, or none); ``None``
    lets the planner choose (each host used gets one shard: a host's shards share its compute, so a
    second one there would only add a hop). In a fixed problem (placing an existing topology) every
    allowed boundary is a cut and ``shards`` must be ``None`` or the number of units.
    """
    if objective not in OBJECTIVES:
        raise UsageError(f"--objective {objective!r}: expected one of {list(OBJECTIVES)}")
    if slack < 0:
        raise UsageError(f"--slack must be zero or more, received {slack}")
    index = _Index(problem, cluster)
    n = problem.n
    candidates = [b for b in range(1, n) if problem.allowed[b]]
    if problem.fixed:
        total = len(candidates) + 1
        if shards is not None and shards != total:
            raise UsageError(f"--shards {shards}: the topology has {total} shards, and placing does not re-cut it")
        shards = total
    if shards is not None:
        check_shard_count(shards, len(candidates), n)
    if objective == "throughput":
        best = _search(index, candidates, shards, slack, mode="bottleneck")
        bound = best.value[0] * (1.0 + slack) + _EPS
        chosen = _search(index, candidates, shards, slack, mode="latency", bound=bound)
    else:
        chosen = _search(index, candidates, shards, slack, mode="latency_first")
    segments = _unwind(index, chosen, slack)
    estimate = _evaluate(index, segments)
    return Placement(segments=tuple(segments), estimate=estimate, objective=objective)


def _search(
    index: _Index,
    candidates: list[int],
    shards: int | None,
    slack: float,
    *,
    mode: str,
    bound: float = np.inf,
) -> _Entry:
    """Forward DP over boundaries. Modes: ``bottleneck`` (min slowest stage), ``latency`` (min latency
    with every stage within ``bound``), ``latency_first`` (min latency, then slowest stage)."""
    n = index.n
    m = index.m
    points = [0, *candidates, n]
    fixed = index.p.fixed
    # key: (boundary, used hosts bitmask, live hosts, shards so far)
    table: dict[int, dict[tuple[int, tuple[int, ...], int], _Entry]] = {b: {} for b in points}
    table[0][(0, (), 0)] = _Entry(value=(0.0, 0.0) if mode == "latency_first" else (0.0,), back=None)
    final: _Entry | None = None
    limit = _upper_bound(index, shards, slack, mode, bound)
    for ai, a in enumerate(points[:-1]):
        for key, entry in sorted(table[a].items()):
            used, live, k = key
            for h in range(m):
                if used >> h & 1 or index.skip_twin(h, used):
                    continue
                for b in points[ai + 1 :]:
                    # a run's compute only grows with b: past the limit, no longer run on h can be any good
                    compute = float(index.prefix[b] - index.prefix[a]) / index.speed[h]
                    if mode == "latency_first":
                        if entry.value[0] + compute > limit:
                            break
                    elif compute > limit:
                        break
                    room = index.inner_cuts_between(a, b)
                    if fixed:
                        s_options = [room + 1]
                    elif shards is None:
                        s_options = [1]
                    else:
                        s_options = list(range(1, min(room + 1, shards - k) + 1))
                    for s in s_options:
                        k2 = k + s
                        if shards is not None:
                            if k2 > shards or (b == n and k2 != shards):
                                continue
                            if b < n and shards - k2 < 1:
                                continue
                        new_live = index.next_live(a, b, h, live)
                        new_key = (used | (1 << h), new_live, k2 if shards is not None else 0)
                        if s > 1 and mode != "bottleneck" and b < n:
                            # skip cutting the run (the costly part) when even its floor cannot beat what is there
                            old = table[b].get(new_key)
                            floor = entry.value[0] + float(index.prefix[b] - index.prefix[a]) / index.speed[h] + (s - 1) * HOP_FLOOR_S
                            if old is not None and floor > old.value[0] * (1 + 1e-9):
                                continue
                        value = _step(index, a, b, h, s, live, entry.value, slack, mode, bound)
                        if value is None:
                            continue
                        back = ((a, key), a, b, h, s)
                        if b == n:
                            fvalue = _finish(index, new_live, value, mode, bound)
                            if fvalue is None:
                                continue
                            if final is None or _better(fvalue, final.value):
                                final = _Entry(fvalue, (back, new_key))
                            continue
                        old = table[b].get(new_key)
                        if old is None or _better(value, old.value):
                            table[b][new_key] = _Entry(value, back)
    if final is None:
        raise PartitionError("no plan fits the cluster under these constraints; this is a bug in the planner")
    final.back = (final.back, table)  # type: ignore[assignment]
    return final


def _upper_bound(index: _Index, shards: int | None, slack: float, mode: str, bound: float) -> float:
    """A limit no run of the optimum exceeds: ``bound`` itself, or what the best plan on a single host
    achieves (every host could run the whole model), a valid plan in every mode."""
    if mode == "latency":
        return bound * (1 + 1e-9) + _EPS
    n = index.n
    s = (index.inner_cuts_between(0, n) + 1) if index.p.fixed else (shards or 1)
    best = np.inf
    for h in range(index.m):
        cuts = index.inner_cuts(0, n, s, slack) if s > 1 else ()
        edges = [0, *cuts, n]
        est = _evaluate(index, [Segment(x, y, index.hosts[h]) for x, y in zip(edges, edges[1:])])
        best = min(best, est.latency_s if mode == "latency_first" else est.bottleneck_s)
    return float(best) * (1 + 1e-9) + _EPS


def _step(
    index: _Index,
    a: int,
    b: int,
    h: int,
    s: int,
    live: tuple[int, ...],
    value: tuple[float, ...],
    slack: float,
    mode: str,
    bound: float,
) -> tuple[float, ...] | None:
    if mode == "bottleneck":
        worst, _ = index.fast_run(a, b, h, s, live, slack, False)
        return (max(value[0], worst),)
    worst, latency = index.fast_run(a, b, h, s, live, slack, True)
    if mode == "latency":
        if worst > bound:
            return None
        return (value[0] + latency,)
    return (value[0] + latency, max(value[1], worst))


def _finish(index: _Index, live: tuple[int, ...], value: tuple[float, ...], mode: str, bound: float) -> tuple[float, ...] | None:
    stages, hop, _ = index.final_cost(live)
    worst = max([x[2] for x in stages] or [0.0])
    if mode == "bottleneck":
        return (max(value[0], worst),)
    if mode == "latency":
        return None if worst > bound else (value[0] + hop,)
    return (value[0] + hop, max(value[1], worst))


def _better(x: tuple[float, ...], y: tuple[float, ...]) -> bool:
    for u, v in zip(x, y):
        if u < v - _EPS * max(1.0, abs(v)):
            return True
        if u > v + _EPS * max(1.0, abs(v)):
            return False
    return False


def _unwind(index: _Index, final: _Entry, slack: float) -> list[Segment]:
    (back, _key), table = final.back  # type: ignore[misc]
    runs = []
    while back is not None:
        (prev_a, prev_key), a, b, h, s = back
        runs.append((a, b, h, s))
        back = table[prev_a][prev_key].back
    segments = []
    for a, b, h, s in reversed(runs):
        cuts = index.inner_cuts(a, b, s, slack) if s > 1 else ()
        edges = [a, *cuts, b]
        segments += [Segment(x, y, index.hosts[h]) for x, y in zip(edges, edges[1:])]
    return segments


def brute_force(
    problem: Problem, cluster: Cluster, *, objective: str = "throughput", shards: int | None = None, slack: float = DEFAULT_SLACK
) -> tuple[float, float]:
    """The optimum (bottleneck, latency) by enumerating every plan in the planner's space (for tests):
    ordered choices of distinct hosts, run boundaries, and shards per run."""
    import itertools

    index = _Index(problem, cluster)
    n = problem.n
    candidates = [b for b in range(1, n) if problem.allowed[b]]
    if problem.fixed:
        shards = len(candidates) + 1
    results: list[tuple[float, float]] = []
    for r in range(1, min(index.m, len(candidates) + 1) + 1):
        for cut in itertools.combinations(candidates, r - 1):
            edges = [0, *cut, n]
            for hosts in itertools.permutations(range(index.m), r):
                runs = list(zip(edges, edges[1:]))
                if problem.fixed:
                    s_lists = [[index.inner_cuts_between(a, b) + 1] for a, b in runs]
                elif shards is None:
                    s_lists = [[1] for _ in runs]
                else:
                    s_lists = [list(range(1, index.inner_cuts_between(a, b) + 2)) for a, b in runs]
                for ss in itertools.product(*s_lists):
                    if shards is not None and sum(ss) != shards:
                        continue
                    segments = []
                    for (a, b), h, s in zip(runs, hosts, ss):
                        cuts = index.inner_cuts(a, b, s, slack) if s > 1 else ()
                        e = [a, *cuts, b]
                        segments += [Segment(x, y, index.hosts[h]) for x, y in zip(e, e[1:])]
                    est = _evaluate(index, segments)
                    results.append((est.bottleneck_s, est.latency_s))
    if objective == "latency":
        return min(results, key=lambda x: (x[1], x[0]))
    best = min(x[0] for x in results)
    bound = best * (1.0 + slack) + _EPS
    return min((x for x in results if x[0] <= bound), key=lambda x: x[1])


# ------------------------------------------------------------ presentation
def estimate_rows(estimate: Estimate) -> dict[str, Any]:
    """The estimate as plain data for ``topology.yaml`` (milliseconds and bytes per sample)."""
    return {
        "bottleneck": {"stage": estimate.bottleneck.name, "kind": estimate.bottleneck.kind, "ms": round(estimate.bottleneck_s * 1e3, 4)},
        "latency_ms": round(estimate.latency_s * 1e3, 4),
        "stages": [{"kind": s.kind, "name": s.name, "ms": round(s.seconds * 1e3, 4)} for s in estimate.stages],
        "links": [
            {
                "from": u.src,
                "to": u.dst,
                "bytes": int(round(u.nbytes)),
                "transfer_ms": round(u.transfer_s * 1e3, 4),
                "hop_ms": round(u.hop_s * 1e3, 4),
                "tensors": list(u.tensors),
            }
            for u in estimate.links
        ],
    }


def placement_table(
    estimate: Estimate,
    *,
    shard_names: Sequence[str],
    hosts: Sequence[str],
    cluster: Cluster,
    objective: str | None = None,
    first_last: Sequence[tuple[str, str]] | None = None,
) -> str:
    """Hosts of the shards, bytes and time per link, the stages and the bottleneck, as text."""
    lines = []
    title = "placement on the cluster" + (f" (objective: {objective})" if objective else "")
    lines.append(title)
    lines.append(f"{'shard':<10} {'host':<12} {'address':<16} {'est ms':>8}  ops")
    speed = {h.name: h for h in cluster.hosts}
    for i, (name, host) in enumerate(zip(shard_names, hosts)):
        addr = speed[host].address if host in speed else host
        span = f"{first_last[i][0]} .. {first_last[i][1]}" if first_last and first_last[i][0] else ""
        lines.append(f"{name:<10} {host:<12} {addr:<16} {estimate.shard_seconds[i] * 1e3:>8.2f}  {span}")
    ingress = cluster.ingress_host
    lines.append(f"{'ingress':<10} {ingress.name:<12} {ingress.address:<16}")
    if estimate.links:
        lines.append(f"\n{'link':<26} {'bytes/sample':>13} {'transfer ms':>12} {'hop ms':>8}  bandwidth, latency")
        for u in estimate.links:
            link = cluster.link(u.src, u.dst)
            bw = link.to_dict()
            lines.append(
                f"{u.src + ' -> ' + u.dst:<26} {int(round(u.nbytes)):>13,} {u.transfer_s * 1e3:>12.3f} {u.hop_s * 1e3:>8.3f}  {bw['bandwidth']}, {bw['latency']}"
            )
    else:
        lines.append("\nno tensor crosses a link between hosts")
    lines.append("\nstages per sample (compute: all shards of a host; link: bytes / bandwidth)")
    for s in estimate.stages:
        lines.append(f"  {s.kind:<8} {s.name:<26} {s.seconds * 1e3:>9.3f} ms")
    b = estimate.bottleneck
    lines.append(
        f"bottleneck: {b.kind} {b.name} {b.seconds * 1e3:.3f} ms/sample (at most {1.0 / b.seconds if b.seconds > 0 else float('inf'):.0f} samples/s); "
        f"estimated latency {estimate.latency_s * 1e3:.2f} ms"
    )
    return "\n".join(lines)


__all__ = [
    "OBJECTIVES",
    "Estimate",
    "Flow",
    "LinkUse",
    "Placement",
    "Problem",
    "Segment",
    "Stage",
    "assign_hosts",
    "brute_force",
    "estimate_rows",
    "estimate_topology",
    "evaluate",
    "place_topology",
    "placement_table",
    "plan",
    "problem_from_graph",
    "problem_from_topology",
    "record_placement",
    "shard_seconds",
]


# ------------------------------------------------------------ topologies
#: the first port each host's processes get when no --base-port is given (consecutive from there).
CLUSTER_BASE_PORT = 5550
#: the ingress's gRPC port on its host unless --grpc-address says otherwise (as in docs/DESIGN's cluster file).
CLUSTER_GRPC_PORT = 8001


def assign_hosts(
    topology: Any,
    cluster: Cluster,
    hosts: Sequence[str],
    *,
    base_port: int | None = None,
    grpc_address: str | None = None,
    replica_hosts: Mapping[str, Sequence[str]] | None = None,
) -> Any:
    """``topology`` with shard ``i`` on host ``hosts[i]`` (a name or address) and the ingress on the cluster's
    ingress host: endpoints, bind and metrics addresses and the gRPC address rewritten, ports unique per host
    (consecutive from ``base_port``, default :data:`CLUSTER_BASE_PORT`), and the cluster recorded.

    ``replica_hosts``: shard -> the hosts of its replicas 1.. (names or addresses; see
    :mod:`pipeline.partition.replica_placement`), given ports after the shards'; a shard not named keeps its
    number of replicas, on its new host."""
    from pipeline.topology import ReplicaSpec, bind_address

    if len(hosts) != len(topology.shards):
        raise UsageError(f"expected one host per shard ({len(topology.shards)}), received {len(hosts)}: {list(hosts)}")
    base = CLUSTER_BASE_PORT if base_port is None else base_port
    if not 0 < base <= 65535 - 2 * (len(hosts) + 1):
        raise UsageError(f"--base-port {base}: expected a port between 1 and {65535 - 2 * (len(hosts) + 1)}")
    ingress = cluster.ingress_host
    grpc = grpc_address or f"{ingress.address}:{CLUSTER_GRPC_PORT}"
    taken: dict[str, set[int]] = {}
    grpc_host, _, grpc_port = grpc.rpartition(":")
    if grpc_port.isdigit():
        taken.setdefault(ingress.address if grpc_host in (ingress.address, "0.0.0.0", "[::]", "") else grpc_host, set()).add(int(grpc_port))
    next_port: dict[str, int] = {}

    def port(address: str) -> int:
        p = next_port.get(address, base)
        while p in taken.get(address, set()):
            p += 1
        if p > 65535:
            raise UsageError(f"ran out of ports on {address} from --base-port {base}")
        taken.setdefault(address, set()).add(p)
        next_port[address] = p + 1
        return p

    results = f"tcp://{ingress.address}:{port(ingress.address)}"
    new_ingress = dataclasses.replace(
        topology.ingress,
        grpc=grpc,
        results=results,
        host=ingress.address,
        bind=bind_address(results),
        metrics=f"{ingress.address}:{port(ingress.address)}",
    )
    shards = []
    for spec, host in zip(topology.shards, hosts):
        h = cluster.host(host)
        endpoint = f"tcp://{h.address}:{port(h.address)}"
        shards.append(
            dataclasses.replace(
                spec, endpoint=endpoint, host=h.address, bind=bind_address(endpoint), metrics=f"{h.address}:{port(h.address)}"
            )
        )
    wanted = dict(replica_hosts or {})
    unknown = sorted(set(wanted) - {s.name for s in shards})
    if unknown:
        raise UsageError(f"replicas of {unknown}: no such shard; the shards are {[s.name for s in shards]}")
    for i, spec in enumerate(shards):
        extra = []
        for host in wanted.get(spec.name, [spec.host] * len(spec.extra_replicas)):
            h = cluster.host(host)
            endpoint = f"tcp://{h.address}:{port(h.address)}"
            extra.append(ReplicaSpec(endpoint, bind_address(endpoint), h.address, f"{h.address}:{port(h.address)}"))
        shards[i] = dataclasses.replace(spec, extra_replicas=tuple(extra))
    from pipeline.cluster import TOPOLOGY_KEY

    extra = dict(topology.extra)
    extra[TOPOLOGY_KEY] = cluster.to_dict()
    if isinstance(extra.get("plan"), Mapping):  # an earlier placement's estimate no longer holds
        plan_section = {k: v for k, v in extra["plan"].items() if k != "placement"}
        if isinstance(plan_section.get("shards"), list):
            plan_section["shards"] = [
                {k: v for k, v in r.items() if k not in ("host", "host_ms")} if isinstance(r, Mapping) else r for r in plan_section["shards"]
            ]
        extra["plan"] = plan_section
    return topology.replace(ingress=new_ingress, shards=tuple(shards), extra=extra)


def shard_seconds(topology: Any) -> list[float]:
    """Estimated seconds per sample of each shard: from the plan recorded at partition time, else by
    running the cost model over each shard's file (a hand-written topology)."""
    rows = {r.get("shard"): r for r in ((topology.extra.get("plan") or {}).get("shards") or []) if isinstance(r, Mapping)}
    if all(s.name in rows and "estimated_ms" in rows[s.name] for s in topology.shards):
        return [float(rows[s.name]["estimated_ms"]) / 1e3 for s in topology.shards]
    from pipeline.partition import cost
    from pipeline.partition.graph import build_graph
    from pipeline.partition.source import load_keras_file

    unsafe = bool(topology.extra.get("unsafe", False))
    out = []
    for s in topology.shards:
        model = load_keras_file(topology.shard_path(s.name), unsafe=unsafe)
        graph = build_graph(model)
        out.append(cost.seconds_per_sample(graph, s.batching.max_batch, _sample_shapes(topology, graph)))
    return out


def _sample_shapes(topology: Any, graph: Any) -> dict[str, tuple[int, ...]] | None:
    sample = topology.extra.get("sample_input_shapes") or {}
    shapes = {name: tuple(sample[name][1:]) for name in graph.input_names if name in sample}
    return shapes or None


def estimate_topology(topology: Any, cluster: Cluster | None = None) -> tuple[Estimate, list[str]]:
    """The estimate of a placed topology as it stands (hosts from each shard's address), and the host names."""
    from pipeline.cluster import cluster_of, host_names

    cluster = cluster if cluster is not None else cluster_of(topology)
    if cluster is None:
        raise UsageError(f"topology {topology.name!r} was not placed on a cluster (no 'cluster:' section in topology.yaml)")
    names = host_names(topology, cluster)
    known = set(cluster.names)
    hosts = [names[s.name] for s in topology.shards]
    stray = sorted({h for h in hosts + [names["ingress"]] if h not in known})
    if stray:
        raise UsageError(f"topology {topology.name!r} places processes on {stray}, which are not hosts of its cluster {cluster.names}")
    problem = problem_from_topology(topology, shard_seconds(topology))
    segments = [Segment(i, i + 1, h) for i, h in enumerate(hosts)]
    if names["ingress"] != cluster.ingress:
        cluster = Cluster(cluster.hosts, names["ingress"], cluster.default_link, cluster.pairs, cluster.source)
    return evaluate(problem, cluster, segments), hosts


def place_topology(
    topology: Any,
    cluster: Cluster,
    objective: str = "throughput",
    *,
    slack: float = DEFAULT_SLACK,
    base_port: int | None = None,
    grpc_address: str | None = None,
    replicas: Mapping[str, Any] | None = None,
    propose_replicas: bool = False,
) -> Any:
    """Place an existing topology's shards on ``cluster`` without re-cutting them: the host of every shard
    chosen by :func:`plan` over the fixed shards; endpoints rewritten (:func:`assign_hosts`); the plan's
    estimate recorded under ``plan.placement``. ``replicas`` (shard -> count or
    :class:`~pipeline.partition.replica_placement.ReplicaRequest`) sets replica counts or hosts; the
    replicas a topology has are placed too; ``propose_replicas`` lets the planner add replicas on hosts
    it would leave idle when its cost model says they clearly pay. Returns the new :class:`~pipeline.topology.Topology`
    (not written: call ``.write()``)."""
    from pipeline.partition.replica_placement import note_proposed, plan_replicas

    problem = problem_from_topology(topology, shard_seconds(topology))
    chosen = plan(problem, cluster, objective=objective, slack=slack)
    replica_hosts, proposed = plan_replicas(topology, cluster, chosen.hosts, replicas, propose_idle=propose_replicas)
    placed = assign_hosts(
        topology, cluster, chosen.hosts, base_port=base_port, grpc_address=grpc_address, replica_hosts=replica_hosts
    )
    return note_proposed(record_placement(placed, chosen, cluster), proposed)


def record_placement(topology: Any, chosen: Placement, cluster: Cluster) -> Any:
    """``topology`` with the placement's estimate under ``plan.placement`` and each plan row's host."""
    extra = dict(topology.extra)
    plan_section = dict(extra.get("plan") or {})
    rows = [dict(r) for r in plan_section.get("shards") or []]
    for row, seg, secs in zip(rows, chosen.segments, chosen.estimate.shard_seconds):
        row["host"] = seg.host
        row["host_ms"] = round(secs * 1e3, 4)
    if rows:
        plan_section["shards"] = rows
    plan_section["placement"] = {"objective": chosen.objective, "hosts": list(chosen.hosts), **estimate_rows(chosen.estimate)}
    extra["plan"] = plan_section
    return topology.replace(extra=extra)
