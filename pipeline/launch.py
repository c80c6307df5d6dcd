"""Starting a topology's processes from Python (bench, tests): a copy on fresh ports, real processes.

``relocate`` copies a topology directory (shard files linked, not copied) with
fresh free local ports for every endpoint, so a benchmark or a test never
collides with a pipeline already running from the same topology.
``Cluster`` starts the ingress and the workers as real processes (through
:mod:`pipeline.process`, each optionally in a network namespace), waits until
the ingress says it is ready, and stops them all (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from pipeline import colocation
from pipeline import process
from pipeline import replicas
from pipeline import topology as topo
from pipeline.errors import Unavailable

#: a cold start imports TensorFlow in every process; on a busy 2-core machine that takes a while.
START_TIMEOUT_S = 240.0
STOP_TIMEOUT_S = process.STOP_TIMEOUT_S


#: lowest port ``free_ports`` hands out; it picks below the kernel's ephemeral range (see there).
PORT_FLOOR = 20000
#: the Linux default, when /proc does not say.
DEFAULT_EPHEMERAL = (32768, 60999)


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range for the local ports of outgoing connections."""
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[:2])
        return lo, hi
    except (OSError, ValueError):
        return DEFAULT_EPHEMERAL


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports free on ``host`` now, for processes that bind them a little later.

    They are drawn at random from below the ephemeral range: a port the kernel
    handed out with ``bind(0)`` is an ephemeral one, which any outgoing
    connection (a ZeroMQ or gRPC client, a scrape) may take between this call
    and the bind, and which a second run picking at the same moment would get
    too. Port 0 binds make up the rest when that range is too small.
    """
    lo, _ = ephemeral_range()
    pool = list(range(PORT_FLOOR, lo)) if lo - PORT_FLOOR >= 8 * count else []
    random.SystemRandom().shuffle(pool)
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        for candidate in [*pool[: 32 * count], *[0] * count]:
            if len(ports) == count:
                break
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                s.bind((host, candidate))  # without SO_REUSEADDR: a port in TIME_WAIT is refused too
            except OSError:
                s.close()
                continue
            held.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in held:
            s.close()
    if len(ports) < count:
        raise Unavailable(f"expected {count} free ports on {host}, found {len(ports)}")
    return ports


def relocate(source: Path, dest: Path, host: str = "127.0.0.1") -> topo.Topology:
    """Copy the topology in ``source`` to ``dest`` with fresh ports on ``host``; return the copy."""
    t = topo.load(source)
    dest.mkdir(parents=True, exist_ok=True)
    ports = iter(free_ports(2 * sum(len(s.replicas) for s in t.shards) + 3, host))
    shards = []
    for s in t.shards:
        endpoint = f"tcp://{host}:{next(ports)}"
        extra = []
        for _ in s.extra_replicas:
            rep = f"tcp://{host}:{next(ports)}"
            extra.append(topo.ReplicaSpec(endpoint=rep, bind=rep, host=host, metrics=f"{host}:{next(ports)}"))
        shards.append(
            dataclasses.replace(
                s, endpoint=endpoint, bind=endpoint, host=host, metrics=f"{host}:{next(ports)}", extra_replicas=tuple(extra)
            )
        )
        _link(t.directory / s.file, dest / s.file)
    results = f"tcp://{host}:{next(ports)}"
    ingress = dataclasses.replace(
        t.ingress, grpc=f"{host}:{next(ports)}", results=results, bind=results, host=host, metrics=f"{host}:{next(ports)}"
    )
    _link(t.model_path, dest / topo.MODEL_FILE)
    keys = t.directory / "keys"
    if keys.is_dir() and not (dest / "keys").exists():
        (dest / "keys").symlink_to(keys.resolve())
    copy = t.replace(shards=tuple(shards), ingress=ingress, directory=dest)
    copy.write(dest)
    return topo.load(dest)


def _link(src: Path, dst: Path) -> None:
    if dst.exists() or dst.is_symlink():
        dst.unlink()
    if src.exists():
        dst.symlink_to(src.resolve())


class Cluster:
    """The ingress and every worker of a topology as real processes (a context manager).

    Processes start through :mod:`pipeline.process`: ``netns`` maps a process
    name to the network namespace it runs in, ``wrap`` to a command prefix
    (``faketime``, ``taskset``). ``ready`` replaces the readiness probe (by
    default a gRPC ``ServerReady`` to the ingress from this process, which
    cannot reach an ingress inside a namespace).
    """

    def __init__(
        self,
        topology: topo.Topology,
        log_dir: Path,
        *,
        worker_args: Mapping[str, Sequence[str]] | None = None,
        common_worker_args: Sequence[str] = (),
        ingress_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        netns: Mapping[str, str] | None = None,
        wrap: Mapping[str, Sequence[str]] | None = None,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self.topology = topology
        self.log_dir = log_dir
        self.worker_args = dict(worker_args or {})
        self.common_worker_args = list(common_worker_args)
        self.ingress_args = list(ingress_args)
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2", **(env or {})}
        self.netns = dict(netns or {})
        self.wrap = {k: list(v) for k, v in (wrap or {}).items()}
        self.ready = ready
        self.procs: dict[str, process.Process] = {}

    @property
    def target(self) -> str:
        return self.topology.ingress.grpc

    def command(self, name: str) -> list[str]:
        """The ``pipeline ingress`` or ``pipeline worker`` command line of one process (a shard, or a group of them)."""
        d = str(self.topology.directory)
        if name == topo.INGRESS:
            return process.pipeline_command("ingress", d, *self.ingress_args)
        which = replicas.worker_selector(self.topology, name)  # a replica: --shard S --replica K
        if which is None:
            which = colocation.worker_selector(self.topology, name)
        return process.pipeline_command("worker", d, *which, *self.common_worker_args, *self.worker_args.get(name, ()))

    def _per_process(self, table: Mapping[str, Any], name: str) -> Any:
        """A process's entry in ``table``, keyed by its name or, for a group of shards, by any of its shards'."""
        if name in table or name == topo.INGRESS:
            return table.get(name)
        if replicas.worker_selector(self.topology, name) is not None:  # a replica S@K: the shard's entry
            return table.get(replicas.shard_of(self.topology, name)[0])
        shards = colocation.group(self.topology, name).shards
        values = {repr(table[s]) for s in shards if s in table}
        if len(values) > 1:
            raise Unavailable(f"process {name!r} groups shards {list(shards)} that are given different settings {sorted(values)}")
        return next((table[s] for s in shards if s in table), None)

    def start_process(self, name: str) -> process.Process:
        """Start (or start again, after a stop or a crash) one process of the topology."""
        old = self.procs.get(name)
        if old is not None and old.alive:
            raise Unavailable(f"expected {name!r} stopped before starting it again; it runs as pid {old.pid}")
        proc = process.start(
            name,
            self.command(name),
            self.log_dir,
            env=self.env,
            netns=self._per_process(self.netns, name),
            wrap=self._per_process(self.wrap, name) or (),
        )
        self.procs[name] = proc
        return proc

    def start(self, timeout_s: float = START_TIMEOUT_S) -> Cluster:
        """Start every process and wait until the pipeline is ready; on failure, stop what started."""
        try:
            for name in replicas.expand(self.topology, colocation.process_names_on(self.topology, None)):
                self.start_process(name)
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Wait until the ingress says every shard is up and warm; raise :class:`Unavailable` if not in time."""
        deadline = time.monotonic() + timeout_s
        probe = self.ready or self._grpc_ready()
        while time.monotonic() < deadline:
            dead = {n: p.returncode for n, p in self.procs.items() if not p.alive}
            if dead:
                tails = "\n".join(self.procs[n].tail(15) for n in dead)
                raise Unavailable(f"processes exited while starting: {dead}; logs in {self.log_dir}\n{tails}")
            if probe():
                return
            time.sleep(0.2)
        raise Unavailable(f"the pipeline at {self.target} was not ready within {timeout_s:.0f} s; logs in {self.log_dir}")

    def _grpc_ready(self) -> Callable[[], bool]:
        import grpc

        from pipeline.pb import grpc_service_pb2 as kpb
        from pipeline.pb import grpc_service_pb2_grpc as kgrpc

        def ready() -> bool:
            with grpc.insecure_channel(self.target) as channel:
                try:
                    return bool(kgrpc.GRPCInferenceServiceStub(channel).ServerReady(kpb.ServerReadyRequest(), timeout=1.0).ready)
                except grpc.RpcError:
                    return False

        return ready

    def stop_process(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """Stop one process (``sig``, then SIGKILL after ``timeout_s``); its exit status (``None``: never started)."""
        proc = self.procs.get(name)
        return None if proc is None else proc.stop(sig, timeout_s)

    def stop(self) -> dict[str, int | None]:
        """Stop every process within one bound; their exit statuses."""
        return process.stop_all(self.procs.values(), timeout_s=STOP_TIMEOUT_S)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()
