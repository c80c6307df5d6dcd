"""A stopping process's last messages leave its closed sockets (pipeline.wire.sockets.term_within), with real
ZeroMQ sockets: a PUSH whose peer binds only after the close still delivers within the linger."""

from __future__ import annotations

import socket
import threading

import zmq

from pipeline.wire import sockets


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _last_message_arrives(linger_ms: int) -> tuple[bool, bytes | None]:
    port = _free_port()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    push.send(b"last heartbeat")  # queued: nobody listens yet
    push.close(linger=linger_ms)
    got: list[bytes] = []
    other = zmq.Context()
    pull = other.socket(zmq.PULL)

    def listen() -> None:
        pull.bind(f"tcp://127.0.0.1:{port}")
        if pull.poll(2000):
            got.append(pull.recv())

    listener = threading.Timer(0.05, listen)
    listener.start()
    finished = sockets.term_within(ctx, 2.0)
    listener.join(5.0)
    pull.close(linger=0)
    other.term()
    return finished, got[0] if got else None


def test_what_a_closed_socket_holds_leaves_within_its_linger() -> None:
    assert _last_message_arrives(sockets.CLOSE_LINGER_MS) == (True, b"last heartbeat")


def test_with_no_linger_it_is_dropped() -> None:
    # the behaviour the linger fixes: a worker closing with linger 0 lost its last heartbeat
    assert _last_message_arrives(0) == (True, None)


def test_a_socket_left_open_does_not_hold_the_exit() -> None:
    ctx = zmq.Context()
    left = ctx.socket(zmq.PUSH)  # never closed: ctx.term() would block for ever
    assert sockets.term_within(ctx, 0.2) is False
    left.close(linger=0)
