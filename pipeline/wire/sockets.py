"""Socket factories with every bound explicit: high-water marks, linger 0, immediate sends.

One ``zmq.Context`` per process (``zmq.Context.instance()``); every socket is
closed with linger 0 so a process never waits on an absent peer at exit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import zmq

#: a socket set-up applied before bind/connect (CURVE keys: :mod:`pipeline.wire.security`).
Configure = Callable[[zmq.Socket], None]


@dataclass(frozen=True)
class SocketBounds:
    """High-water marks (messages queued per peer) and receive limits."""

    send_hwm: int = 64
    recv_hwm: int = 256
    max_message_bytes: int = (1 << 30) + (1 << 20)  # ZMQ_MAXMSGSIZE per frame: a 1 GiB tensor plus slack


DEFAULT_BOUNDS = SocketBounds()


def pull(ctx: zmq.Context, bind: str, bounds: SocketBounds = DEFAULT_BOUNDS, configure: Configure | None = None) -> zmq.Socket:
    """A bound PULL socket (``configure`` runs before the bind)."""
    sock = ctx.socket(zmq.PULL)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, bounds.recv_hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, bounds.max_message_bytes)
    if configure is not None:
        configure(sock)
    sock.bind(bind)
    return sock


def takes_message(sock: zmq.Socket) -> bool:
    """Whether a send would not block now: for a ``ZMQ_IMMEDIATE`` PUSH, a peer is connected and its queue has room."""
    return bool(sock.getsockopt(zmq.EVENTS) & zmq.POLLOUT)


def push(ctx: zmq.Context, endpoint: str, bounds: SocketBounds = DEFAULT_BOUNDS, configure: Configure | None = None) -> zmq.Socket:
    """A connected PUSH socket that queues only to live peers (``ZMQ_IMMEDIATE``; ``configure`` runs before the connect)."""
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, bounds.send_hwm)
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
    if configure is not None:
        configure(sock)
    sock.connect(endpoint)
    return sock


#: how long the last messages of a stopping process (errors for what it refused, its last heartbeat) may take
#: to leave its sockets, in ms. Closed with no linger, a message still queued in ZeroMQ is dropped: a full test
#: run lost a worker's last heartbeat that way on a loaded machine.
CLOSE_LINGER_MS = 250


#: how long, past ``CLOSE_LINGER_MS``, a stopping process waits for its context to end before it exits anyway (s).
TERM_MARGIN_S = 0.25


def term_within(ctx: zmq.Context, timeout_s: float = CLOSE_LINGER_MS / 1000 + TERM_MARGIN_S) -> bool:
    """Terminate ``ctx``, so that what its closed sockets still hold leaves (each within its linger); wait at most
    ``timeout_s``. False when it did not finish in time (a socket left open somewhere): the caller exits anyway."""
    import threading

    done = threading.Event()

    def term() -> None:
        ctx.term()
        done.set()

    threading.Thread(target=term, name="zmq-term", daemon=True).start()
    return done.wait(timeout_s)
