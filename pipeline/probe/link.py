"""The link probe over ZeroMQ: a peer that answers (``probe serve``) and a client that measures (``probe link``).

The client's DEALER talks to the peer's ROUTER with small multipart messages
whose first frame names the kind (:data:`HELLO`, :data:`PING`, :data:`PUT`,
:data:`GET`); every request is answered, so the client always knows what has
arrived:

- round trips: one :data:`PING` at a time, answered by a :data:`PONG`;
- upload (client to peer): :data:`PUT` messages of ``message_bytes``, at most
  ``window`` unacknowledged; the peer sends an :data:`ACK` once it has the
  whole message. The rate is counted from the acknowledgements, so bytes that
  only sit in the sender's queue or socket buffer never flatter it;
- download (peer to client): :data:`GET` requests, at most ``window``
  outstanding, each answered with :data:`DATA` of the size asked for.

Every wait has a deadline: the first answer within ``connect_timeout_s``
(otherwise an error naming the address), every later one within
``reply_timeout_s``. With CURVE the peer makes a key pair when it starts and
prints its public key; the client passes it with ``--curve-server-key`` and
uses a key pair of its own (the peer admits any client: it only echoes and
discards, holds no secret, and exits after ``idle_timeout_s`` without traffic).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import zmq
from zmq.utils import z85

from pipeline.cluster import HOP_FLOOR_S, Link
from pipeline.errors import Unavailable, UsageError
from pipeline.log import get_logger
from pipeline.probe.measure import Delivery, Rate, RoundTrips, round_significant, steady_rate

PROTOCOL_VERSION = b"1"
HELLO, PING, PONG, PUT, ACK, GET, DATA, ERROR = b"hello", b"ping", b"pong", b"put", b"ack", b"get", b"data", b"error"
#: a speed run on the peer's host (``probe speed --peer``): a JSON request, answered with the run's JSON report.
SPEED = b"speed"
#: a sequence number or a size on the wire: unsigned 64-bit, big-endian.
_U64 = struct.Struct(">Q")
#: the largest message the peer accepts or sends (ZeroMQ drops a connection that sends a larger one).
MAX_MESSAGE_BYTES = 64 << 20
#: the peer exits after this long without a message, so a forgotten peer does not stay open.
IDLE_TIMEOUT_S = 600.0
#: how often the peer's loop looks at its stop flag and idle clock.
POLL_S = 0.2
DEFAULT_MESSAGE_BYTES = 1 << 20
DEFAULT_WINDOW = 4
DEFAULT_SECONDS = 3.0
DEFAULT_PINGS = 100
CONNECT_TIMEOUT_S = 5.0
REPLY_TIMEOUT_S = 10.0
_ENDPOINT = re.compile(r"^tcp://(\[[0-9A-Fa-f:.]+\]|[^:/\[\]]+):(\d+)$")
_WILDCARDS = {"*", "0.0.0.0", "[::]"}

log = get_logger("pipeline.probe")


def parse_endpoint(text: str, *, bind: bool, what: str) -> tuple[str, int]:
    """``tcp://HOST:PORT`` -> ``(HOST, PORT)``; a bind may use ``*`` or ``0.0.0.0`` and port 0 (any free port)."""
    example = "tcp://0.0.0.0:5600" if bind else "tcp://198.18.0.2:5600"
    m = _ENDPOINT.match(text.strip())
    if not m:
        raise UsageError(f"{what}: expected tcp://ADDRESS:PORT, e.g. {example}; received {text!r}")
    host, port = m.group(1), int(m.group(2))
    if not (0 if bind else 1) <= port <= 65535:
        raise UsageError(f"{what}: expected a port in {'0' if bind else '1'}..65535, received {port} in {text!r}")
    if not bind and host in _WILDCARDS:
        raise UsageError(f"{what}: {host!r} is a bind-all address, not one to connect to; expected the peer's address, e.g. {example}")
    bare = host.strip("[]")
    try:
        ipaddress.ip_address(bare)
    except ValueError:
        if host not in _WILDCARDS and not re.match(r"^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$", host):
            raise UsageError(f"{what}: {host!r} is neither an IP address nor a host name; received {text!r}") from None
    return host, port


def _u64(value: int) -> bytes:
    return _U64.pack(value)


def _read_u64(frame: bytes | memoryview) -> int:
    return int(_U64.unpack(bytes(frame))[0])


def _z85_key(text: str) -> bytes:
    key = text.strip().encode()
    try:
        if len(key) != 40 or len(z85.decode(key)) != 32:
            raise ValueError
    except (ValueError, KeyError, struct.error):
        raise UsageError(
            f"--curve-server-key: expected the 40-character Z85 public key that `pipeline probe serve --curve` printed; "
            f"received {text!r} ({len(key)} characters)"
        ) from None
    return key


# ------------------------------------------------------------------ the peer
@dataclass(frozen=True)
class ServeConfig:
    """How the peer listens: address, CURVE or not, and its bounds."""

    bind: str
    curve: bool = False
    idle_timeout_s: float = IDLE_TIMEOUT_S
    max_message_bytes: int = MAX_MESSAGE_BYTES


@dataclass
class Peer:
    """The answering side: a ROUTER that acknowledges uploads, serves downloads and answers pings."""

    config: ServeConfig
    endpoint: str = ""  # the bound address, with the real port (``--bind ...:0`` picks one)
    public_key: bytes | None = None
    messages: int = 0
    received_bytes: int = 0
    sent_bytes: int = 0
    _ctx: zmq.Context | None = None
    _sock: zmq.Socket | None = None
    _buffer: bytes = b""
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _own_context: bool = field(default=False, repr=False)

    def start(self, ctx: zmq.Context | None = None) -> str:
        """Bind (an error naming the address if it cannot) and return the bound endpoint."""
        parse_endpoint(self.config.bind, bind=True, what="--bind")
        self._own_context = ctx is None
        self._ctx = ctx or zmq.Context()
        sock = self._ctx.socket(zmq.ROUTER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_bytes + 1024)
        if self.config.curve:
            public, secret = zmq.curve_keypair()
            sock.curve_server = True
            sock.curve_secretkey = secret
            self.public_key = public
        try:
            sock.bind(self.config.bind)
        except zmq.ZMQError as exc:
            sock.close(0)
            self.close()
            raise UsageError(f"--bind {self.config.bind}: cannot listen there: {exc.strerror} (is the port taken, or the address not this host's?)") from None
        self._sock = sock
        self.endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
        log.info("probe_listening", endpoint=self.endpoint, curve=self.config.curve)
        return self.endpoint

    def serve(self, stop: threading.Event | None = None) -> str:
        """Answer until ``stop`` is set or nothing arrives for ``idle_timeout_s``; return why it ended."""
        if self._sock is None:
            raise RuntimeError("Peer.serve() before Peer.start()")
        stop = self._stop = stop or threading.Event()
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        last = time.monotonic()
        while not stop.is_set():
            if not poller.poll(POLL_S * 1000):
                if time.monotonic() - last > self.config.idle_timeout_s:
                    log.info("probe_idle_exit", idle_s=self.config.idle_timeout_s, messages=self.messages)
                    return "idle"
                continue
            last = time.monotonic()
            frames = self._sock.recv_multipart(copy=False)
            self.messages += 1
            self._answer(frames)
        return "stopped"

    def _answer(self, frames: list[zmq.Frame]) -> None:
        assert self._sock is not None
        identity, parts = frames[0].bytes, frames[1:]
        kind = parts[0].bytes if parts else b""
        if kind == PUT and len(parts) == 3:
            n = len(parts[2].buffer)
            self.received_bytes += n
            self._sock.send_multipart([identity, ACK, parts[1].bytes, _u64(n)])
        elif kind == PING and len(parts) == 2:
            self._sock.send_multipart([identity, PONG, parts[1].bytes])
        elif kind == GET and len(parts) == 3:
            size = _read_u64(parts[2].bytes)
            if not 0 < size <= self.config.max_message_bytes:
                self._error(identity, f"GET of {size} bytes; expected 1..{self.config.max_message_bytes}")
                return
            if len(self._buffer) < size:
                self._buffer = os.urandom(size)  # incompressible, made once per largest size asked for
            self.sent_bytes += size
            self._sock.send_multipart([identity, DATA, parts[1].bytes, memoryview(self._buffer)[:size]], copy=False)
        elif kind == SPEED and len(parts) == 2:
            self._speed(identity, parts[1].bytes)
        elif kind == HELLO and len(parts) == 2:
            about = {"host": socket.gethostname(), "pid": os.getpid(), "max_message_bytes": self.config.max_message_bytes}
            self._sock.send_multipart([identity, HELLO, PROTOCOL_VERSION, json.dumps(about).encode()])
        else:
            self._error(identity, f"unknown request {kind[:16]!r} with {len(parts)} frames")

    def _speed(self, identity: bytes, request: bytes) -> None:
        """Run the speed probe on this host in a child process (nothing else is answered meanwhile)."""
        from pipeline.probe.speed import checked_remote_config, run_in_subprocess

        try:
            params = json.loads(request)
            if not isinstance(params, dict):
                raise UsageError(f"expected a JSON object of speed parameters, received {request[:64]!r}")
            config = checked_remote_config(params)
            log.info("probe_speed_requested", model=config.model, batch=config.batch, seconds=config.seconds, threads=config.threads)
            report = run_in_subprocess(config, stop=self._stop)
        except (UsageError, ValueError) as exc:
            self._error(identity, f"speed run refused or failed: {getattr(exc, 'message', exc)}")
            return
        self._sock.send_multipart([identity, SPEED, json.dumps(report).encode()])  # type: ignore[union-attr]

    def _error(self, identity: bytes, message: str) -> None:
        assert self._sock is not None
        log.warning("probe_bad_request", detail=message)
        self._sock.send_multipart([identity, ERROR, message.encode()])

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None
        if self._ctx is not None and self._own_context:
            self._ctx.term()
        self._ctx = None


# ------------------------------------------------------------------ the client
@dataclass(frozen=True)
class LinkConfig:
    """What ``probe link`` measures and the bound of every wait."""

    endpoint: str
    message_bytes: int = DEFAULT_MESSAGE_BYTES
    window: int = DEFAULT_WINDOW
    seconds: float = DEFAULT_SECONDS  # per direction
    pings: int = DEFAULT_PINGS
    upload: bool = True
    download: bool = True
    connect_timeout_s: float = CONNECT_TIMEOUT_S
    reply_timeout_s: float = REPLY_TIMEOUT_S
    server_key: str | None = None  # the peer's CURVE public key (Z85)


@dataclass(frozen=True)
class LinkResult:
    """What was measured: round trips, and the steady rate each way (``None``: not measured)."""

    endpoint: str
    peer_host: str
    round_trips: RoundTrips
    upload: Rate | None
    download: Rate | None
    message_bytes: int
    window: int
    curve: bool

    @property
    def bandwidth_bps(self) -> float:
        """The slower direction (a cluster file's link is the same both ways, so the slower one is what holds)."""
        rates = [r.bits_per_s for r in (self.upload, self.download) if r is not None]
        if not rates:
            raise ValueError("no direction was measured")
        return min(rates)

    @property
    def latency_s(self) -> float:
        return self.round_trips.one_way_s(HOP_FLOOR_S)

    def link(self) -> Link:
        """The link as a cluster file records it: bandwidth and latency rounded to what was measurable."""
        latency = round_significant(self.latency_s, 2)
        return Link(bandwidth_bps=round_significant(self.bandwidth_bps), latency_s=round(latency, 6))


class _Client:
    """One DEALER connected to the peer; every receive bounded."""

    def __init__(self, config: LinkConfig, ctx: zmq.Context) -> None:
        self.config = config
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 1024)
        if config.server_key is not None:
            public, secret = zmq.curve_keypair()
            self.sock.curve_serverkey = _z85_key(config.server_key)
            self.sock.curve_publickey = public
            self.sock.curve_secretkey = secret
        self.sock.connect(config.endpoint)
        self.seq = 0

    def next_seq(self) -> bytes:
        self.seq += 1
        return _u64(self.seq)

    def recv(self, timeout_s: float, waiting_for: str) -> list[zmq.Frame]:
        if not self.sock.poll(timeout_s * 1000, zmq.POLLIN):
            raise Unavailable(
                f"the probe peer at {self.config.endpoint} stopped answering: no reply for {timeout_s:g} s while waiting for "
                f"{waiting_for} (the peer exited, or the link is down)"
            )
        frames = self.sock.recv_multipart(copy=False)
        if frames and frames[0].bytes == ERROR:
            text = frames[1].bytes.decode(errors="replace") if len(frames) > 1 else ""
            raise UsageError(f"the probe peer at {self.config.endpoint} refused a request: {text}")
        return frames

    def close(self) -> None:
        self.sock.close(0)


def _unreachable(config: LinkConfig) -> Unavailable:
    host, port = parse_endpoint(config.endpoint, bind=False, what="ENDPOINT")
    why = ""
    try:
        socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        why = f"; the name {host!r} does not resolve ({exc.strerror})"
    curve = (
        "; with --curve-server-key, check it is the key this peer printed (a wrong key fails the handshake silently)"
        if config.server_key
        else "; if the peer was started with --curve, pass --curve-server-key"
    )
    return Unavailable(
        f"no probe peer answered at {config.endpoint} within {config.connect_timeout_s:g} s{why}: expected "
        f"`pipeline probe serve --bind tcp://0.0.0.0:{port}` running on that host, and the port open between the hosts{curve}"
    )


def measure_link(config: LinkConfig, ctx: zmq.Context | None = None) -> LinkResult:
    """Connect, check the peer, then measure round trips and the rate each way; every wait bounded."""
    parse_endpoint(config.endpoint, bind=False, what="ENDPOINT")
    if not 0 < config.message_bytes <= MAX_MESSAGE_BYTES:
        raise UsageError(f"--bytes: expected 1 byte to {MAX_MESSAGE_BYTES} bytes per message, received {config.message_bytes}")
    if config.window < 1:
        raise UsageError(f"--window: expected at least 1 message in flight, received {config.window}")
    if config.seconds <= 0 or config.pings < 1:
        raise UsageError(f"--seconds and --pings: expected positive values, received {config.seconds} and {config.pings}")
    own = ctx is None
    ctx = ctx or zmq.Context()
    client = _Client(config, ctx)
    try:
        hello = _hello(client, config)
        if len(hello) < 3 or hello[0].bytes != HELLO or hello[1].bytes != PROTOCOL_VERSION:
            raise UsageError(
                f"the peer at {config.endpoint} is not a probe peer of protocol {PROTOCOL_VERSION.decode()}: "
                f"expected a hello, received {[f.bytes[:32] for f in hello]} (run the same project version on both hosts)"
            )
        about = json.loads(hello[2].bytes)
        log.info("probe_connected", endpoint=config.endpoint, peer=about)
        trips = _round_trips(client, config)
        upload = _stream(client, config, PUT) if config.upload else None
        download = _stream(client, config, GET) if config.download else None
        return LinkResult(
            endpoint=config.endpoint,
            peer_host=str(about.get("host", "")),
            round_trips=trips,
            upload=upload,
            download=download,
            message_bytes=config.message_bytes,
            window=config.window,
            curve=config.server_key is not None,
        )
    finally:
        client.close()
        if own:
            ctx.term()


def _round_trips(client: _Client, config: LinkConfig) -> RoundTrips:
    """Up to ``pings`` round trips of small messages, one at a time, within ``seconds``."""
    samples: list[float] = []
    end = time.monotonic() + config.seconds
    while len(samples) < config.pings and (len(samples) < 5 or time.monotonic() < end):
        seq = client.next_seq()
        t0 = time.perf_counter()
        client.sock.send_multipart([PING, seq])
        while True:
            frames = client.recv(config.reply_timeout_s, "a ping's answer")
            if frames[0].bytes == PONG and frames[1].bytes == seq:
                break
        samples.append(time.perf_counter() - t0)
    return RoundTrips(tuple(samples))


def _stream(client: _Client, config: LinkConfig, kind: bytes) -> Rate:
    """Keep ``window`` messages in flight for ``seconds``, then collect the rest; the steady rate of the deliveries."""
    payload = os.urandom(config.message_bytes) if kind == PUT else b""
    size = _u64(config.message_bytes)
    answer = ACK if kind == PUT else DATA
    waiting_for = "an upload's acknowledgement" if kind == PUT else "downloaded data"
    pending: set[bytes] = set()
    deliveries: list[Delivery] = []
    start = time.perf_counter()
    end = start + config.seconds
    while True:
        while len(pending) < config.window and time.perf_counter() < end:
            seq = client.next_seq()
            client.sock.send_multipart([PUT, seq, payload] if kind == PUT else [GET, seq, size], copy=False)
            pending.add(seq)
        if not pending:
            break
        frames = client.recv(config.reply_timeout_s, waiting_for)
        now = time.perf_counter()
        seq = frames[1].bytes if len(frames) > 1 else b""
        if frames[0].bytes != answer or seq not in pending:
            continue  # an answer from an earlier phase: not part of this one
        pending.discard(seq)
        nbytes = _read_u64(frames[2].bytes) if kind == PUT else len(frames[2].buffer)
        deliveries.append(Delivery(at_s=now - start, nbytes=nbytes))
    rate = steady_rate(deliveries, config.seconds)
    log.info("probe_stream", direction="upload" if kind == PUT else "download", mbit_s=round(rate.bits_per_s / 1e6, 2), messages=len(deliveries))
    return rate


def _hello(client: _Client, config: LinkConfig) -> list[zmq.Frame]:
    """Greet the peer and return its hello's frames; :func:`_unreachable`'s error when it does not answer in time."""
    client.sock.send_multipart([HELLO, PROTOCOL_VERSION])
    try:
        return client.recv(config.connect_timeout_s, "the peer's hello")
    except Unavailable:
        raise _unreachable(config) from None


def remote_speed(config: LinkConfig, params: dict[str, object], timeout_s: float) -> tuple[str, dict[str, object]]:
    """Ask the peer at ``config.endpoint`` to run the speed probe on its host: ``(peer host, the run's report)``."""
    parse_endpoint(config.endpoint, bind=False, what="--peer")
    ctx = zmq.Context()
    client = _Client(config, ctx)
    try:
        hello = _hello(client, config)
        about = json.loads(hello[2].bytes) if len(hello) >= 3 and hello[0].bytes == HELLO else {}
        client.sock.send_multipart([SPEED, json.dumps(params).encode()])
        while True:
            frames = client.recv(timeout_s, "the peer's speed run (building the model, warming up, timing)")
            if frames[0].bytes == SPEED:
                return str(about.get("host", "")), dict(json.loads(frames[1].bytes))
    finally:
        client.close()
        ctx.term()
