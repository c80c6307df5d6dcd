"""The hop: one tensor through encode, send, receive and decode, against a bare ZeroMQ hop.

Both sides use the same pair of sockets (PUSH to PULL over TCP loopback, the
transport between processes) and the same pattern, one message at a time, so
the ratio is the cost of the envelope, the checks and the numpy view.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import zmq

from pipeline.wire import codec, sockets

SIZES = ((64 * 1024, "64 KiB", 400), (1024 * 1024, "1 MiB", 200), (16 * 1024 * 1024, "16 MiB", 30))


def _pair(ctx: zmq.Context) -> tuple[zmq.Socket, zmq.Socket]:
    pull = sockets.pull(ctx, "tcp://127.0.0.1:0")
    push = sockets.push(ctx, pull.getsockopt(zmq.LAST_ENDPOINT).decode())
    for _ in range(100):  # ZMQ_IMMEDIATE: wait for the connection before timing
        try:
            push.send(b"x", zmq.NOBLOCK)
            pull.recv()
            break
        except zmq.Again:
            time.sleep(0.01)
    return push, pull


def _time_codec(push: zmq.Socket, pull: zmq.Socket, array: np.ndarray, n: int) -> list[float]:
    env = codec.Envelope(kind=codec.Kind.REQUEST, request_id=1, model="bench", sender="bench")
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        env.request_id = i + 1
        codec.send(push, env, {"tensor:0": array})
        msg = codec.recv(pull)
        assert msg is not None and msg.tensors["tensor:0"].shape == array.shape
        out.append(time.perf_counter() - t0)
    return out


def _time_bare(push: zmq.Socket, pull: zmq.Socket, array: np.ndarray, n: int) -> list[float]:
    header = b"h" * 64
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        push.send_multipart([header, memoryview(array.reshape(-1).view(np.uint8))], copy=False)
        frames = pull.recv_multipart(copy=False)
        assert len(frames[1].buffer) == array.nbytes
        out.append(time.perf_counter() - t0)
    return out


def bench_hops() -> list[dict[str, Any]]:
    """Median microseconds per hop for each size, through the codec and bare."""
    ctx = zmq.Context.instance()
    push, pull = _pair(ctx)
    rows = []
    try:
        for nbytes, label, n in SIZES:
            array = np.random.default_rng(0).standard_normal(nbytes // 4).astype(np.float32)
            # interleave the two so drift on a shared machine hits both alike
            c, b = [], []
            for _ in range(3):
                c += _time_codec(push, pull, array, n // 3 + 1)
                b += _time_bare(push, pull, array, n // 3 + 1)
            row = {
                "label": label,
                "bytes": nbytes,
                "codec_us": float(np.median(c) * 1e6),
                "bare_us": float(np.median(b) * 1e6),
            }
            row["ratio"] = row["codec_us"] / row["bare_us"]
            rows.append(row)
    finally:
        push.close(linger=0)
        pull.close(linger=0)
    return rows

