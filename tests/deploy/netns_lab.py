"""Pods' network namespaces for the deploy tests, on the shared fixture (tests/netns.py, an isolated bridge).

:class:`NetnsLab` hands out the hosts of one :class:`netns.Network` by name
(a pod, the client, the ``kubelet``), writes each namespace's hosts file
(``/etc/netns/NAME/hosts``, which ``ip netns exec`` bind-mounts over
/etc/hosts), runs processes in them, and lets the test itself act from the
``kubelet`` namespace (:meth:`call`: a thread that joins that namespace; the
bridge lives in a namespace of its own, so the test's own namespace cannot
reach the pods). ``close()`` stops every process started here, removes the
hosts files and destroys the network, also when a test fails.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from netns import Host, Network, unavailable_reason  # noqa: E402

NETNS_ETC = Path("/etc/netns")
NETNS_RUN = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000
STOP_TIMEOUT_S = 25.0
KUBELET = "kubelet"
T = TypeVar("T")


def skip_unless_possible() -> None:
    """Skip (with the reason) where namespaces cannot be made: not root, no iproute2, no permission."""
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)


class NetnsLab:
    """Named hosts of one isolated network (``capacity`` namespaces, the ``kubelet`` among them)."""

    def __init__(self, capacity: int = 8) -> None:
        self.network = Network(capacity)
        self.assigned: dict[str, Host] = {}
        self.procs: list[subprocess.Popen[bytes]] = []

    def open(self) -> NetnsLab:
        self.network.create()
        self.add(KUBELET)
        return self

    def add(self, name: str) -> str:
        """The next free host, for ``name``; return its address."""
        if len(self.assigned) >= len(self.network.hosts):
            raise RuntimeError(f"the lab has {len(self.network.hosts)} hosts, all taken: {sorted(self.assigned)}")
        host = self.network.hosts[len(self.assigned)]
        self.assigned[name] = host
        return host.address

    def ns(self, name: str) -> str:
        return self.assigned[name].netns

    def hosts(self, name: str, entries: Mapping[str, str | Sequence[str]]) -> Path:
        """Write (in place) the hosts file of ``name``'s namespace: host name -> address (or addresses: a headless
        Service's name resolves to every one, glibc's getaddrinfo returning each line of the name)."""
        folder = NETNS_ETC / self.ns(name)
        folder.mkdir(parents=True, exist_ok=True)
        pairs = [(host, a) for host, value in sorted(entries.items()) for a in ([value] if isinstance(value, str) else value)]
        lines = ["127.0.0.1 localhost"] + [f"{address} {host}" for host, address in pairs]
        with open(folder / "hosts", "w") as f:  # the same inode: a running process reads the new names at its next lookup
            f.write("\n".join(lines) + "\n")
        return folder / "hosts"

    def command(self, name: str, argv: Sequence[str]) -> list[str]:
        return [*self.assigned[name].exec_prefix(), *argv]

    def popen(self, name: str, argv: Sequence[str], *, env: Mapping[str, str], log: Path) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            proc = subprocess.Popen(self.command(name, argv), stdout=out, stderr=subprocess.STDOUT, env=dict(env), start_new_session=True)
        self.procs.append(proc)
        return proc

    def call(self, name: str, fn: Callable[[], T], timeout_s: float = 30.0) -> T:
        """Run ``fn`` in a thread that has joined ``name``'s network namespace (sockets it opens live there)."""
        out: list[Any] = []

        def body() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(NETNS_RUN / self.ns(name), os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {self.ns(name)} failed")
            finally:
                os.close(fd)
            try:
                out.append((True, fn()))
            except BaseException as exc:  # handed to the caller
                out.append((False, exc))

        thread = threading.Thread(target=body, name=f"in-{name}", daemon=True)
        thread.start()
        thread.join(timeout_s)
        if not out:
            raise TimeoutError(f"a call in namespace {name} did not return within {timeout_s} s")
        ok, value = out[0]
        if not ok:
            raise value
        return value  # type: ignore[no-any-return]

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
        for host in self.network.hosts:
            shutil.rmtree(NETNS_ETC / host.netns, ignore_errors=True)
        left = self.network.destroy()
        assert not left, f"namespaces left behind: {left}"

    def __enter__(self) -> NetnsLab:
        try:
            return self.open()
        except BaseException:
            self.close()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
