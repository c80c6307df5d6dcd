"""A minimal network-namespace lab for the deploy tests: one namespace per "pod" on a bridge of its own.

Addresses come from the benchmarking range 198.18.0.0/15 (never routed);
each lab takes a /24 of 198.19.0.0/16 nobody on this machine uses, a bridge
whose host side is ``.1``, and a veth pair per namespace. Names carry a
unique prefix (``kd`` + 4 hex digits), and everything made (namespaces,
links, ``/etc/netns/NAME`` folders, processes started in them) is removed in
``close()``, which the context manager calls also when a test fails.

A colleague's shared fixture (``tests/netns.py``, branch ``netns``) was not
there when these tests were written; this one does only what they need.
"""

from __future__ import annotations

import ipaddress
import os
import random
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import pytest

NETNS_ETC = Path("/etc/netns")
IP_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 25.0


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=IP_TIMEOUT_S, check=check)


def skip_unless_possible() -> None:
    """Skip (with the reason) where namespaces cannot be made: not root, no ``ip``, no permission."""
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root (the tests and CI run as root)")
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    name = f"kdprobe{os.getpid() % 100000}"
    try:
        _ip("netns", "add", name)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot make a network namespace here: {exc.stderr.strip()}")
    finally:
        _ip("netns", "del", name, check=False)


def _free_subnet() -> ipaddress.IPv4Network:
    used = _ip("-4", "-o", "addr", "show").stdout
    candidates = list(range(100, 250))
    random.SystemRandom().shuffle(candidates)
    for third in candidates:
        net = ipaddress.IPv4Network(f"198.19.{third}.0/24")
        if f"198.19.{third}." not in used:
            return net
    raise RuntimeError("no free /24 in 198.19.100.0-198.19.249.0 for the lab")


@dataclass
class NetnsLab:
    """Namespaces on one bridge; ``add`` one, ``hosts`` writes its hosts file, ``popen`` runs in it."""

    prefix: str = field(default_factory=lambda: f"kd{random.SystemRandom().randrange(16**4):04x}")
    subnet: ipaddress.IPv4Network = field(default_factory=_free_subnet)
    namespaces: dict[str, str] = field(default_factory=dict)  # name -> address
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    _links: list[str] = field(default_factory=list)
    _bridge: str = ""

    @property
    def host_address(self) -> str:
        return str(self.subnet.network_address + 1)

    def open(self) -> NetnsLab:
        self._bridge = f"{self.prefix}br"
        _ip("link", "add", self._bridge, "type", "bridge")
        self._links.append(self._bridge)
        _ip("addr", "add", f"{self.host_address}/{self.subnet.prefixlen}", "dev", self._bridge)
        _ip("link", "set", self._bridge, "up")
        return self

    def ns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def add(self, name: str) -> str:
        """A namespace for ``name`` on the bridge; return its address."""
        index = len(self.namespaces)
        ns = self.ns(name)
        address = str(self.subnet.network_address + 10 + index)
        _ip("netns", "add", ns)
        self.namespaces[name] = address
        outside, inside = f"{self.prefix}{index}h", f"{self.prefix}{index}p"
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        self._links.append(outside)
        _ip("link", "set", inside, "netns", ns)
        _ip("link", "set", outside, "master", self._bridge)
        _ip("link", "set", outside, "up")
        _ip("-n", ns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", inside)
        _ip("-n", ns, "link", "set", inside, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
        return address

    def hosts(self, name: str, entries: Mapping[str, str]) -> Path:
        """Write ``/etc/netns/NS/hosts`` (``ip netns exec`` bind-mounts it over /etc/hosts): name -> address."""
        folder = NETNS_ETC / self.ns(name)
        folder.mkdir(parents=True, exist_ok=True)
        lines = ["127.0.0.1 localhost"] + [f"{address} {host}" for host, address in sorted(entries.items())]
        (folder / "hosts").write_text("\n".join(lines) + "\n")
        return folder / "hosts"

    def command(self, name: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(name), *argv]

    def popen(self, name: str, argv: Sequence[str], *, env: Mapping[str, str], log: Path, cwd: Path | None = None) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                self.command(name, argv), stdout=out, stderr=subprocess.STDOUT, env=dict(env), cwd=cwd, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        for name in list(self.namespaces):
            _ip("netns", "del", self.ns(name), check=False)
            shutil.rmtree(NETNS_ETC / self.ns(name), ignore_errors=True)
        for link in reversed(self._links):
            _ip("link", "del", link, check=False)
        leftovers = [ln for ln in _ip("-o", "link", "show", check=False).stdout.splitlines() if f" {self.prefix}" in ln]
        assert not leftovers, f"links left behind: {leftovers}"

    def __enter__(self) -> NetnsLab:
        try:
            return self.open()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
