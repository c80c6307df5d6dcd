"""The wire's mask checks: a Keras mask crossing a cut travels with its tensor, as a bool tensor shaped like the
tensor's leading axes; a frame that does not fit is dropped with a log line and a counter, never an exception."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import structlog

from pipeline.errors import DecodeError
from pipeline.pb import envelope_pb2 as pb
from pipeline.wire import codec

MASKS = {"h:0:mask": "h:0"}


def _frames(tensors: Mapping[str, np.ndarray]) -> list[bytes]:
    env = pb.Envelope(kind=pb.REQUEST, request_id=7, model="m", sender="shard0")
    return [bytes(f) for f in codec.encode(env, tensors)]


def _good(batch: int = 3, steps: int = 5) -> dict[str, np.ndarray]:
    mask = np.ones((batch, steps), bool)
    mask[1, 3:] = False
    return {"h:0": np.arange(batch * steps * 4, dtype=np.float32).reshape(batch, steps, 4), "h:0:mask": mask}


def test_a_mask_with_its_tensor_passes() -> None:
    message = codec.decode(_frames(_good()), masks=MASKS)
    np.testing.assert_array_equal(message.tensors["h:0:mask"], _good()["h:0:mask"])
    # other tensors in the message are not concerned
    message = codec.decode(_frames({**_good(), "tokens": np.zeros((3, 5), np.int32)}), masks=MASKS)
    assert set(message.tensors) == {"h:0", "h:0:mask", "tokens"}
    # a message holding neither (another producer's part) is not concerned either
    assert codec.decode(_frames({"tokens": np.zeros((3, 5), np.int32)}), masks=MASKS).tensors


@pytest.mark.parametrize(
    "case, tensors, text",
    [
        ("float mask", {**_good(), "h:0:mask": np.ones((3, 5), np.float32)}, "expected dtype bool, received float32"),
        ("int mask", {**_good(), "h:0:mask": np.ones((3, 5), np.uint8)}, "expected dtype bool, received uint8"),
        ("short steps", {**_good(), "h:0:mask": np.ones((3, 4), bool)}, "leading axes of 'h:0' [3, 5, 4], received [3, 4]"),
        ("other batch", {**_good(), "h:0:mask": np.ones((2, 5), bool)}, "received [2, 5]"),
        ("too many axes", {**_good(), "h:0:mask": np.ones((3, 5, 4, 1), bool)}, "received [3, 5, 4, 1]"),
        ("no mask", {"h:0": _good()["h:0"]}, "arrived without its Keras mask 'h:0:mask'"),
        ("no tensor", {"h:0:mask": _good()["h:0:mask"]}, "arrived without its tensor 'h:0'"),
    ],
)
def test_a_malformed_mask_frame_is_refused(case: str, tensors: dict[str, np.ndarray], text: str) -> None:
    with pytest.raises(DecodeError) as excinfo:
        codec.decode(_frames(tensors), masks=MASKS)
    assert excinfo.value.reason == "bad_mask"
    assert text in excinfo.value.message, excinfo.value.message
    assert excinfo.value.envelope is not None and excinfo.value.envelope.request_id == 7  # so it can be answered


def test_a_malformed_mask_is_dropped_logged_and_counted() -> None:
    counter = codec.DropCounter()
    answered: list[DecodeError] = []
    bad = {**_good(), "h:0:mask": np.ones((3, 5), np.float32)}
    with structlog.testing.capture_logs() as logs:
        assert codec.decode_or_drop(_frames(bad), counter, on_drop=answered.append, masks=MASKS) is None
    assert counter.snapshot() == {"bad_mask": 1}
    assert [(e["event"], e["reason"]) for e in logs] == [("message_dropped", "bad_mask")]
    assert logs[0]["request_id"] == 7 and "expected dtype bool" in logs[0]["detail"]
    assert len(answered) == 1 and answered[0].reason == "bad_mask"
    # the same message is fine for a receiver that has no masks to check, and a good one passes
    assert codec.decode_or_drop(_frames(bad), counter) is not None
    assert codec.decode_or_drop(_frames(_good()), counter, masks=MASKS) is not None
    assert counter.total == 1


def test_a_mask_of_a_two_axis_tensor() -> None:
    """Embedding on a (batch,) input: the tensor is (batch, dim) and its mask (batch,)."""
    tensors = {"e:0": np.zeros((4, 8), np.float32), "e:0:mask": np.array([True, False, True, True])}
    assert codec.decode(_frames(tensors), masks={"e:0:mask": "e:0"}).tensors["e:0:mask"].shape == (4,)
