"""CurveZMQ on every ZeroMQ link: key files, allow-lists, socket set-up, the ZAP gate, and a hop benchmark.

With ``security: curve`` in ``topology.yaml`` every PULL socket is a CURVE
server holding its process's own secret key, and every PUSH socket is a CURVE
client holding its process's key pair and the public key of the process it
connects to. Messages are encrypted and authenticated end to end of a link.

Authorisation is per link: a ZAP handler (``zmq.auth.thread.ThreadAuthenticator``)
admits on a process's PULL only the public keys of the processes that the
topology says feed it (``Topology.producers``; for the ingress's results
socket, every shard, which all send heartbeats and errors there). A client
whose key is not on the list is refused during the handshake, before any
message of it is read, and the refusal is counted (``unauthorized``) and
logged. A client without CURVE at all fails the handshake (mechanism
mismatch) and never gets a message through either.

Keys (``pipeline keys DIR``, :mod:`pipeline.security.keys`): one key pair per
process, the secret in ``DIR/keys/<process>.key_secret`` (mode 0600, the
ZeroMQ certificate format that ``zmq.auth.load_certificate`` reads), the
public key in ``topology.yaml`` (``curve_public_key`` of each shard and of the
ingress). Each process reads only its own secret file; the keys folder is
``--keys-dir`` over ``PIPELINE_KEYS_DIR`` over ``DIR/keys``, so on several
hosts each host holds only the secrets of the processes it runs.
"""

from __future__ import annotations

import os
import re
import stat
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from pipeline import topology as topo
from pipeline.errors import TopologyError, UsageError
from pipeline.log import get_logger

NONE = "none"
CURVE = "curve"
#: the folder of secret key files, inside the topology directory unless overridden.
KEYS_DIRNAME = "keys"
SECRET_SUFFIX = ".key_secret"
#: ``--keys-dir`` over this environment variable over ``DIR/keys``.
ENV_KEYS_DIR = "PIPELINE_KEYS_DIR"
#: mode of a secret key file; a file readable by group or others is refused.
SECRET_FILE_MODE = 0o600
KEYS_DIR_MODE = 0o700
#: ZAP domain of a process's PULL socket: ``pipeline.<process>``, one allow-list per process.
ZAP_DOMAIN_PREFIX = "pipeline."
#: drop-counter label of a client refused by the ZAP handler.
UNAUTHORIZED = "unauthorized"
Z85_KEY_CHARS = 40
_PROCESS_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")

log = get_logger("pipeline.security")

Configure = Callable[[zmq.Socket], None]


# ------------------------------------------------------------------ key pairs
@dataclass(frozen=True)
class KeyPair:
    """A CURVE key pair, Z85-encoded (40 ASCII characters each)."""

    public: bytes
    secret: bytes = field(repr=False)


def generate() -> KeyPair:
    public, secret = zmq.curve_keypair()
    return KeyPair(public, secret)


def is_key(text: str | bytes) -> bool:
    """True for a Z85-encoded 32-byte key."""
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) != Z85_KEY_CHARS:
        return False
    try:
        return len(z85.decode(raw)) == 32
    except Exception:  # z85 raises ValueError or KeyError on characters outside its alphabet
        return False


def secret_path(keys_dir: Path, process: str) -> Path:
    check_process_name(process)
    return Path(keys_dir) / f"{process}{SECRET_SUFFIX}"


def check_process_name(process: str) -> None:
    if not _PROCESS_NAME.match(process):
        raise UsageError(f"process name {process!r} cannot name a key file; expected letters, digits, '_', '.', '-'")


def write_secret(keys_dir: Path, process: str, pair: KeyPair) -> Path:
    """Write a ZeroMQ secret certificate with mode 0600 (created so, never widened first)."""
    keys_dir = Path(keys_dir)
    keys_dir.mkdir(mode=KEYS_DIR_MODE, parents=True, exist_ok=True)
    path = secret_path(keys_dir, process)
    text = (
        "#   ZeroMQ CURVE **Secret** Certificate, written by `pipeline keys`\n"
        f"#   process: {process}\n"
        "#   DO NOT PROVIDE THIS FILE TO OTHER USERS nor change its permissions.\n\n"
        "metadata\n"
        f'    process = "{process}"\n'
        "curve\n"
        f'    public-key = "{pair.public.decode()}"\n'
        f'    secret-key = "{pair.secret.decode()}"\n'
    )
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, SECRET_FILE_MODE)
    try:
        os.fchmod(fd, SECRET_FILE_MODE)  # whatever the umask
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return path


def read_secret(keys_dir: Path, process: str) -> KeyPair:
    """Read a process's key pair; refuse a missing file, a file others can read, or a file without a secret."""
    path = secret_path(keys_dir, process)
    if not path.is_file():
        raise UsageError(
            f"no secret key for {process!r}: expected {str(path)!r} (made by `pipeline keys DIR`; "
            f"set --keys-dir or {ENV_KEYS_DIR} when the keys live elsewhere)"
        )
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise UsageError(
            f"secret key {str(path)!r} has mode {oct(mode)}; expected {oct(SECRET_FILE_MODE)} "
            f"(readable by its owner only): run `chmod 600 {path}`"
        )
    try:
        public, secret = zmq.auth.load_certificate(path)
    except Exception as exc:
        raise UsageError(f"secret key {str(path)!r} is not a ZeroMQ certificate: {exc}") from None
    if not secret or not is_key(public) or not is_key(secret):
        raise UsageError(f"secret key {str(path)!r} holds no valid CURVE key pair")
    return KeyPair(public, secret)


def keys_dir_for(topology: topo.Topology, keys_dir: str | os.PathLike[str] | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """The keys folder: the argument over ``PIPELINE_KEYS_DIR`` over ``DIR/keys``."""
    env = os.environ if environ is None else environ
    if keys_dir:
        return Path(keys_dir)
    if env.get(ENV_KEYS_DIR):
        return Path(env[ENV_KEYS_DIR])
    return Path(topology.directory) / KEYS_DIRNAME


# ---------------------------------------------------------------- topology
def public_keys(topology: topo.Topology) -> dict[str, str]:
    """Every process's recorded public key (``""`` when none)."""
    keys = {topo.INGRESS: topology.ingress.curve_public_key}
    keys.update({s.name: s.curve_public_key for s in topology.shards})
    return keys


def with_public_keys(topology: topo.Topology, keys: Mapping[str, str], security: str | None = None) -> topo.Topology:
    """The topology with ``curve_public_key`` set for the processes in ``keys`` (and ``security`` if given)."""
    import dataclasses

    ingress = topology.ingress
    if topo.INGRESS in keys:
        ingress = dataclasses.replace(ingress, curve_public_key=keys[topo.INGRESS])
    shards = tuple(dataclasses.replace(s, curve_public_key=keys[s.name]) if s.name in keys else s for s in topology.shards)
    changes: dict[str, Any] = {"ingress": ingress, "shards": shards}
    if security is not None:
        changes["security"] = security
    return topology.replace(**changes)


def check_topology(topology: topo.Topology) -> None:
    """With ``security: curve``, every process needs a valid public key; raise :class:`TopologyError` otherwise."""
    if topology.security != CURVE:
        return
    where = str(Path(topology.directory) / topo.TOPOLOGY_FILE)
    for process, key in public_keys(topology).items():
        if not key:
            raise TopologyError(
                f"{where}: security is 'curve' but {process!r} has no curve_public_key; run `pipeline keys {topology.directory}`"
            )
        if not is_key(key):
            raise TopologyError(
                f"{where}: {process!r} has curve_public_key {key!r}; expected a Z85-encoded key of {Z85_KEY_CHARS} characters"
            )


def allowed_clients(topology: topo.Topology, process: str) -> dict[str, str]:
    """The processes allowed to connect to ``process``'s PULL, with their public keys.

    A shard admits the processes the topology says feed it; the ingress admits
    every shard (results, errors and heartbeats all arrive on its one socket).
    """
    keys = public_keys(topology)
    if process == topo.INGRESS:
        feeders = [s.name for s in topology.shards]
    else:
        feeders = list(topology.producers(process))
    return {name: keys[name] for name in feeders}


# ------------------------------------------------------------- socket set-up
@dataclass(frozen=True)
class CurveSetup:
    """What one process needs to secure its sockets: its keys, its peers' public keys, its allow-list."""

    process: str
    keys: KeyPair
    servers: Mapping[str, bytes]  # process -> public key, for the PUSH sockets it connects
    allowed: Mapping[bytes, str]  # public key -> process name, admitted on its PULL

    @property
    def zap_domain(self) -> str:
        return ZAP_DOMAIN_PREFIX + self.process

    def configure_server(self, sock: zmq.Socket) -> None:
        """Make a socket a CURVE server with this process's keys, checked by its ZAP domain (before bind)."""
        sock.curve_secretkey = self.keys.secret
        sock.curve_publickey = self.keys.public
        sock.curve_server = True
        sock.zap_domain = self.zap_domain.encode()

    def configure_client(self, peer: str) -> Configure:
        """A set-up for a socket that connects to ``peer`` (before connect)."""
        server_key = self.servers.get(peer)
        if server_key is None:
            raise TopologyError(f"{self.process!r} connects to {peer!r}, which has no curve_public_key in the topology")

        def configure(sock: zmq.Socket) -> None:
            sock.curve_secretkey = self.keys.secret
            sock.curve_publickey = self.keys.public
            sock.curve_serverkey = server_key

        return configure


def load_setup(
    topology: topo.Topology,
    process: str,
    keys_dir: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> CurveSetup | None:
    """Read a process's own secret key and the topology's public keys; ``None`` with ``security: none``."""
    if topology.security != CURVE:
        return None
    check_topology(topology)
    recorded = public_keys(topology)
    if process not in recorded:
        raise TopologyError(f"no process named {process!r} in topology {topology.name!r}")
    folder = keys_dir_for(topology, keys_dir, environ)
    pair = read_secret(folder, process)
    if pair.public.decode() != recorded[process]:
        raise UsageError(
            f"{str(secret_path(folder, process))!r} holds the public key {pair.public.decode()!r}, but topology.yaml "
            f"records {recorded[process]!r} for {process!r}: the keys and the topology do not belong together "
            f"(run `pipeline keys {topology.directory} --force` again, or copy the matching key file)"
        )
    return CurveSetup(
        process=process,
        keys=pair,
        servers={name: key.encode() for name, key in recorded.items()},
        allowed={key.encode(): name for name, key in allowed_clients(topology, process).items()},
    )


# ------------------------------------------------------------------- ZAP gate
class _AllowList:
    """ZAP callback for one process's domain: admit the keys of its feeders, count and log the rest."""

    def __init__(self, setup: CurveSetup, counter: Any | None) -> None:
        self.setup = setup
        self.counter = counter
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        who = self.setup.allowed.get(bytes(key))
        if who is None:
            self.refused += 1
            if self.counter is not None:
                self.counter.inc(UNAUTHORIZED)
            log.warning("curve_client_refused", process=self.setup.process, client_key=bytes(key).decode(errors="replace"))
            return False
        return True


class _Gate:
    """One ZAP handler per ZeroMQ context (ZeroMQ allows one), shared by the processes in it (tests)."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.auth = ThreadAuthenticator(ctx)
        self.auth.start()
        self.users = 0


_GATES: dict[int, _Gate] = {}
_GATES_LOCK = threading.Lock()


class Links:
    """A process's link security, opened before its sockets: ``server`` for its PULL, ``client(peer)`` for each PUSH.

    With ``security: none`` both are ``None`` (plain sockets). With CURVE the
    ZAP handler for the process's domain runs from ``open_links`` until
    :meth:`close`, so it is there before the PULL binds.
    """

    def __init__(self, setup: CurveSetup | None, ctx: zmq.Context | None = None, counter: Any | None = None) -> None:
        self.setup = setup
        self.allow: _AllowList | None = None
        self._ctx_key = 0
        if setup is not None and ctx is not None:
            self._ctx_key = ctx.underlying
            self.allow = _AllowList(setup, counter)
            with _GATES_LOCK:
                gate = _GATES.get(self._ctx_key)
                if gate is None:
                    gate = _GATES[self._ctx_key] = _Gate(zmq.Context.shadow(self._ctx_key))
                gate.users += 1
                gate.auth.configure_curve_callback(setup.zap_domain, credentials_provider=self.allow)
            log.info("curve_enabled", process=setup.process, allowed=sorted(setup.allowed.values()))

    @property
    def enabled(self) -> bool:
        return self.setup is not None

    @property
    def refused(self) -> int:
        return self.allow.refused if self.allow is not None else 0

    @property
    def server(self) -> Configure | None:
        return self.setup.configure_server if self.setup is not None else None

    def client(self, peer: str) -> Configure | None:
        return self.setup.configure_client(peer) if self.setup is not None else None

    def close(self) -> None:
        """Stop admitting (call after the PULL socket is closed); stops the ZAP handler with its last user."""
        if self.allow is None:
            return
        with _GATES_LOCK:
            gate = _GATES.get(self._ctx_key)
            if gate is not None:
                gate.auth.credentials_providers.pop(self.setup.zap_domain, None)  # type: ignore[union-attr]
                gate.users -= 1
                if gate.users <= 0:
                    gate.auth.stop()
                    del _GATES[self._ctx_key]
        self.allow = None


def open_links(
    ctx: zmq.Context,
    topology: topo.Topology,
    process: str,
    keys_dir: str | os.PathLike[str] | None = None,
    counter: Any | None = None,
    environ: Mapping[str, str] | None = None,
) -> Links:
    """Load the process's keys (when the topology asks for CURVE) and start its ZAP allow-list."""
    return Links(load_setup(topology, process, keys_dir, environ), ctx, counter)


# ------------------------------------------------------------------ benchmark
#: defaults of :func:`bench_hop`: a 1 MiB float32 tensor, the median of this many hops.
BENCH_BYTES = 1 << 20
BENCH_HOPS = 200
BENCH_WARMUP = 20


def bench_hop(nbytes: int = BENCH_BYTES, hops: int = BENCH_HOPS, *, curve: bool, warmup: int = BENCH_WARMUP) -> list[float]:
    """Times (seconds) of ``hops`` hops of one tensor of ``nbytes``: encode, send, receive, decode, over TCP loopback.

    With ``curve`` the PUSH/PULL pair is a CURVE client/server (with a ZAP
    allow-list, as the pipeline runs it); without, plain sockets. One fresh
    context per run, so the runs do not share I/O threads or handlers.
    """
    from pipeline.pb import envelope_pb2 as pb
    from pipeline.wire import codec, sockets

    ctx = zmq.Context()
    links = None
    pull = push = None
    try:
        tensor = np.arange(nbytes // 4, dtype=np.float32)
        server_pair, client_pair = generate(), generate()
        setup = client_setup = None
        if curve:
            setup = CurveSetup("bench-server", server_pair, {}, {client_pair.public: "bench-client"})
            client_setup = CurveSetup("bench-client", client_pair, {"bench-server": server_pair.public}, {})
            links = Links(setup, ctx)
        bounds = sockets.SocketBounds()
        pull = sockets.pull(ctx, "tcp://127.0.0.1:0", bounds, configure=setup.configure_server if setup else None)
        endpoint = pull.getsockopt_string(zmq.LAST_ENDPOINT)
        push = ctx.socket(zmq.PUSH)  # blocking sends: the bench waits for the handshake instead of failing
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDTIMEO, 10_000)
        pull.setsockopt(zmq.RCVTIMEO, 10_000)
        if client_setup is not None:
            client_setup.configure_client("bench-server")(push)
        push.connect(endpoint)
        times: list[float] = []
        for i in range(warmup + hops):
            start = time.perf_counter()
            codec.send(push, pb.Envelope(kind=pb.REQUEST, request_id=i, model="bench", sender="bench"), {"t": tensor})
            message = codec.recv(pull)
            elapsed = time.perf_counter() - start
            if message is None or message.tensors["t"].nbytes != tensor.nbytes:
                raise RuntimeError("bench hop lost or corrupted its tensor")
            if i >= warmup:
                times.append(elapsed)
        return times
    finally:
        for sock in (push, pull):
            if sock is not None:
                sock.close(linger=0)
        if links is not None:
            links.close()
        ctx.term()


def bench_curve(nbytes: int = BENCH_BYTES, hops: int = BENCH_HOPS) -> dict[str, float]:
    """Median hop of a tensor of ``nbytes`` with and without CURVE, in milliseconds, and their ratio.

    For ``pipeline bench``: ``{"bytes", "hops", "plain_ms", "curve_ms", "ratio"}``.
    The two kinds of run alternate, in halves, so that a change in the machine's load
    affects both alike.
    """
    half = max(1, hops // 2)
    plain = bench_hop(nbytes, half, curve=False)
    curve = bench_hop(nbytes, half, curve=True)
    plain += bench_hop(nbytes, half, curve=False)
    curve += bench_hop(nbytes, half, curve=True)
    plain_ms = statistics.median(plain) * 1e3
    curve_ms = statistics.median(curve) * 1e3
    return {
        "bytes": float(nbytes),
        "hops": float(2 * half),
        "plain_ms": round(plain_ms, 4),
        "curve_ms": round(curve_ms, 4),
        "ratio": round(curve_ms / plain_ms, 3) if plain_ms else float("nan"),
    }
