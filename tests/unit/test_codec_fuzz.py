"""Property tests of the envelope decoder: any frames in, a checked message or a counted drop out, never an exception."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.errors import DecodeError
from pipeline.pb import envelope_pb2 as pb
from pipeline.topology import DTYPES
from pipeline.wire import codec

SMALL = codec.Limits(max_frames=9, max_envelope_bytes=4096, max_frame_bytes=4096, max_rank=4)
INT64 = st.integers(-(2**63), 2**63 - 1)
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _checked(frames: list[bytes], limits: codec.Limits = SMALL) -> tuple[codec.Message | None, codec.DropCounter, list[DecodeError]]:
    """decode_or_drop, and the invariants every outcome must keep."""
    counter = codec.DropCounter()
    answered: list[DecodeError] = []
    message = codec.decode_or_drop(frames, counter, limits, on_drop=answered.append)
    if message is None:
        assert counter.total == 1, "a dropped message is counted exactly once"
        (reason,) = counter.snapshot()
        assert reason and reason.isidentifier()
        for exc in answered:
            assert exc.envelope is not None and exc.reason == reason
    else:
        assert counter.total == 0 and not answered
        env = message.envelope
        assert env.version == codec.WIRE_VERSION and env.kind != pb.KIND_UNSPECIFIED
        assert list(message.tensors) == [h.name for h in env.tensors]
        for header, frame in zip(env.tensors, frames[1:]):
            array = message.tensors[header.name]
            assert array.dtype == codec.NUMPY_DTYPES[header.dtype]
            assert list(array.shape) == list(header.shape)
            assert array.nbytes == header.nbytes == len(frame) <= limits.max_frame_bytes
            if array.size:
                assert not array.flags.writeable  # a view over the received frame, never a copy
    return message, counter, answered


# ------------------------------------------------------------ bytes of any kind
@FUZZ
@given(st.lists(st.binary(max_size=300), max_size=12))
def test_any_frames_decode_or_are_counted_as_dropped(frames: list[bytes]) -> None:
    _checked(frames)


headers = st.builds(
    lambda name, dtype, shape, nbytes: pb.TensorHeader(name=name, dtype=dtype, shape=shape, nbytes=nbytes),
    st.sampled_from(["x", "y", "x", ""]),
    st.sampled_from(sorted(DTYPES) + ["object", "float128", "<f4", ""]),
    st.lists(st.one_of(st.integers(-2, 6), INT64), max_size=6),
    st.one_of(st.integers(0, 64), st.integers(0, 2**64 - 1)),
)


@st.composite
def structured(draw: st.DrawFn) -> list[bytes]:
    """An envelope that parses, with headers and frames that may or may not agree."""
    env = pb.Envelope(
        version=draw(st.sampled_from([codec.WIRE_VERSION, codec.WIRE_VERSION, 0, 1, 3, 2**32 - 1])),
        kind=draw(st.sampled_from([pb.REQUEST, pb.RESULT, pb.ERROR, pb.HEARTBEAT, pb.KIND_UNSPECIFIED, 99])),
        request_id=draw(st.integers(0, 2**64 - 1)),
        model=draw(st.text(max_size=8)),
        budget_ns=draw(INT64),
        sender=draw(st.text(max_size=8)),
    )
    env.tensors.extend(draw(st.lists(headers, max_size=4)))
    frames = [env.SerializeToString()]
    for header in env.tensors:
        dtype = codec.NUMPY_DTYPES.get(header.dtype)
        count = int(np.prod([max(d, 0) for d in header.shape], dtype=object)) if header.shape else 1
        exact = dtype is not None and count * dtype.itemsize <= 512
        size = count * dtype.itemsize if exact else draw(st.integers(0, 64))
        size = draw(st.sampled_from([size, size, max(size - 1, 0), size + 1]))
        frames.append(bytes(draw(st.binary(min_size=size, max_size=size))) if size <= 64 else b"\x01" * size)
    extra = draw(st.integers(-1, 2))
    if extra < 0 and len(frames) > 1:
        frames.pop()
    frames.extend([b"\x00"] * max(extra, 0))
    return frames


@FUZZ
@given(structured())
def test_envelopes_with_any_headers_and_frames_decode_exactly_or_are_dropped(frames: list[bytes]) -> None:
    _checked(frames)


@FUZZ
@given(
    st.lists(
        st.tuples(st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 4), max_size=3)), min_size=1, max_size=4, unique_by=lambda t: t[0]
    ),
    st.data(),
)
def test_a_valid_message_survives_and_any_corruption_of_it_is_caught(specs: list[tuple[str, list[int]]], data: st.DataObject) -> None:
    rng = np.random.default_rng(0)
    tensors = {
        dtype: rng.integers(0, 100, shape).astype(codec.NUMPY_DTYPES[dtype]) for dtype, shape in specs
    }
    env = pb.Envelope(kind=pb.REQUEST, request_id=7, model="m", sender="s")
    frames = [bytes(f) for f in codec.encode(env, tensors)]
    message, _, _ = _checked(frames, codec.DEFAULT_LIMITS)
    assert message is not None
    for name, value in tensors.items():
        np.testing.assert_array_equal(message.tensors[name], value)
    # now corrupt it: flip bytes of the envelope, cut or grow a frame, drop or add a frame
    which = data.draw(st.sampled_from(["flip", "cut", "grow", "drop", "add"]))
    must_fail = which in ("grow", "drop", "add")
    if which == "flip":
        head = bytearray(frames[0])
        for i in data.draw(st.lists(st.integers(0, len(head) - 1), min_size=1, max_size=4)):
            head[i] ^= data.draw(st.integers(1, 255))
        frames[0] = bytes(head)
    elif which in ("cut", "grow"):
        i = data.draw(st.integers(1, len(frames) - 1))
        must_fail = must_fail or len(frames[i]) > 0  # cutting an empty frame changes nothing
        frames[i] = frames[i][:-1] if which == "cut" else frames[i] + b"\x00"
    elif which == "drop":
        frames.pop(data.draw(st.integers(1, len(frames) - 1)))
    else:
        frames.append(b"")
    corrupted, counter, _ = _checked(frames, codec.DEFAULT_LIMITS)
    if must_fail:
        assert corrupted is None, f"{which}: corrupted frames decoded as {corrupted}"
        assert counter.total == 1


# ----------------------------------------------------------------- the limits
def test_each_size_limit_is_a_named_drop_with_resource_exhausted_and_the_request_named() -> None:
    env = pb.Envelope(kind=pb.REQUEST, request_id=42, model="m", sender="s1")
    cases = {
        "too_many_frames": (codec.encode(env, {f"t{i}": np.zeros(1, np.int8) for i in range(9)}), "max_frames"),
        "frame_too_large": (codec.encode(env, {"t": np.zeros(5000, np.uint8)}), "max_frame_bytes"),
        "bad_shape": (codec.encode(env, {"t": np.zeros((1,) * 5, np.uint8)}), "max_rank"),
    }
    for reason, (frames, limit_name) in cases.items():
        with pytest.raises(DecodeError) as excinfo:
            codec.decode([bytes(f) for f in frames], SMALL)
        exc = excinfo.value
        assert exc.reason == reason and limit_name in exc.message
        assert exc.envelope.request_id == 42  # so the receiver can answer request 42
        expected = grpc.StatusCode.INTERNAL if reason == "bad_shape" else grpc.StatusCode.RESOURCE_EXHAUSTED
        assert exc.status == expected
    big = pb.Envelope(kind=pb.REQUEST, request_id=1, model="m" * 5000)
    with pytest.raises(DecodeError) as excinfo:
        codec.decode([big.SerializeToString()], SMALL)
    assert excinfo.value.reason == "envelope_too_large" and "max_envelope_bytes" in excinfo.value.message
    assert excinfo.value.envelope is None  # never parsed, so no request can be named
    assert excinfo.value.status == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_failing_drop_answer_does_not_escape_the_receive_path() -> None:
    env = pb.Envelope(kind=pb.REQUEST, request_id=3, model="m")
    frames = [bytes(f) for f in codec.encode(env, {"t": np.zeros(3, np.float32)})]
    frames[1] = frames[1][:-1]

    def explode(exc: DecodeError) -> None:
        raise RuntimeError("the answer failed")

    counter = codec.DropCounter()
    assert codec.decode_or_drop(frames, counter, on_drop=explode) is None
    assert counter.snapshot() == {"size_mismatch": 1}
