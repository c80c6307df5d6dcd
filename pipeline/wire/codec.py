"""The wire codec: a ZeroMQ multipart message is ``[envelope, tensor bytes...]``.

Frame 0 is a protobuf :class:`Envelope` with one :class:`TensorHeader` per
tensor; frames 1..n are the raw C-order bytes of each tensor. Large frames are
sent and received without copying (pyzmq copies frames below its
``copy_threshold`` itself, which is faster for small ones), and a received
tensor is a read-only numpy view over its frame.

``decode`` checks every frame against its header and raises
:class:`DecodeError` with a short ``reason`` (the counter label); ``recv``
turns that into a log line and a counted drop, never an exception.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import ml_dtypes
import numpy as np
import zmq

from pipeline.errors import DecodeError
from pipeline.log import get_logger
from pipeline.pb import envelope_pb2 as pb
from pipeline.topology import DTYPES

#: 2: deadlines travel as the remaining budget (``budget_ns``), no longer as an absolute time (``deadline_ns``).
WIRE_VERSION = 2

#: numpy dtype objects for the whitelisted dtype names.
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    name: np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name) for name in DTYPES
}

Envelope = pb.Envelope
Kind = pb.Kind

log = get_logger("pipeline.wire")


@dataclass(frozen=True)
class Limits:
    """Bounds a receiver enforces on every message before it touches the tensors."""

    max_frames: int = 257  # the envelope and up to 256 tensors
    max_envelope_bytes: int = 1 << 20  # 1 MiB of headers, spans and error text
    max_frame_bytes: int = 1 << 30  # 1 GiB for one tensor
    max_rank: int = 16


DEFAULT_LIMITS = Limits()


@dataclass
class Message:
    """A decoded message: its envelope and its tensors by name (read-only views over the frames)."""

    envelope: pb.Envelope
    tensors: dict[str, np.ndarray] = field(default_factory=dict)


class DropCounter:
    """Counts dropped messages by reason (thread-safe); the numbers feed logs, heartbeats and metrics."""

    def __init__(self) -> None:
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()

    def inc(self, reason: str, n: int = 1) -> None:
        with self._lock:
            self._counts[reason] += n

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self._counts.values())


def encode(envelope: pb.Envelope, tensors: Mapping[str, np.ndarray]) -> list[Any]:
    """Fill the envelope's tensor headers and return the frames to send.

    Arrays are made C-contiguous (a copy only when they are not already); the
    returned frames hold memoryviews of the arrays, so they must not be
    changed until the send has completed.
    """
    envelope.version = WIRE_VERSION
    del envelope.tensors[:]
    frames: list[Any] = [b""]
    for name, value in tensors.items():
        array = np.ascontiguousarray(value)
        name_of_dtype = dtype_name(array.dtype)
        if name_of_dtype not in NUMPY_DTYPES:
            raise DecodeError("bad_dtype", f"tensor {name!r} has dtype {array.dtype}; expected one of {sorted(DTYPES)}")
        header = envelope.tensors.add()
        header.name = name
        header.dtype = name_of_dtype
        header.shape.extend(array.shape)
        header.nbytes = array.nbytes
        frames.append(memoryview(array.reshape(-1).view(np.uint8)) if array.nbytes else b"")
    frames[0] = envelope.SerializeToString()
    return frames


def decode(frames: Sequence[Any], limits: Limits = DEFAULT_LIMITS, masks: Mapping[str, str] | None = None) -> Message:
    """Parse and check a received multipart message; raise :class:`DecodeError` when it does not fit.

    Once the envelope has parsed as a valid message, a :class:`DecodeError`
    carries it (``exc.envelope``), so a receiver can answer the request it names.
    ``masks`` (mask tensor name -> its tensor's name, the topology's ``mask_of``)
    checks each Keras mask that crosses a cut against its tensor (:func:`check_masks`).
    """
    if not frames:
        raise DecodeError("empty", "expected at least the envelope frame, received no frames")
    head = _buffer(frames[0])
    if len(head) > limits.max_envelope_bytes:
        raise DecodeError(
            "envelope_too_large",
            f"expected an envelope of at most {limits.max_envelope_bytes} bytes (max_envelope_bytes), received {len(head)}",
        )
    envelope = pb.Envelope()
    try:
        envelope.ParseFromString(bytes(head))
    except Exception as exc:  # protobuf raises DecodeError and, for some inputs, others
        raise DecodeError("bad_envelope", f"frame 0 is not a valid envelope: {exc}") from None
    if envelope.version != WIRE_VERSION:
        raise DecodeError("bad_version", f"expected wire version {WIRE_VERSION}, received {envelope.version}")
    if envelope.kind == pb.KIND_UNSPECIFIED:
        raise DecodeError("bad_kind", "expected a message kind, received none")
    if envelope.kind not in _KINDS:  # proto3 enums are open: an unknown number parses
        raise DecodeError("bad_kind", f"expected a message kind in {sorted(pb.Kind.keys())[1:]}, received {envelope.kind}")
    try:
        tensors = _tensors(envelope, frames, limits)
        if masks:
            check_masks(tensors, masks)
        return Message(envelope=envelope, tensors=tensors)
    except DecodeError as exc:
        exc.envelope = envelope
        raise


_KINDS = frozenset(pb.Kind.values())


def _tensors(envelope: pb.Envelope, frames: Sequence[Any], limits: Limits) -> dict[str, np.ndarray]:
    if len(frames) > limits.max_frames:
        raise DecodeError(
            "too_many_frames", f"expected at most {limits.max_frames} frames (max_frames), received {len(frames)}"
        )
    if len(envelope.tensors) != len(frames) - 1:
        raise DecodeError(
            "frame_count",
            f"envelope declares {len(envelope.tensors)} tensors, received {len(frames) - 1} tensor frames",
        )
    tensors: dict[str, np.ndarray] = {}
    for header, frame in zip(envelope.tensors, frames[1:]):
        dtype = NUMPY_DTYPES.get(header.dtype)
        if dtype is None:
            raise DecodeError("bad_dtype", f"tensor {header.name!r}: dtype {header.dtype!r} is not one of {sorted(DTYPES)}")
        if header.name in tensors:
            raise DecodeError("duplicate_tensor", f"tensor {header.name!r} appears twice in one message")
        shape = tuple(header.shape)
        if len(shape) > limits.max_rank or any(d < 0 for d in shape):
            raise DecodeError(
                "bad_shape",
                f"tensor {header.name!r}: expected a shape of at most {limits.max_rank} sizes >= 0 (max_rank), received {list(shape)}",
            )
        count = 1
        for d in shape:
            count *= d
            if count * dtype.itemsize > limits.max_frame_bytes:
                raise DecodeError(
                    "frame_too_large",
                    f"tensor {header.name!r}: shape {list(shape)} exceeds the {limits.max_frame_bytes}-byte frame limit (max_frame_bytes)",
                )
        expected = count * dtype.itemsize
        buf = _buffer(frame)
        if header.nbytes != expected or len(buf) != expected:
            raise DecodeError(
                "size_mismatch",
                f"tensor {header.name!r}: {header.dtype}{list(shape)} needs {expected} bytes; header says {header.nbytes}, frame has {len(buf)}",
            )
        array = np.frombuffer(buf, dtype=dtype, count=count).reshape(shape) if count else np.empty(shape, dtype)
        tensors[header.name] = array
    return tensors


def check_masks(tensors: Mapping[str, np.ndarray], masks: Mapping[str, str]) -> None:
    """Each mask frame travels with its tensor, is bool, and is shaped like the tensor's leading axes.

    ``masks`` maps a mask tensor's name to its tensor's name; raise :class:`DecodeError` (``bad_mask``).
    """
    for mask_name, tensor_name in masks.items():
        mask = tensors.get(mask_name)
        tensor = tensors.get(tensor_name)
        if mask is None and tensor is None:
            continue
        if mask is None:
            raise DecodeError("bad_mask", f"tensor {tensor_name!r} arrived without its Keras mask {mask_name!r}; expected both in one message")
        if tensor is None:
            raise DecodeError("bad_mask", f"mask {mask_name!r} arrived without its tensor {tensor_name!r}; expected both in one message")
        if mask.dtype != np.bool_:
            raise DecodeError("bad_mask", f"mask {mask_name!r}: expected dtype bool, received {dtype_name(mask.dtype)}")
        if not 0 < mask.ndim <= tensor.ndim or mask.shape != tensor.shape[: mask.ndim]:
            raise DecodeError(
                "bad_mask",
                f"mask {mask_name!r}: expected a shape made of the leading axes of {tensor_name!r} {list(tensor.shape)}, "
                f"received {list(mask.shape)}",
            )


def send(socket: zmq.Socket, envelope: pb.Envelope, tensors: Mapping[str, np.ndarray] | None = None, flags: int = 0) -> None:
    """Encode and send one message (large frames without copying)."""
    socket.send_multipart(encode(envelope, tensors or {}), flags=flags, copy=False)


#: a receiver's answer to a dropped message whose envelope names a request (``exc.envelope``).
OnDrop = Callable[[DecodeError], None]


def recv(
    socket: zmq.Socket,
    counter: DropCounter | None = None,
    limits: Limits = DEFAULT_LIMITS,
    flags: int = 0,
    on_drop: OnDrop | None = None,
    masks: Mapping[str, str] | None = None,
) -> Message | None:
    """Receive one message; a message that does not fit is logged, counted and returned as ``None``."""
    frames = socket.recv_multipart(flags=flags, copy=False)
    return decode_or_drop(frames, counter, limits, on_drop, masks)


async def arecv(
    socket: Any, counter: DropCounter | None = None, limits: Limits = DEFAULT_LIMITS, on_drop: OnDrop | None = None
) -> Message | None:
    """``recv`` for a ``zmq.asyncio`` socket."""
    frames = await socket.recv_multipart(copy=False)
    return decode_or_drop(frames, counter, limits, on_drop)


def decode_or_drop(
    frames: Sequence[Any],
    counter: DropCounter | None,
    limits: Limits = DEFAULT_LIMITS,
    on_drop: OnDrop | None = None,
    masks: Mapping[str, str] | None = None,
) -> Message | None:
    """``decode``, or log and count the drop (and pass it to ``on_drop``); never raises for a bad message."""
    try:
        return decode(frames, limits, masks)
    except DecodeError as exc:
        if counter is not None:
            counter.inc(exc.reason)
        env = exc.envelope
        log.warning(
            "message_dropped",
            reason=exc.reason,
            detail=exc.message,
            frames=len(frames),
            request_id=env.request_id if env is not None else None,
            sender=env.sender if env is not None else None,
        )
        if on_drop is not None and env is not None:
            try:
                on_drop(exc)
            except Exception:  # the receive loop must go on whatever the answer does
                log.exception("drop_answer_failed", reason=exc.reason)
        return None


def hop_span(env: pb.Envelope, receiver: str, received_ns: int) -> pb.Span:
    """``{sender}->{receiver}.hop``: a message's hop from its sender's ``sent_ns`` to ``received_ns`` (wall clocks
    of two processes: across hosts, off by their clocks' skew)."""
    return pb.Span(name=f"{env.sender or '?'}->{receiver}.hop", start_ns=env.sent_ns, end_ns=received_ns)


def error_envelope(request_id: int, model: str, sender: str, code: int, message: str) -> pb.Envelope:
    """An ERROR envelope for the ingress; ``code`` is a gRPC status code's integer value."""
    env = pb.Envelope(kind=pb.ERROR, request_id=request_id, model=model, sender=sender)
    env.error.code = code
    env.error.message = message
    env.error.origin = sender
    return env


def _buffer(frame: Any) -> memoryview:
    if isinstance(frame, zmq.Frame):
        return frame.buffer
    return memoryview(frame)


def dtype_name(dtype: np.dtype[Any]) -> str:
    if dtype == ml_dtypes.bfloat16:
        return "bfloat16"
    return dtype.name
