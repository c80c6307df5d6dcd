"""Replicas of a shard found by DNS: ``replicas: {count: N, discover: dns}`` (a headless Service on Kubernetes).

The topology names one endpoint, ``tcp://NAME:PORT``, and NAME resolves to
the address of every replica that is ready (a headless Service with
``publishNotReadyAddresses: false`` lists only ready pods). A replica's process
name is ``shard@<its address>`` (``pipeline worker --replica-address``, the pod
IP from the downward API).

Who knows what:

- the **ingress** hears every replica's heartbeats, so it learns the replicas
  from them (no DNS needed) and chooses one replica per request for every
  discovered shard, the least loaded of those up; it writes the choice into
  the request's envelope (``Envelope.routes``: shard -> address);
- every **worker** copies ``routes`` into what it sends on, and sends a
  discovered shard's part to exactly the replica named there. It resolves NAME
  every heartbeat interval in a thread of its own (:class:`Watcher`) and keeps
  one PUSH socket per address (:class:`Peers`: connect the new, close the
  gone), so it is connected before the ingress routes anything there; an
  address it has not resolved yet is connected on demand. A replica it cannot
  reach (not connected, queue full) answers the request with the usual
  ``cannot reach replica 'shard@addr'`` ``UNAVAILABLE``: the ingress counts
  that replica down for a while and retries the request once on another.
- Workers report in their heartbeats which replicas they are connected to
  (``reach.shard@addr``), and the ingress routes a request to a replica only
  when every producer of that shard reaches it: a pod that has just become
  ready gets traffic once its producers have resolved and connected to it.

Since every part of a request follows the ingress's choice, producers whose
DNS views differ for a moment (one resolved a new pod, another not yet) never
split a join.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import zmq

from pipeline import replicas
from pipeline.log import get_logger
from pipeline.wire import sockets

log = get_logger("pipeline.discovery")

#: a resolver: (host name, port) -> the addresses it resolves to now (empty when the name does not exist).
Resolver = Callable[[str, int], list[str]]
#: heartbeat stats key prefix by which a worker says it is connected to a discovered replica.
REACH_PREFIX = "reach."
#: a discovered replica the ingress has not heard from for this long is forgotten (a replaced pod's old address).
FORGET_AFTER_S = 30.0


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to now (IPv4 and IPv6, sorted); empty when the name does not exist.

    Other failures (no DNS server answering) raise :class:`OSError`: the caller keeps its previous view.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        if exc.errno in (socket.EAI_NONAME, getattr(socket, "EAI_NODATA", socket.EAI_NONAME)):
            return []
        raise
    return sorted({str(info[4][0]) for info in infos})


@dataclass(frozen=True)
class Change:
    """What one resolution changed: addresses that appeared, addresses that went."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.added or self.removed)


def diff(old: Iterable[str], new: Iterable[str]) -> Change:
    """The addresses ``new`` adds to ``old`` and those it drops, each sorted."""
    before, after = set(old), set(new)
    return Change(tuple(sorted(after - before)), tuple(sorted(before - after)))


def endpoint_at(endpoint: str, address: str) -> str:
    """``tcp://NAME:PORT`` with NAME replaced by ``address`` (an IPv6 address in brackets)."""
    port = urlsplit(endpoint).port
    host = f"[{address}]" if ":" in address else address
    return f"tcp://{host}:{port}"


def name_and_port(endpoint: str) -> tuple[str, int]:
    parts = urlsplit(endpoint)
    assert parts.hostname is not None and parts.port is not None, endpoint
    return parts.hostname, parts.port


class Peers:
    """One discovered shard as a producer sees it: one PUSH socket per replica address.

    ``open_socket(endpoint)`` makes a connected PUSH socket (the caller's bounds, CURVE and reconnect options).
    """

    def __init__(self, shard: str, endpoint: str, open_socket: Callable[[str], zmq.Socket]) -> None:
        self.shard = shard
        self.endpoint = endpoint
        self.host, self.port = name_and_port(endpoint)
        self._open = open_socket
        self.sockets: dict[str, zmq.Socket] = {}
        self.resolved: tuple[str, ...] = ()
        self.sent: dict[str, int] = {}  # messages sent to each address (heartbeat stats, tests)

    def apply(self, addresses: Iterable[str]) -> Change:
        """Follow a resolution: connect to the new addresses, close the sockets of those gone."""
        change = diff(self.sockets, addresses)
        self.resolved = tuple(sorted(set(addresses)))
        for address in change.added:
            self.socket(address)
        for address in change.removed:
            sock = self.sockets.pop(address)
            sock.close(linger=0)
        if change:
            log.info("replicas_resolved", shard=self.shard, name=self.host, added=list(change.added), removed=list(change.removed))
        return change

    def socket(self, address: str) -> zmq.Socket:
        """The PUSH socket to ``address``, connected now if it was not (an address routed before it resolved here)."""
        sock = self.sockets.get(address)
        if sock is None:
            sock = self.sockets[address] = self._open(endpoint_at(self.endpoint, address))
        return sock

    def name(self, address: str) -> str:
        return replicas.discovered_name(self.shard, address)

    def connected(self, address: str) -> bool:
        """The socket to ``address`` takes a message now (connected, queue not full)."""
        sock = self.sockets.get(address)
        return sock is not None and sockets.takes_message(sock)

    def pick(self, request_id: int, prefer: str = "") -> str | None:
        """``prefer`` when it takes a message now, else the first connected address in the id's rendezvous order."""
        if prefer and self.connected(prefer):
            return prefer
        addresses = sorted(self.sockets)
        order = replicas.rendezvous_order(request_id, [replicas.replica_key(self.name(a)) for a in addresses])
        return next((addresses[i] for i in order if self.connected(addresses[i])), None)

    def reach(self) -> dict[str, float]:
        """Heartbeat stats: ``reach.shard@addr`` = 1 for every replica this producer is connected to."""
        return {f"{REACH_PREFIX}{self.name(a)}": 1.0 for a in sorted(self.sockets) if self.connected(a)}

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close(linger=0)
        self.sockets.clear()


class Watcher(threading.Thread):
    """Resolves host names every ``interval_s`` in a thread of its own (a lookup may block for seconds); the
    network loop takes the latest views with :meth:`latest` and never waits for DNS."""

    def __init__(self, names: Iterable[tuple[str, int]], interval_s: float, resolver: Resolver = resolve) -> None:
        super().__init__(name="dns-watcher", daemon=True)
        self.names = sorted(set(names))
        self.interval_s = interval_s
        self.resolver = resolver
        self._views: dict[tuple[str, int], tuple[str, ...]] = {}
        self._version = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.failures = 0

    def resolve_once(self) -> None:
        for key in self.names:
            try:
                view = tuple(self.resolver(*key))
            except OSError as exc:  # no answer: keep the previous view
                self.failures += 1
                log.warning("dns_failed", name=key[0], detail=str(exc))
                continue
            with self._lock:
                if self._views.get(key) != view:
                    self._views[key] = view
                    self._version += 1

    def run(self) -> None:
        while not self._stop.is_set():
            self.resolve_once()
            self._stop.wait(self.interval_s)

    def latest(self) -> tuple[int, dict[tuple[str, int], tuple[str, ...]]]:
        """(a version that changes with every new view, name -> its latest addresses)."""
        with self._lock:
            return self._version, dict(self._views)

    def stop(self) -> None:
        self._stop.set()


#: replicas of one discovered shard the ingress follows at most, per replica the topology counts (a rolling
#: update's surge, replaced pods not yet forgotten, a scaled-up Deployment), and at least MIN_FOLLOWED.
FOLLOW_FACTOR = 4
MIN_FOLLOWED = 16


def admissible(address: str, followed: int, count: int) -> str:
    """Why a heartbeat from a new discovered replica at ``address`` is not followed ("" when it is): its address
    must be an IP address (the pod IP), and the ingress follows a bounded number of replicas per shard."""
    import ipaddress

    try:
        ipaddress.ip_address(address)
    except ValueError:
        return f"expected an IP address (the pod IP) after '{replicas.SEPARATOR}', received {address!r}"
    limit = max(MIN_FOLLOWED, FOLLOW_FACTOR * count)
    if followed >= limit:
        return f"the ingress already follows {followed} replicas of this shard (at most {limit})"
    return ""


def reachable(stats_by_producer: Mapping[str, Mapping[str, Any]], name: str) -> bool:
    """Every producer's latest heartbeat stats say it is connected to discovered replica ``name``."""
    return all(stats.get(f"{REACH_PREFIX}{name}", 0.0) > 0 for stats in stats_by_producer.values())
