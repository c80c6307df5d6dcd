"""The cluster file: the hosts a pipeline runs on, the ingress's host, and the links between them.

Read once into frozen dataclasses and checked as a whole, so a typo fails at
``pipeline partition`` with a message naming the field, not at run time::

    version: 1
    hosts:
    - {name: edge, address: 198.18.0.1, speed: 1.0}
    - {name: cloud, address: 198.18.0.2, speed: 4.0}
    ingress: edge
    links:
      default: {bandwidth: 1Gbit, latency: 0.1ms}
      pairs:
      - {between: [edge, cloud], bandwidth: 100Mbit, latency: 5ms}

Bandwidth is in bits per second and needs a unit (``bit``, ``kbit``, ``Mbit``,
``Gbit``, ``Tbit``; the prefix is case-insensitive, as in ``tc``); latency is
one way, with a unit (``s``, ``ms``, ``us``/``µs``, ``ns``). A link is the same
in both directions. A topology placed on a cluster records it under
``cluster:`` in ``topology.yaml``; a process's ``host`` there is the host's
address, and :func:`host_names` maps it back to the host's name.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ClusterError

CLUSTER_VERSION = 1

#: bits per second per unit (``tc`` spells them the same way, case-insensitively).
BANDWIDTH_UNITS: dict[str, float] = {"bit": 1.0, "kbit": 1e3, "mbit": 1e6, "gbit": 1e9, "tbit": 1e12}
#: units per second (dividing by these keeps 0.1ms exactly 1e-4 s).
LATENCY_UNITS: dict[str, float] = {"s": 1.0, "ms": 1e3, "us": 1e6, "µs": 1e6, "ns": 1e9}

#: one hop between two processes costs at least this much whatever the bytes: waking the receiving
#: process (measured on the reference machine, docs/BENCHMARKS.md: 170-280 µs one way for 100 bytes
#: between two idle pyzmq processes, over TCP loopback or ipc alike).
HOP_FLOOR_S = 0.2e-3
#: what a same-host (loopback) hop moves per second beyond that floor: the same measurement gives
#: 520-640 µs for 800 KB, about 2 GB/s (16 Gbit/s) once the floor is taken off.
LOOPBACK_BANDWIDTH_BPS = 16e9

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_QUANTITY = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([A-Za-zµ]*)\s*$")


@dataclass(frozen=True)
class Host:
    """A machine: its name, the address the others reach it at, and its relative compute speed."""

    name: str
    address: str
    speed: float = 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "address": self.address, "speed": self.speed}


@dataclass(frozen=True)
class Link:
    """A link's bandwidth (bits per second) and one-way latency (seconds)."""

    bandwidth_bps: float
    latency_s: float = 0.0

    @property
    def bytes_per_s(self) -> float:
        return self.bandwidth_bps / 8.0

    def transfer_s(self, nbytes: float) -> float:
        """Seconds the link is busy with ``nbytes`` (what bounds the throughput over it)."""
        return nbytes / self.bytes_per_s

    def hop_s(self, nbytes: float) -> float:
        """Seconds from send to receipt of ``nbytes``: the hop floor, the bytes on the wire, the latency."""
        return HOP_FLOOR_S + self.transfer_s(nbytes) + self.latency_s

    def to_dict(self) -> dict[str, Any]:
        return {"bandwidth": format_bandwidth(self.bandwidth_bps), "latency": format_latency(self.latency_s)}


#: the link between two processes on the same host.
LOOPBACK = Link(bandwidth_bps=LOOPBACK_BANDWIDTH_BPS, latency_s=0.0)


@dataclass(frozen=True)
class Cluster:
    """The hosts (in file order), the ingress's host, the default link and the per-pair overrides."""

    hosts: tuple[Host, ...]
    ingress: str  # a host name
    default_link: Link
    pairs: tuple[tuple[str, str, Link], ...] = ()
    source: str = "cluster.yaml"

    # ------------------------------------------------------------- lookups
    @property
    def names(self) -> list[str]:
        return [h.name for h in self.hosts]

    def host(self, name_or_address: str) -> Host:
        """A host by name or by address; :class:`ClusterError` listing the hosts when there is none."""
        for h in self.hosts:
            if name_or_address in (h.name, h.address):
                return h
        raise ClusterError(
            f"unknown host {name_or_address!r}; the hosts are {self.names} "
            f"(addresses {[h.address for h in self.hosts]})"
        )

    def index(self, name: str) -> int:
        return self.names.index(self.host(name).name)

    @property
    def ingress_host(self) -> Host:
        return self.host(self.ingress)

    def link(self, a: str, b: str) -> Link:
        """The link between hosts ``a`` and ``b`` (names); loopback when they are the same host."""
        if a == b:
            return LOOPBACK
        for x, y, link in self.pairs:
            if {x, y} == {a, b}:
                return link
        return self.default_link

    # ------------------------------------------------------------ (de)serialise
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": CLUSTER_VERSION,
            "hosts": [h.to_dict() for h in self.hosts],
            "ingress": self.ingress,
            "links": {
                "default": self.default_link.to_dict(),
                "pairs": [{"between": [a, b], **link.to_dict()} for a, b, link in self.pairs],
            },
        }


# ------------------------------------------------------------------- loading
def load_cluster(path: str | Path) -> Cluster:
    """Read and check a cluster file; :class:`ClusterError` names the file and the field when it is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ClusterError(f"cluster file {str(path)!r} does not exist (expected a YAML file; format in docs/MULTIHOST.md)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ClusterError(f"{path}: not valid YAML: {exc}") from exc
    return cluster_from_dict(data, source=path.name)


def cluster_from_dict(data: Any, source: str = "cluster.yaml") -> Cluster:
    """Check a parsed cluster file (``source`` names it in errors) into a :class:`Cluster`."""
    if not isinstance(data, Mapping):
        raise ClusterError(f"{source}: expected a mapping with version, hosts, ingress and links; received {_kind(data)}")
    _no_unknown(data, {"version", "hosts", "ingress", "links"}, source, "")
    if "version" not in data:
        raise ClusterError(f"{source}: version: missing; expected version: {CLUSTER_VERSION}")
    if data["version"] != CLUSTER_VERSION or isinstance(data["version"], bool):
        raise ClusterError(f"{source}: version: expected {CLUSTER_VERSION}, received {data['version']!r}")
    hosts = _hosts(data.get("hosts"), source)
    names = [h.name for h in hosts]

    def known(value: Any, field: str) -> str:
        if not isinstance(value, str) or not value:
            raise ClusterError(f"{source}: {field}: expected a host name, received {value!r}; the hosts are {names}")
        for h in hosts:
            if value in (h.name, h.address):
                return h.name
        raise ClusterError(f"{source}: {field}: unknown host {value!r}; the hosts are {names}")

    if "ingress" not in data:
        raise ClusterError(f"{source}: ingress: missing; expected the name of the host clients connect to, one of {names}")
    ingress = known(data["ingress"], "ingress")
    links = data.get("links")
    if not isinstance(links, Mapping):
        raise ClusterError(
            f"{source}: links: expected a mapping with a default link, e.g. links: {{default: {{bandwidth: 1Gbit, latency: 0.1ms}}}}; "
            f"received {_kind(links)}"
        )
    _no_unknown(links, {"default", "pairs"}, source, "links.")
    if "default" not in links:
        raise ClusterError(
            f"{source}: links.default: missing; expected the link between hosts that no pair names, "
            "e.g. default: {bandwidth: 1Gbit, latency: 0.1ms}"
        )
    default = _link(links["default"], source, "links.default")
    pairs: list[tuple[str, str, Link]] = []
    seen: dict[frozenset[str], int] = {}
    raw_pairs = links.get("pairs") or []
    if not isinstance(raw_pairs, list):
        raise ClusterError(f"{source}: links.pairs: expected a list of {{between: [A, B], bandwidth, latency}}; received {_kind(raw_pairs)}")
    for i, p in enumerate(raw_pairs):
        where = f"links.pairs[{i}]"
        if not isinstance(p, Mapping):
            raise ClusterError(f"{source}: {where}: expected a mapping {{between: [A, B], bandwidth, latency}}; received {_kind(p)}")
        between = p.get("between")
        if not isinstance(between, list) or len(between) != 2:
            raise ClusterError(f"{source}: {where}.between: expected a list of two host names, received {between!r}")
        a, b = known(between[0], f"{where}.between"), known(between[1], f"{where}.between")
        if a == b:
            raise ClusterError(f"{source}: {where}.between: names host {a!r} twice; a link joins two different hosts")
        key = frozenset((a, b))
        if key in seen:
            raise ClusterError(f"{source}: {where}.between: the link between {a!r} and {b!r} is already set by links.pairs[{seen[key]}]")
        seen[key] = i
        pairs.append((a, b, _link({k: v for k, v in p.items() if k != "between"}, source, where)))
    return Cluster(hosts=tuple(hosts), ingress=ingress, default_link=default, pairs=tuple(pairs), source=source)


def _hosts(raw: Any, source: str) -> list[Host]:
    if not isinstance(raw, list) or not raw:
        raise ClusterError(f"{source}: hosts: expected a non-empty list of {{name, address, speed}}; received {_kind(raw)}")
    hosts: list[Host] = []
    by_name: dict[str, int] = {}
    by_address: dict[str, int] = {}
    for i, h in enumerate(raw):
        where = f"hosts[{i}]"
        if not isinstance(h, Mapping):
            raise ClusterError(f"{source}: {where}: expected a mapping {{name, address, speed}}; received {_kind(h)}")
        _no_unknown(h, {"name", "address", "speed"}, source, f"{where}.")
        name = h.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise ClusterError(
                f"{source}: {where}.name: expected a name of letters, digits, '_', '.' or '-'; received {name!r}"
            )
        address = h.get("address")
        if not isinstance(address, str) or not address or not _valid_address(address):
            raise ClusterError(
                f"{source}: {where}.address: expected the IP address or DNS name the other hosts reach {name!r} at; "
                f"received {address!r}"
            )
        speed = h.get("speed", 1.0)
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not speed > 0 or speed == float("inf"):
            raise ClusterError(f"{source}: {where}.speed: expected a positive number (relative compute speed, default 1.0); received {speed!r}")
        if name in by_name:
            raise ClusterError(f"{source}: {where}.name: {name!r} is also the name of hosts[{by_name[name]}]; host names must be unique")
        if address in by_address:
            raise ClusterError(
                f"{source}: {where}.address: {address!r} is also the address of hosts[{by_address[address]}]; "
                "host addresses must be unique (one entry per machine)"
            )
        by_name[name] = i
        by_address[address] = i
        hosts.append(Host(name=name, address=address, speed=float(speed)))
    return hosts


def _link(raw: Any, source: str, where: str) -> Link:
    if not isinstance(raw, Mapping):
        raise ClusterError(f"{source}: {where}: expected a mapping {{bandwidth: 1Gbit, latency: 0.1ms}}; received {_kind(raw)}")
    _no_unknown(raw, {"bandwidth", "latency"}, source, f"{where}.")
    if "bandwidth" not in raw:
        raise ClusterError(f"{source}: {where}.bandwidth: missing; expected bits per second with a unit, e.g. 100Mbit or 1Gbit")
    bandwidth = parse_bandwidth(raw["bandwidth"], f"{source}: {where}.bandwidth")
    latency = parse_latency(raw.get("latency", "0ms"), f"{source}: {where}.latency")
    return Link(bandwidth_bps=bandwidth, latency_s=latency)


def parse_bandwidth(value: Any, where: str = "bandwidth") -> float:
    """``100Mbit`` -> 1e8 (bits per second); a number without a unit or an unknown unit is an error."""
    units = "bit, kbit, Mbit, Gbit, Tbit"
    if isinstance(value, bool) or isinstance(value, (int, float)):
        raise ClusterError(f"{where}: {value!r} has no unit; expected bits per second with a unit ({units}), e.g. {value}Mbit")
    m = _QUANTITY.match(str(value))
    if not m:
        raise ClusterError(f"{where}: expected a positive number with a unit ({units}), e.g. 100Mbit; received {value!r}")
    number, unit = float(m.group(1)), m.group(2)
    if not unit:
        raise ClusterError(f"{where}: {value!r} has no unit; expected bits per second with a unit ({units}), e.g. {value}Mbit")
    factor = BANDWIDTH_UNITS.get(unit.lower())
    if factor is None:
        hint = " (bandwidth is in bits per second: write 800Mbit for 100 MB/s)" if unit.lower().endswith(("bps", "b", "byte", "bytes")) else ""
        raise ClusterError(f"{where}: unknown unit {unit!r} in {value!r}; expected one of {units}{hint}")
    if number <= 0:
        raise ClusterError(f"{where}: expected a bandwidth above zero, received {value!r}")
    return number * factor


def parse_latency(value: Any, where: str = "latency") -> float:
    """``5ms`` -> 0.005 (seconds); zero is allowed, a missing or unknown unit is an error."""
    units = "s, ms, us, ns"
    if isinstance(value, bool) or isinstance(value, (int, float)):
        if value == 0 and not isinstance(value, bool):
            return 0.0
        raise ClusterError(f"{where}: {value!r} has no unit; expected a time with a unit ({units}), e.g. {value}ms")
    text = str(value).strip()
    if text.startswith("-"):
        raise ClusterError(f"{where}: expected a latency of zero or more, received {value!r}")
    m = _QUANTITY.match(text)
    if not m:
        raise ClusterError(f"{where}: expected a number with a unit ({units}), e.g. 0.1ms; received {value!r}")
    number, unit = float(m.group(1)), m.group(2)
    if not unit and number == 0:
        return 0.0
    if not unit:
        raise ClusterError(f"{where}: {value!r} has no unit; expected a time with a unit ({units}), e.g. {value}ms")
    per_second = LATENCY_UNITS.get(unit)
    if per_second is None:
        raise ClusterError(f"{where}: unknown unit {unit!r} in {value!r}; expected one of {units}")
    return number / per_second


def format_bandwidth(bps: float) -> str:
    for unit, factor in (("Tbit", 1e12), ("Gbit", 1e9), ("Mbit", 1e6), ("kbit", 1e3)):
        if bps >= factor:
            return f"{bps / factor:g}{unit}"
    return f"{bps:g}bit"


def format_latency(seconds: float) -> str:
    if seconds == 0:
        return "0ms"
    if seconds >= 1:
        return f"{seconds:g}s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:g}ms"
    return f"{seconds * 1e6:g}us"


def _valid_address(address: str) -> bool:
    try:
        ipaddress.ip_address(address)
        return True
    except ValueError:
        return bool(re.match(r"^[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*$", address))


def _no_unknown(data: Mapping[str, Any], allowed: set[str], source: str, prefix: str) -> None:
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise ClusterError(f"{source}: {prefix}{unknown[0]}: unknown field; expected only {sorted(allowed)}")


def _kind(value: Any) -> str:
    return "nothing" if value is None else f"{type(value).__name__} {value!r}"


# --------------------------------------------------------- in a topology
#: the key of the cluster section in ``topology.yaml``.
TOPOLOGY_KEY = "cluster"


def cluster_of(topology: Any) -> Cluster | None:
    """The cluster a topology was placed on (its ``cluster:`` section), or ``None`` for older topologies."""
    data = topology.extra.get(TOPOLOGY_KEY)
    if not data:
        return None
    return cluster_from_dict(data, source=f"{topology.directory / 'topology.yaml'} cluster")


def host_names(topology: Any, cluster: Cluster | None = None) -> dict[str, str]:
    """Process name -> host name, from each process's address (the address itself where no host has it); a
    replicated shard's name maps to its first replica's host, and each replica's name (``shard2@1``) to its own."""
    from pipeline.topology import INGRESS

    cluster = cluster if cluster is not None else cluster_of(topology)
    by_address = {h.address: h.name for h in cluster.hosts} if cluster else {}
    names = {INGRESS: by_address.get(topology.ingress.host, topology.ingress.host)}
    for s in topology.shards:
        names[s.name] = by_address.get(s.host, s.host)
        if s.extra_replicas:  # every replica's process (shard2@1), each on its own host
            for k, r in enumerate(s.replicas):
                names[f"{s.name}@{k}"] = by_address.get(r.host, r.host)
    return names


def address_of(topology: Any, host: str) -> str:
    """The address of the cluster host named ``host`` in ``topology``; ``host`` itself when no host has that name."""
    cluster = cluster_of(topology)
    if cluster is not None:
        for h in cluster.hosts:
            if host == h.name:
                return h.address
    return host


def resolve_host(topology: Any, host: str) -> str:
    """The address a ``--host`` value names in ``topology``: a cluster host's name or address, or a process address."""
    cluster = cluster_of(topology)
    addresses = sorted({topology.ingress.host, *(r.host for s in topology.shards for r in s.replicas)})
    if cluster is not None:
        for h in cluster.hosts:
            if host in (h.name, h.address):
                return h.address
    if host in addresses:
        return host
    from pipeline.errors import UsageError

    if cluster is not None:
        listed = [f"{h.name} ({h.address})" for h in cluster.hosts]
        raise UsageError(f"--host {host!r}: no such host in topology {topology.name!r}; its hosts are {listed}")
    raise UsageError(f"--host {host!r}: no process of topology {topology.name!r} is placed there; its hosts are {addresses}")



def worker_process_namer(cluster: Cluster) -> Callable[[str, int], str]:
    """Names the one worker process of each host after the host (``workers-edge``), for co-located topologies."""
    by_address = {h.address: h.name for h in cluster.hosts}
    return lambda address, _count: f"workers-{by_address.get(address, address)}"
