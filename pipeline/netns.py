"""N hosts on one machine: network namespaces on an isolated bridge (a test fixture, also usable from a benchmark).

Layout of one :class:`Network` (every name starts with a per-run prefix,
``kpnet-<pid>-<n>``, so parallel runs never collide)::

    namespace PREFIX-br:   br0 (bridge) ── v1 ── v2 ── ... ── vN   (the switch; no address, no route out)
                                            │     │            │
    namespace PREFIX-h1:   eth0 198.18.0.1/24   lo up
    namespace PREFIX-h2:   eth0 198.18.0.2/24   lo up  ...

The bridge lives in a namespace of its own, so nothing is added to the root
namespace: the hosts reach each other and nothing else (198.18.0.0/15 is the
benchmarking range, RFC 2544, routed nowhere). Deleting the namespaces
removes every interface with them; :meth:`Network.destroy` does that, and
:func:`remove_leftovers` removes the namespaces of runs whose process is gone
(a crashed or killed test run).

Each host's link can be shaped with ``tc tbf`` (rate, burst, latency; this
kernel has no ``netem``) in both directions: on the host's ``eth0`` (what it
sends) and on its switch port ``vI`` (what it receives). :meth:`Network.link_down`
takes the switch port down, like a cable pulled at the switch: the host's
sockets see no error, packets are just lost until :meth:`Network.link_up`.

Run ``python -m pipeline.netns --bench`` (as root) to measure what shaping does
to a TCP stream between two hosts.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

from pipeline.errors import PipelineError

#: every namespace made here starts with this, then the creating process's pid.
BASE_PREFIX = "kpnet-"
#: the /24 the hosts get addresses from (198.18.0.1 .. 198.18.0.N), inside the benchmarking range 198.18.0.0/15.
SUBNET = "198.18.0"
MAX_HOSTS = 250
#: every ``ip``/``tc`` call is bounded.
COMMAND_TIMEOUT_S = 20.0
#: tbf's bucket holds this long at the rate (at least MIN_BURST_BYTES): the kernel refills it once per
#: timer tick (4 ms at HZ=250), so a smaller bucket caps a fast link below its rate (64 KiB: 1gbit gave 171 Mbit/s).
BURST_S = 0.008
MIN_BURST_BYTES = 32 << 10
#: queue before tbf drops.
DEFAULT_LATENCY = "50ms"
_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}

_run_counter = itertools.count(1)
_LEFTOVER = re.compile(rf"^{re.escape(BASE_PREFIX)}(\d+)-\d+-")


class NetnsError(PipelineError):
    """A namespace command failed: the command, its exit status and what it printed."""


def _run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(argv), capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    if check and result.returncode != 0:
        raise NetnsError(f"{' '.join(argv)} exited {result.returncode}: {result.stderr.strip() or result.stdout.strip()}")
    return result


def namespaces() -> list[str]:
    """The names in ``ip netns list`` (its lines may carry an ``(id: N)`` suffix)."""
    result = _run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def unavailable_reason() -> str | None:
    """Why namespaces cannot be made here (``None``: they can)."""
    if sys.platform != "linux":
        return f"network namespaces need Linux, this is {sys.platform}"
    if os.geteuid() != 0:
        return f"network namespaces need root (euid {os.geteuid()})"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"{tool!r} (iproute2) is not installed"
    probe = f"{BASE_PREFIX}{os.getpid()}-0-probe"
    try:
        _run(["ip", "netns", "add", probe])
        _run(["ip", "-n", probe, "link", "add", "probe0", "type", "bridge"])
    except (NetnsError, subprocess.TimeoutExpired, OSError) as exc:
        return f"cannot make a network namespace with a bridge: {exc}"
    finally:
        _run(["ip", "netns", "del", probe], check=False)
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers() -> list[str]:
    """Delete the namespaces of earlier runs whose process is gone; return their names."""
    gone = []
    for name in namespaces():
        found = _LEFTOVER.match(name)
        if found and not _pid_alive(int(found.group(1))):
            _run(["ip", "netns", "del", name], check=False)
            gone.append(name)
    return gone


@dataclass(frozen=True)
class Host:
    """One namespace host: its short name (``h1``), namespace, address and switch port."""

    name: str
    netns: str
    address: str
    port: str  # the veth end on the bridge, in the bridge namespace
    dev: str = "eth0"  # its interface, inside its namespace

    def exec_prefix(self) -> list[str]:
        """``ip netns exec NETNS``: put it before a command to run the command on this host."""
        return ["ip", "netns", "exec", self.netns]


@dataclass(frozen=True)
class Shaping:
    """A ``tc tbf`` shaping of one link: rate (tc units: ``100mbit``, ``1gbit``), bucket size and queue latency."""

    rate: str
    burst: str = ""  # "": BURST_S worth of the rate
    latency: str = DEFAULT_LATENCY

    @property
    def bits_per_s(self) -> int:
        found = re.fullmatch(r"(\d+(?:\.\d+)?)([a-z]*bit)", self.rate.lower())
        if not found or found.group(2) not in _UNITS:
            raise ValueError(f"expected a rate like 100mbit or 1gbit (units {sorted(_UNITS)}), received {self.rate!r}")
        return int(float(found.group(1)) * _UNITS[found.group(2)])

    def tbf(self) -> list[str]:
        burst = self.burst or f"{max(MIN_BURST_BYTES, int(self.bits_per_s / 8 * BURST_S))}b"
        return ["tbf", "rate", self.rate, "burst", burst, "latency", self.latency]


@dataclass
class Network:
    """``count`` hosts on an isolated bridge; a context manager that removes everything on exit."""

    count: int
    prefix: str = ""
    hosts: list[Host] = field(default_factory=list)
    bridge_ns: str = ""
    _made: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_HOSTS:
            raise ValueError(f"expected 1 to {MAX_HOSTS} hosts, received {self.count}")
        self.prefix = self.prefix or f"{BASE_PREFIX}{os.getpid()}-{next(_run_counter)}-"
        if not _LEFTOVER.match(self.prefix + "x"):
            raise ValueError(f"expected a prefix like {BASE_PREFIX}<pid>-<n>-, received {self.prefix!r}")
        self.bridge_ns = f"{self.prefix}br"
        self.hosts = [
            Host(name=f"h{i}", netns=f"{self.prefix}h{i}", address=f"{SUBNET}.{i}", port=f"v{i}")
            for i in range(1, self.count + 1)
        ]

    # ------------------------------------------------------------ lifecycle
    def create(self) -> Network:
        """Make the bridge namespace, the hosts, their links and addresses; on failure, remove what was made."""
        remove_leftovers()
        try:
            self._add_netns(self.bridge_ns)
            br = ["ip", "-n", self.bridge_ns]
            _run([*br, "link", "add", "br0", "type", "bridge"])
            _run([*br, "link", "set", "br0", "up"])
            for h in self.hosts:
                self._add_netns(h.netns)
                _run(["ip", "-n", h.netns, "link", "set", "lo", "up"])
                _run([*br, "link", "add", h.port, "type", "veth", "peer", "name", h.dev, "netns", h.netns])
                _run([*br, "link", "set", h.port, "master", "br0"])
                _run([*br, "link", "set", h.port, "up"])
                _run(["ip", "-n", h.netns, "addr", "add", f"{h.address}/24", "dev", h.dev])
                _run(["ip", "-n", h.netns, "link", "set", h.dev, "up"])
        except BaseException:
            self.destroy()
            raise
        return self

    def _add_netns(self, name: str) -> None:
        _run(["ip", "netns", "add", name])
        self._made.append(name)

    def destroy(self) -> list[str]:
        """Delete every namespace of this network (their interfaces go with them); return what is still there."""
        for name in reversed(self._made):
            _run(["ip", "netns", "del", name], check=False)
        self._made.clear()
        return self.leftovers()

    def leftovers(self) -> list[str]:
        """Namespaces of this network that ``ip netns list`` still shows."""
        return [n for n in namespaces() if n.startswith(self.prefix)]

    def __enter__(self) -> Network:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()

    # ------------------------------------------------------------ hosts
    def host(self, name_or_address: str) -> Host:
        """A host by short name (``h2``), namespace or address."""
        for h in self.hosts:
            if name_or_address in (h.name, h.netns, h.address):
                return h
        raise KeyError(f"expected one of {[h.name for h in self.hosts]} (or their address), received {name_or_address!r}")

    def run(self, host: str, argv: Sequence[str], timeout_s: float = 60.0, **kwargs: object) -> subprocess.CompletedProcess[str]:
        """Run a command to completion on ``host`` (``ip netns exec``), output captured."""
        return subprocess.run(
            [*self.host(host).exec_prefix(), *argv], capture_output=True, text=True, timeout=timeout_s, **kwargs  # type: ignore[call-overload]
        )

    # ------------------------------------------------------------ links
    def shape(self, host: str, shaping: Shaping, *, both_ways: bool = True) -> None:
        """Shape ``host``'s link with tbf: what it sends (its ``eth0``) and, with ``both_ways``, what it receives."""
        h = self.host(host)
        _run(["ip", "netns", "exec", h.netns, "tc", "qdisc", "replace", "dev", h.dev, "root", *shaping.tbf()])
        if both_ways:
            _run(["ip", "netns", "exec", self.bridge_ns, "tc", "qdisc", "replace", "dev", h.port, "root", *shaping.tbf()])

    def unshape(self, host: str) -> None:
        """Back to the default qdisc on both ends of ``host``'s link."""
        h = self.host(host)
        _run(["ip", "netns", "exec", h.netns, "tc", "qdisc", "del", "dev", h.dev, "root"], check=False)
        _run(["ip", "netns", "exec", self.bridge_ns, "tc", "qdisc", "del", "dev", h.port, "root"], check=False)

    def qdisc(self, host: str) -> str:
        """``tc qdisc show`` of ``host``'s interface (to check what shaping is on)."""
        h = self.host(host)
        return _run(["ip", "netns", "exec", h.netns, "tc", "qdisc", "show", "dev", h.dev]).stdout

    def link_down(self, host: str) -> None:
        """Take ``host``'s switch port down: its packets are lost until ``link_up`` (its sockets see no error)."""
        _run(["ip", "-n", self.bridge_ns, "link", "set", self.host(host).port, "down"])

    def link_up(self, host: str) -> None:
        _run(["ip", "-n", self.bridge_ns, "link", "set", self.host(host).port, "up"])


# ------------------------------------------------------------------ echo and bench
ECHO_SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.listen(8); print("listening", flush=True)
s.settimeout(float(sys.argv[2]))
while True:
    try:
        c, _ = s.accept()
    except socket.timeout:
        break
    with c:
        c.settimeout(float(sys.argv[2]))
        while True:
            data = c.recv(1 << 16)
            if not data:
                break
            c.sendall(data)
"""

ECHO_CLIENT = """
import socket, sys, threading, time
host, port, n, timeout = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
payload = bytes(range(256)) * (n // 256)
deadline = time.monotonic() + timeout
while True:
    try:
        c = socket.create_connection((host, port), timeout=timeout)
        break
    except OSError as exc:
        if time.monotonic() > deadline:
            print(f"connect failed: {exc}"); sys.exit(2)
        time.sleep(0.05)
c.settimeout(timeout)
start = time.monotonic()
sender = threading.Thread(target=c.sendall, args=(payload,), daemon=True)  # send and read at once: no deadlock
sender.start()
got = bytearray()
while len(got) < len(payload):
    chunk = c.recv(1 << 16)
    if not chunk:
        break
    got += chunk
took = time.monotonic() - start
c.close()
print("ok" if bytes(got) == payload else f"mismatch {len(got)} of {len(payload)}", f"{took:.6f}")
"""


def echo(network: Network, server: str, client: str, port: int, nbytes: int = 1 << 16, timeout_s: float = 10.0) -> tuple[bool, float, str]:
    """Start a TCP echo server on ``server``, send ``nbytes`` from ``client``: (echoed intact, seconds, output)."""
    srv = subprocess.Popen(
        [*network.host(server).exec_prefix(), sys.executable, "-c", ECHO_SERVER, str(port), str(timeout_s)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert srv.stdout is not None
        ready = srv.stdout.readline()
        if "listening" not in ready:
            return False, 0.0, f"echo server did not start: {ready}"
        try:
            result = network.run(
                client,
                [sys.executable, "-c", ECHO_CLIENT, network.host(server).address, str(port), str(nbytes), str(timeout_s)],
                timeout_s=timeout_s * 3 + 30,  # connect retries and the reads are bounded by timeout_s; python starts slowly on a busy machine
            )
        except subprocess.TimeoutExpired as exc:
            return False, 0.0, f"echo client still running after {exc.timeout} s"
        words = result.stdout.split()
        ok = result.returncode == 0 and bool(words) and words[0] == "ok"
        return ok, float(words[1]) if ok else 0.0, result.stdout + result.stderr
    finally:
        srv.kill()
        srv.wait(10)


def bench(rates: Sequence[str] = ("100mbit", "1gbit"), nbytes: int = 8 << 20) -> list[tuple[str, float]]:
    """Echo ``nbytes`` between two hosts unshaped and at each rate; return (rate, Mbit/s each way)."""
    rows = []
    with Network(2) as net:
        for rate in ("unshaped", *rates):
            if rate == "unshaped":
                net.unshape("h1")
            else:
                net.shape("h1", Shaping(rate))
            ok, took, out = echo(net, "h2", "h1", 20000 + len(rows), nbytes, timeout_s=60)
            if not ok:
                raise NetnsError(f"echo failed at {rate}: {out}")
            rows.append((rate, nbytes * 8 / took / 1e6))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="measure a TCP stream unshaped and shaped with tbf")
    parser.add_argument("--cleanup", action="store_true", help="remove namespaces left by runs that are gone")
    args = parser.parse_args()
    reason = unavailable_reason()
    if reason:
        print(f"netns: {reason}", file=sys.stderr)
        return 2
    if args.cleanup:
        print("removed:", remove_leftovers() or "nothing")
    if args.bench:
        for rate, mbit in bench():
            print(f"{rate:>10}  {mbit:9.1f} Mbit/s each way (echo of 8 MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
