"""Replicas of a shard (issue 16): several worker processes serve one shard.

Topology. A shard's ``replicas:`` key lists every replica, the first being
the shard's own ``endpoint``/``bind``/``host``/``metrics``; without the key (or
with ``replicas: 1``) a shard has one replica and the file reads as before::

    - name: shard2
      endpoint: tcp://10.0.0.5:5557
      metrics: 10.0.0.5:9102
      replicas:
      - {endpoint: tcp://10.0.0.5:5557, metrics: 10.0.0.5:9102}
      - {endpoint: tcp://10.0.0.6:5557, metrics: 10.0.0.6:9102}

Each replica is its own process, ``pipeline worker DIR --shard shard2
--replica 1``, and its own process name in heartbeats, metrics and ``pipeline
top``: ``shard2@1`` (a shard with one replica keeps its plain name).

Routing. Every producer (the ingress for model inputs, a worker for its
outputs) holds one PUSH socket per replica of a replicated consumer and picks
the replica itself with rendezvous (highest-random-weight) hashing of the
request id over the replicas it sees up. Every producer of a join computes
the same choice for the same request id without asking anyone, so all the
parts of a request meet in one replica; ids are random 64-bit numbers, so the
load spreads evenly. A replica is up for a worker when its PUSH socket can
take a message now: the sockets queue only to connected peers (``ZMQ_IMMEDIATE``),
so a replica that exited (its TCP connection closed) or whose queue is full
(``SNDHWM``, a busy replica) is skipped, and the request goes to the next
replica in its rendezvous order. A replica binds its TCP endpoint only once
its shard is loaded and warm, so "connected" also means "ready". The ingress
uses its heartbeat-based liveness instead (a replica is up when its heartbeat
is fresh and ready and the ingress's socket to it is connected).

Producers of a join agree exactly as long as they see the same replicas up;
around a replica's failure they may disagree for a moment, and the request's
parts then wait in two replicas until the part timeout or the deadline; the
ingress ends it (``UNAVAILABLE`` when the replica went down, retried once on a
live replica with a fresh request id, hence a fresh rendezvous order).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from pipeline import topology as topo
from pipeline.errors import TopologyError, UsageError

#: separates a shard's name from its replica number in a process name (``shard2@1``).
SEPARATOR = "@"
_MASK64 = (1 << 64) - 1


# --------------------------------------------------------------------- names
def process_name(shard: topo.ShardSpec, replica: int) -> str:
    """The process name of one replica: the shard's name alone when it has one replica, else ``shard@k``."""
    return shard.name if len(shard.replicas) == 1 else f"{shard.name}{SEPARATOR}{replica}"


def process_names(shard: topo.ShardSpec) -> list[str]:
    """The process names of every replica of ``shard``, replica 0 first."""
    return [process_name(shard, k) for k in range(len(shard.replicas))]


def discovered_name(shard: str, address: str) -> str:
    """The process name of a replica found by DNS (``replicas: {discover: dns}``): ``shard@<its address>``."""
    return f"{shard}{SEPARATOR}{address}"


def discovered(t: topo.Topology) -> dict[str, int]:
    """Shards whose replicas are found by resolving their endpoint's host name -> the replica count (pipeline.discovery)."""
    return {s.name: s.discovered for s in t.shards if s.discovered}


def discovered_shard(t: topo.Topology, process: str) -> tuple[str, str] | None:
    """(shard, address) of a discovered replica's process name (``shard2@10.0.0.5``); ``None`` for any other name."""
    shard, sep, address = process.partition(SEPARATOR)
    if not sep or not address:
        return None
    spec = next((s for s in t.shards if s.name == shard), None)
    return (shard, address) if spec is not None and spec.discovered else None


def replica_processes(t: topo.Topology) -> dict[str, tuple[str, int]]:
    """Every worker replica's process name -> (shard, replica number), in the topology's order."""
    return {process_name(s, k): (s.name, k) for s in t.shards for k in range(len(s.replicas))}


def shard_of(t: topo.Topology, process: str) -> tuple[str, int]:
    """(shard, replica) of a process name (``shard2`` or ``shard2@1``); raise :class:`TopologyError` if unknown."""
    found = replica_processes(t).get(process)
    if found is None:
        raise TopologyError(f"no shard replica named {process!r} in topology {t.name!r}; they are {list(replica_processes(t))}")
    return found


def replicated(t: topo.Topology) -> dict[str, int]:
    """Shards with more than one replica -> their replica count."""
    return {s.name: len(s.replicas) for s in t.shards if s.extra_replicas}


def for_replica(t: topo.Topology, shard: str, replica: int) -> topo.Topology:
    """The topology as replica ``replica`` of ``shard`` sees itself: its shard's endpoint, bind, host and metrics
    are the replica's (every other shard is unchanged)."""
    spec = t.shard(shard)
    if not 0 <= replica < len(spec.replicas):
        raise UsageError(
            f"shard {shard!r} has {len(spec.replicas)} replica(s) (0..{len(spec.replicas) - 1}); received --replica {replica}"
        )
    if replica == 0:
        return t
    r = spec.replicas[replica]
    mine = dataclasses.replace(spec, endpoint=r.endpoint, bind=r.bind, host=r.host, metrics=r.metrics)
    return t.replace(shards=tuple(mine if s.name == shard else s for s in t.shards))


# ----------------------------------------------------------------- validation
def validate(t: topo.Topology, where: str = topo.TOPOLOGY_FILE) -> None:
    """Every replica has an endpoint (and metrics address) no other process uses; a replicated shard runs alone."""
    endpoints: dict[str, str] = {t.ingress.results: "the ingress"}
    metrics: dict[str, str] = {t.ingress.metrics: "the ingress"} if t.ingress.metrics else {}
    for s in t.shards:
        endpoints.setdefault(s.endpoint, f"shard {s.name!r}")
        if s.metrics:
            metrics.setdefault(_address(s.metrics), f"shard {s.name!r}")
    for s in t.shards:
        for k, r in enumerate(s.replicas[1:], start=1):
            who = f"shard {s.name!r} replica {k}"
            topo.check_endpoint(r.endpoint, f"{where}: {who}")
            if urlsplit(r.endpoint).scheme != "tcp":
                raise TopologyError(f"{where}: {who} has endpoint {r.endpoint!r}; expected tcp://HOST:PORT (replicas are processes)")
            if r.endpoint in endpoints:
                raise TopologyError(
                    f"{where}: {who} has endpoint {r.endpoint!r}, which {endpoints[r.endpoint]} already uses; "
                    "expected an endpoint of its own for every replica"
                )
            endpoints[r.endpoint] = who
            if r.metrics:
                if _address(r.metrics) in metrics:
                    raise TopologyError(
                        f"{where}: {who} has metrics address {r.metrics!r}, which {metrics[_address(r.metrics)]} already uses; "
                        "expected a metrics address of its own for every replica"
                    )
                metrics[_address(r.metrics)] = who
        if s.discovered:
            parts = urlsplit(s.endpoint)
            if parts.scheme != "tcp" or not parts.hostname or parts.port is None or _is_ip(parts.hostname):
                raise TopologyError(
                    f"{where}: shard {s.name!r} has replicas: {{count: {s.discovered}, discover: dns}} and endpoint "
                    f"{s.endpoint!r}; expected tcp://NAME:PORT whose NAME resolves to every replica's address "
                    "(on Kubernetes, a headless Service)"
                )
        if s.extra_replicas or s.discovered:
            from pipeline import colocation

            owner = colocation.process_of(t, s.name)
            if len(owner.shards) > 1:
                raise TopologyError(
                    f"{where}: shard {s.name!r} has {len(s.replicas) if s.extra_replicas else s.discovered} replicas but shares process {owner.name!r} with "
                    f"{[x for x in owner.shards if x != s.name]}; expected a replicated shard in a process of its own"
                )


def _is_ip(host: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _address(metrics: str) -> str:
    return metrics.removeprefix("http://").strip().lower()


# ------------------------------------------------------------------- editing
def parse_counts(items: Iterable[str], t: topo.Topology | None = None) -> dict[str, int]:
    """``["shard2=3"]`` -> ``{"shard2": 3}``; raise :class:`UsageError` naming a bad item."""
    counts: dict[str, int] = {}
    for item in items:
        name, sep, raw = str(item).partition("=")
        try:
            n = int(raw) if sep else 0
        except ValueError:
            n = 0
            raw = repr(raw)
        if not sep or not name:
            raise UsageError(f"replicas {item!r}: expected SHARD=N, e.g. shard2=3")
        if n < 1:
            raise UsageError(f"replicas {item!r}: shard {name!r} needs at least 1 replica, received {raw}")
        if t is not None:
            t.shard(name)  # a clear error for an unknown shard
        counts[name] = n
    return counts


def with_replicas(
    t: topo.Topology,
    counts: Mapping[str, int],
    *,
    ports: Callable[[int, str], list[int]] | None = None,
    hosts: Mapping[str, Sequence[str]] | None = None,
) -> topo.Topology:
    """Set the replica count of shards; a new replica gets fresh ports (endpoint and metrics) on its shard's host,
    or on ``hosts[shard][k - 1]`` for replica ``k`` (an address); a smaller count keeps the first replicas, and
    so does a host list for the replicas already on the hosts it names. A shard that gets replicas leaves a
    ``processes:`` group it shared (each replica is a process of its own)."""
    if ports is None:
        ports = _ports_for(t)
    shards = []
    for s in t.shards:
        n = counts.get(s.name)
        where = list((hosts or {}).get(s.name, ()))
        if n is None or (n == len(s.replicas) and not where):
            shards.append(s)
            continue
        if n < 1:
            raise UsageError(f"shard {s.name!r} needs at least 1 replica, received {n}")
        if where and len(where) != n - 1:
            raise UsageError(f"shard {s.name!r}: {n} replicas need {n - 1} hosts besides the shard's own, received {where}")
        where = where or [s.host] * (n - 1)
        kept: list[topo.ReplicaSpec] = []
        for k, host in enumerate(where):
            if k < len(s.extra_replicas) and s.extra_replicas[k].host == host:
                kept.append(s.extra_replicas[k])
                continue
            port, metrics_port = ports(2, host)
            endpoint = f"tcp://{host}:{port}"
            kept.append(
                topo.ReplicaSpec(
                    endpoint=endpoint,
                    bind=topo.bind_address(endpoint),
                    host=host,
                    metrics=f"{host}:{metrics_port}" if s.metrics else "",
                )
            )
        shards.append(dataclasses.replace(s, extra_replicas=tuple(kept)))
    alone = {s.name for s in shards if s.extra_replicas}
    processes = tuple(
        dataclasses.replace(p, shards=tuple(x for x in p.shards if x not in alone))
        for p in t.processes
        if any(x not in alone for x in p.shards)
    )
    out = t.replace(shards=tuple(shards), processes=processes)
    validate(out, str(t.directory / topo.TOPOLOGY_FILE))
    return out


def _ports_for(t: topo.Topology) -> Callable[[int, str], list[int]]:
    """Free ports on this machine for a loopback host; above every port the topology uses for another host."""
    from pipeline.launch import free_ports

    used = [_port(e) for e in [t.ingress.results, t.ingress.grpc, t.ingress.metrics]]
    used += [_port(x) for s in t.shards for r in s.replicas for x in (r.endpoint, r.metrics)]
    state = {"next": max([p for p in used if p], default=20000) + 1}

    def ports(count: int, host: str) -> list[int]:
        if topo.is_loopback(host):
            return free_ports(count, host)
        first = state["next"]
        state["next"] += count
        return list(range(first, first + count))

    return ports


def _port(address: str) -> int:
    if not address:
        return 0
    try:
        return int(urlsplit(address if "//" in address else f"//{address}").port or 0)
    except ValueError:
        return 0


# ------------------------------------------------------------------- routing
def _mix64(x: int) -> int:
    """splitmix64's finaliser: a well-spread 64-bit weight from a 64-bit input."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def replica_key(name: str) -> int:
    """A stable 64-bit key of a replica's name (the same in every process: no Python hash randomisation)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def rendezvous_order(request_id: int, keys: Sequence[int]) -> list[int]:
    """Indexes of ``keys`` from the highest rendezvous weight for ``request_id`` to the lowest."""
    rid = request_id & _MASK64
    return sorted(range(len(keys)), key=lambda i: _mix64(rid ^ keys[i]), reverse=True)


class Router:
    """Picks the replica of one consumer shard for a request: rendezvous hashing over the replicas that are up.

    ``names`` are the replicas' process names (their keys are what every producer hashes, so they must be the
    same in every process: the topology's names). ``is_up(i)`` says whether replica ``i`` can take a message now.
    """

    def __init__(self, names: Sequence[str]) -> None:
        if not names:
            raise ValueError("a router needs at least one replica")
        self.names = list(names)
        self._keys = [replica_key(n) for n in self.names]
        self.sent = [0] * len(self.names)  # messages routed to each replica (for metrics and tests)

    def order(self, request_id: int) -> list[int]:
        """Every replica, the preferred one for ``request_id`` first."""
        if len(self._keys) == 1:
            return [0]
        return rendezvous_order(request_id, self._keys)

    def pick(self, request_id: int, is_up: Callable[[int], bool]) -> int | None:
        """The first replica in ``request_id``'s rendezvous order that is up; ``None`` when none is."""
        for i in self.order(request_id):
            if is_up(i):
                return i
        return None


# ------------------------------------------------------------------- command
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, metavar="DIR", help="a topology directory")
    p.add_argument(
        "counts",
        nargs="+",
        metavar="SHARD=N|SHARD=HOST,...",
        help="the number of replicas of a shard, e.g. shard2=3; on a topology placed on a cluster, also the hosts "
        "of the replicas added to the shard's own, e.g. shard2=h2,h3",
    )


def run(args: argparse.Namespace) -> int:
    """``pipeline replicas DIR shard2=3``: set replica counts in an existing topology (new replicas get free ports;
    on a placed topology, on the hosts :mod:`pipeline.partition.replica_placement` chooses or the item names)."""
    from pipeline.cluster import cluster_of
    from pipeline.partition import replica_placement

    t = topo.load(args.directory, check_files=False)
    cluster = cluster_of(t)
    requests = replica_placement.parse(args.counts, t, cluster)
    counts = {shard: r.count for shard, r in requests.items()}
    addresses = {h.address for h in cluster.hosts} if cluster is not None else set()
    if cluster is not None and all(s.host in addresses for s in t.shards):
        # a placed topology: the new replicas' hosts are chosen (or named) as `pipeline place --replicas` does
        own = [cluster.host(s.host).name for s in t.shards]
        chosen, _ = replica_placement.plan_replicas(t, cluster, own, requests)
        out = with_replicas(t, counts, hosts={s: [cluster.host(h).address for h in chosen[s]] for s in requests})
    else:
        out = with_replicas(t, counts)
    out.write(args.directory)
    for name, (shard, k) in replica_processes(out).items():
        if len(out.shard(shard).replicas) > 1:
            print(f"{name}: pipeline worker {args.directory} --shard {shard} --replica {k}")
    return 0


#: ids the ingress draws at most for one attempt (one replica of two down: one in 2**-31 needs more).
MAX_ID_TRIES = 32


def choose_id(
    next_id: Callable[[], int],
    routers: Iterable[Router],
    is_up: Callable[[str], bool],
    load: Callable[[str], float] | None = None,
    tries: int = MAX_ID_TRIES,
) -> int:
    """A request id whose first rendezvous choice is up for every replicated shard (the ingress's liveness), and
    with ``load``, the less loaded of two such ids (power of two choices: the sum of the chosen replicas' loads).

    The producers after the ingress route by the first choice alone, so the ingress, which hears every replica's
    heartbeats, decides through the id; after ``tries`` ids it returns the last one (its request then fails with
    a retryable ``UNAVAILABLE`` at a producer that cannot reach the replica).
    """
    routers = [r for r in routers if len(r.names) > 1]
    if not routers:
        return next_id()
    found: list[tuple[float, int]] = []
    rid = 0
    for _ in range(tries):
        rid = next_id()
        chosen = [r.names[r.order(rid)[0]] for r in routers]
        if all(is_up(name) for name in chosen):
            if load is None:
                return rid
            found.append((sum(load(name) for name in chosen), rid))
            if len(found) == 2:
                break
    return min(found)[1] if found else rid


#: how a worker's ERROR names the replica it could not reach (the ingress counts it down: ``suspect``).
UNREACHABLE = "cannot reach replica {name!r}"
_UNREACHABLE_RE = re.compile(r"cannot reach replica '([^']+)'")


def unreachable_in(message: str) -> str | None:
    """The replica an ERROR message says a worker could not reach (``UNREACHABLE``), or ``None``."""
    found = _UNREACHABLE_RE.search(message)
    return found.group(1) if found else None


#: a producer's sockets to replicas retry a connection this often (ms): a replica that binds once warm, or
#: restarts, is reachable from every producer within it (ZeroMQ's default backs off to the topology's 1 s).
RECONNECT_MS = 100


# ----------------------------------------------------------------- processes
def expand(t: topo.Topology, names: Iterable[str]) -> list[str]:
    """Process names (``colocation.process_names_on``) with every replicated shard replaced by its replicas."""
    out: list[str] = []
    for name in names:
        spec = next((s for s in t.shards if s.name == name), None)
        out += process_names(spec) if spec is not None and spec.extra_replicas else [name]
    return out


def processes_on(t: topo.Topology, host: str | None) -> list[str]:
    """Process names placed on ``host`` (every one for ``None``), each replica of a replicated shard on its own
    replica's host: the ingress first, then the worker processes and replicas in the topology's order."""
    from pipeline import colocation

    here = set(colocation.process_names_on(t, host))
    out: list[str] = []
    for name in colocation.process_names_on(t, None):
        spec = next((s for s in t.shards if s.name == name), None)
        if spec is not None and spec.extra_replicas:
            out += [n for n, r in zip(process_names(spec), spec.replicas) if host is None or r.host == host]
        elif name in here:
            out.append(name)
    return out


def hosts_of(t: topo.Topology) -> list[str]:
    """Every host a process of ``t`` is placed on (the ingress's, every shard's and every replica's), sorted."""
    return sorted({t.ingress.host, *(r.host for s in t.shards for r in s.replicas)})


def worker_selector(t: topo.Topology, name: str) -> list[str] | None:
    """``--shard S --replica K`` for a replica's process name (``S@K``); ``None`` for any other name."""
    if SEPARATOR not in name:
        return None
    shard, k = shard_of(t, name)
    return ["--shard", shard, "--replica", str(k)]


# ------------------------------------------------------------------ liveness
def liveness(t: topo.Topology, down_after_s: float) -> ReplicaLiveness:
    """The ingress's liveness of every replica, a shard being up while one of its replicas is."""
    return ReplicaLiveness({s.name: [] if s.discovered else process_names(s) for s in t.shards}, down_after_s)


def _liveness_base() -> type:
    from pipeline.serving.pending import Liveness

    return Liveness


class ReplicaLiveness(_liveness_base()):  # type: ignore[misc]
    """:class:`pipeline.serving.pending.Liveness` over replica process names, with ``not_up``/``all_up`` per shard.

    ``is_up``, ``beat``, ``went_down`` and the metrics speak of replicas (``shard2@1``); a shard is up when at least
    one of its replicas is up (fresh ready heartbeat, connected), and ``not_up`` names each replica's reason.
    """

    def __init__(self, groups: Mapping[str, Sequence[str]], down_after_s: float) -> None:
        super().__init__([name for names in groups.values() for name in names], down_after_s)
        self.groups = {shard: list(names) for shard, names in groups.items()}
        #: replica -> until when (monotonic s) it counts as down: a worker reported it could not reach it
        self._suspect: dict[str, float] = {}

    def add(self, shard: str, name: str) -> None:
        """A replica found at run time (``shard@address``, replicas found by DNS) joins ``shard``'s group."""
        if name in self._state:
            return
        from pipeline.serving.pending import ShardState

        self._state[name] = ShardState()
        self._was_up[name] = False
        self.groups.setdefault(shard, []).append(name)

    def forget(self, name: str) -> None:
        """Drop a replica found at run time that has been gone for long (a replaced pod's old address)."""
        self._state.pop(name, None)
        self._was_up.pop(name, None)
        self._suspect.pop(name, None)
        for names in self.groups.values():
            if name in names:
                names.remove(name)

    def down_since(self, name: str, now: float | None = None) -> float:
        """Seconds since replica ``name`` was last heard (0 while it is up)."""
        now = time.monotonic() if now is None else now
        if self.is_up(name, now):
            return 0.0
        last = self._state[name].last_seen
        return now - last if last else float("inf")

    def suspect(self, name: str, now: float | None = None) -> None:
        """A producer could not reach replica ``name``: count it down for ``down_after_s`` (its heartbeats may still
        be fresh, e.g. while a restarted replica's producers reconnect, or just before its heartbeats stop)."""
        if self.knows(name):
            self._suspect[name] = (time.monotonic() if now is None else now) + self.down_after_s

    def is_up(self, shard: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        if self._suspect.get(shard, 0.0) > now:
            return False
        return super().is_up(shard, now)

    def went_down(self, now: float | None = None) -> list[str]:
        """Replicas that stopped being up by their heartbeats or connection (edge-triggered); a suspect replica
        does not end the requests in flight (those sent to it fail at the producer and are retried)."""
        now = time.monotonic() if now is None else now
        saved, self._suspect = self._suspect, {}
        try:
            return super().went_down(now)
        finally:
            self._suspect = saved

    def replicas_not_up(self, now: float | None = None) -> dict[str, str]:
        """Every replica that is not up, with its reason."""
        now = time.monotonic() if now is None else now
        reasons = super().not_up(now)
        for name, until in self._suspect.items():
            if until > now and name not in reasons:
                reasons[name] = "a producer could not reach it"
        return reasons

    def not_up(self, now: float | None = None) -> dict[str, str]:
        """Shards none of whose replicas is up, each with the reason (per replica when it has several); a suspicion
        only steers routing, it does not take a shard out of the ingress's readiness."""
        reasons = super().not_up(now)
        out: dict[str, str] = {}
        for shard, names in self.groups.items():
            if not names:  # replicas found by DNS, none heard from yet
                out[shard] = "no replica has sent a heartbeat yet"
            elif all(n in reasons for n in names):
                out[shard] = reasons[names[0]] if len(names) == 1 else "; ".join(f"{n}: {reasons[n]}" for n in names)
        return out


def metrics_of(t: topo.Topology, process: str) -> str:
    """The metrics address the topology records for a replica's process name (``shard2`` or ``shard2@1``); for a
    replica found by DNS (``shard2@10.0.0.5``), its address at the shard's metrics port."""
    found = discovered_shard(t, process)
    if found is not None:
        metrics = t.shard(found[0]).metrics
        port = metrics.rpartition(":")[2] if metrics else ""
        host = f"[{found[1]}]" if ":" in found[1] else found[1]
        return f"{host}:{port}" if port else ""
    shard, k = shard_of(t, process)
    return t.shard(shard).replicas[k].metrics
