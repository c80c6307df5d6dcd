"""KServe v2 tensor conversion and request validation, and the pending and liveness tables (pure: no sockets)."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from google.protobuf import message as protobuf_message
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.errors import InvalidInput, ModelNotFound
from pipeline.pb import grpc_service_pb2 as kpb
from pipeline.pb import model_config_pb2 as mcpb
from pipeline.serving import kserve
from pipeline.wire import codec
from pipeline.serving.pending import Liveness, Outcome, PendingTable
from pipeline.topology import Batching, IngressSpec, ShardOutput, ShardSpec, TensorSpec, Topology

ALL = ["BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32", "INT64", "FP16", "FP32", "FP64", "BF16"]


def _topology(*inputs: TensorSpec, outputs: tuple[TensorSpec, ...] = (TensorSpec("y", "float32", (-1, 3)),)) -> Topology:
    return Topology(
        name="m",
        inputs=inputs,
        outputs=outputs,
        tensors={s.name: s for s in inputs + outputs},
        shards=(
            ShardSpec(
                name="s0",
                file="s0.keras",
                inputs=tuple(s.name for s in inputs),
                outputs=tuple(ShardOutput(o.name, ("ingress",)) for o in outputs),
                endpoint="ipc:///tmp/x-s0",
                host="127.0.0.1",
                bind="ipc:///tmp/x-s0",
                batching=Batching(max_batch=4, max_delay_ms=1.5),
            ),
        ),
        ingress=IngressSpec(grpc="127.0.0.1:0", results="ipc:///tmp/x-in", host="127.0.0.1", bind="ipc:///tmp/x-in"),
        directory=Path("."),
    )


TOY = _topology(TensorSpec("x", "float32", (-1, 4)), TensorSpec("ids", "int64", (-1, 2)))


def _sample(datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    dtype = kserve.numpy_dtype(datatype)
    rng = np.random.default_rng(1)
    if dtype.kind == "b":
        return rng.integers(0, 2, shape).astype(bool)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(max(info.min, -100), min(info.max, 100), shape).astype(dtype)
    return rng.standard_normal(shape).astype(dtype)


def _raw(model: str, arrays: dict[str, np.ndarray]) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=model)
    for name, array in arrays.items():
        request.inputs.add(name=name, datatype=kserve.kserve_datatype(codec.dtype_name(array.dtype)), shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    return request


def _good() -> dict[str, np.ndarray]:
    return {"x": np.arange(8, dtype=np.float32).reshape(2, 4), "ids": np.array([[1, 2], [3, 4]], np.int64)}


# ------------------------------------------------------------- datatypes
def test_datatype_tables_cover_every_wire_dtype() -> None:
    from pipeline.topology import DTYPES

    assert set(kserve.KSERVE_TO_NUMPY) == set(ALL)
    assert set(kserve.NUMPY_TO_KSERVE) == set(DTYPES)
    assert set(kserve.NUMPY_TO_TRITON_TYPE) == set(DTYPES)
    assert kserve.numpy_dtype("BF16") == np.dtype(ml_dtypes.bfloat16)
    with pytest.raises(InvalidInput, match="'BYTES' is not supported"):
        kserve.numpy_dtype("BYTES")


@pytest.mark.parametrize("datatype", ALL)
def test_raw_round_trip_for_every_datatype(datatype: str) -> None:
    dtype_name = kserve.KSERVE_TO_NUMPY[datatype]
    spec = TensorSpec("t", dtype_name, (-1, 3))
    array = _sample(datatype, (2, 3))
    decoded = kserve.raw_to_array(spec, array.tobytes(), (2, 3))
    assert decoded.dtype == array.dtype and decoded.shape == (2, 3)
    np.testing.assert_array_equal(decoded, array)
    assert not decoded.flags.writeable  # a view over the request's bytes, not a copy


@pytest.mark.parametrize("datatype", [d for d in ALL if d not in ("FP16", "BF16")])
def test_typed_contents_round_trip_for_every_datatype(datatype: str) -> None:
    array = _sample(datatype, (2, 3))
    contents = kserve.array_to_contents(array)
    assert len(getattr(contents, kserve.CONTENTS_FIELD[datatype])) == 6
    decoded = kserve.contents_to_array("t", datatype, contents, (2, 3))
    assert decoded.dtype == array.dtype
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize("datatype", ["FP16", "BF16"])
def test_16_bit_floats_must_be_raw(datatype: str) -> None:
    contents = kpb.InferTensorContents(fp32_contents=[1.0, 2.0])
    with pytest.raises(InvalidInput, match=f"datatype {datatype} has no typed contents field; expected its data in raw_input_contents"):
        kserve.contents_to_array("t", datatype, contents, (2,))


def test_typed_contents_errors_say_expected_and_received() -> None:
    with pytest.raises(InvalidInput, match=r"datatype FP32 expects contents.fp32_contents, received \['int_contents'\]"):
        kserve.contents_to_array("t", "FP32", kpb.InferTensorContents(int_contents=[1, 2]), (2,))
    with pytest.raises(InvalidInput, match=r"shape \[2, 2\] needs 4 values in contents.fp32_contents, received 3"):
        kserve.contents_to_array("t", "FP32", kpb.InferTensorContents(fp32_contents=[1, 2, 3]), (2, 2))
    with pytest.raises(InvalidInput, match=r"INT8 values must lie in \[-128, 127\], received values in \[1, 300\]"):
        kserve.contents_to_array("t", "INT8", kpb.InferTensorContents(int_contents=[1, 300]), (2,))
    with pytest.raises(InvalidInput, match=r"UINT8 values must lie in \[0, 255\]"):
        kserve.contents_to_array("t", "UINT8", kpb.InferTensorContents(uint_contents=[256]), (1,))


@settings(max_examples=40, deadline=None)
@given(
    st.sampled_from([d for d in ALL if d not in ("FP16", "BF16")]),
    st.lists(st.integers(0, 3), min_size=1, max_size=3),
)
def test_typed_contents_round_trip_any_shape(datatype: str, shape: list[int]) -> None:
    array = _sample(datatype, tuple(shape))
    decoded = kserve.contents_to_array("t", datatype, kserve.array_to_contents(array), tuple(shape))
    assert decoded.shape == tuple(shape)
    np.testing.assert_array_equal(decoded, array)


# ------------------------------------------------------------- validation
def test_decode_good_request_raw_and_typed() -> None:
    decoded = kserve.decode_request(TOY, _raw("m", _good()))
    assert list(decoded.inputs) == ["x", "ids"] and decoded.batch_size == 2
    np.testing.assert_array_equal(decoded.inputs["ids"], _good()["ids"])
    assert decoded.requested_outputs == ("y",) and decoded.timing is False

    request = kpb.ModelInferRequest(model_name="m")
    for name, array in reversed(list(_good().items())):  # any input order
        t = request.inputs.add(name=name, datatype=kserve.kserve_datatype(array.dtype.name), shape=list(array.shape))
        t.contents.CopyFrom(kserve.array_to_contents(array))
    request.parameters["timing"].bool_param = True
    decoded = kserve.decode_request(TOY, request)
    np.testing.assert_array_equal(decoded.inputs["x"], _good()["x"])
    assert decoded.timing is True


def test_any_batch_size_and_the_batch_bound() -> None:
    for batch in (1, 5, 17):
        arrays = {"x": np.zeros((batch, 4), np.float32), "ids": np.zeros((batch, 2), np.int64)}
        assert kserve.decode_request(TOY, _raw("m", arrays)).batch_size == batch
    arrays = {"x": np.zeros((9, 4), np.float32), "ids": np.zeros((9, 2), np.int64)}
    with pytest.raises(InvalidInput, match="expected a batch size of at most 8, received 9"):
        kserve.decode_request(TOY, _raw("m", arrays), max_batch_size=8)


def _mutate(case: str) -> kpb.ModelInferRequest:
    good = _good()
    if case == "missing":
        return _raw("m", {"x": good["x"]})
    if case == "extra":
        return _raw("m", {**good, "z": good["x"]})
    if case == "duplicate":
        request = _raw("m", good)
        request.inputs.add().CopyFrom(request.inputs[0])
        request.raw_input_contents.append(request.raw_input_contents[0])
        return request
    if case == "datatype":
        return _raw("m", {**good, "ids": good["ids"].astype(np.int32)})
    if case == "rank":
        return _raw("m", {**good, "x": good["x"].reshape(2, 2, 2)})
    if case == "dim":
        return _raw("m", {**good, "x": np.zeros((2, 3), np.float32)})
    if case == "negative":
        request = _raw("m", good)
        request.inputs[0].shape[0] = -1
        return request
    if case == "bytes":
        request = _raw("m", good)
        request.raw_input_contents[1] = request.raw_input_contents[1] + b"\0"
        return request
    if case == "raw_count":
        request = _raw("m", good)
        del request.raw_input_contents[1]
        return request
    if case == "both":
        request = _raw("m", good)
        request.inputs[1].contents.int64_contents.extend([1, 2, 3, 4])
        return request
    if case == "neither":
        request = _raw("m", good)
        del request.raw_input_contents[:]
        request.inputs[0].contents.fp32_contents.extend(range(8))
        return request
    if case == "output":
        request = _raw("m", good)
        request.outputs.add(name="nope")
        return request
    raise AssertionError(case)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing", r"expected inputs \['x', 'ids'\], received \['x'\] \(missing \['ids'\]\)"),
        ("extra", r"received \['x', 'ids', 'z'\] \(unexpected \['z'\]\)"),
        ("duplicate", r"each input may appear once; received \['x'\] more than once"),
        ("datatype", r"input 'ids': expected datatype INT64, received INT32"),
        ("rank", r"input 'x': expected rank 2 \(shape \[-1, 4\]\), received rank 3 \(shape \[2, 2, 2\]\)"),
        ("dim", r"input 'x': expected shape \[-1, 4\] \(-1: any size\), received \[2, 3\]"),
        ("negative", r"input 'x': expected a concrete shape of sizes >= 0, received \[-1, 4\]"),
        ("bytes", r"input 'ids': INT64\[2, 2\] needs 32 bytes \(4 x 8\), received 33 bytes in raw_input_contents"),
        ("raw_count", r"expected one raw_input_contents entry per input \(2\), received 1"),
        ("both", r"not both; received 2 raw_input_contents and typed contents for \['ids'\]"),
        ("neither", r"received neither for \['ids'\]"),
        ("output", r"requested outputs \['nope'\] do not exist; expected some of \['y'\]"),
    ],
)
def test_invalid_requests_name_expected_and_received(case: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as excinfo:
        kserve.decode_request(TOY, _mutate(case))
    assert excinfo.value.status.name == "INVALID_ARGUMENT"


def test_unknown_model_and_version() -> None:
    with pytest.raises(ModelNotFound, match=r"model 'other' is not served here; expected 'm'") as excinfo:
        kserve.decode_request(TOY, _raw("other", _good()))
    assert excinfo.value.status.name == "NOT_FOUND"
    request = _raw("m", _good())
    request.model_version = "2"
    with pytest.raises(ModelNotFound, match=r"no version '2'; expected '1' or an empty version"):
        kserve.decode_request(TOY, request)
    request.model_version = "1"
    kserve.decode_request(TOY, request)


# ------------------------------------------------------------- outputs and metadata
def test_encode_outputs_and_read_back() -> None:
    response = kpb.ModelInferResponse()
    outputs = {"y": np.arange(6, dtype=np.float32).reshape(2, 3), "z": np.array([1, 0], bool)}
    kserve.encode_outputs(TOY, outputs, ["z", "y"], response)
    assert [(t.name, t.datatype, list(t.shape)) for t in response.outputs] == [("z", "BOOL", [2]), ("y", "FP32", [2, 3])]
    np.testing.assert_array_equal(kserve.output_array(response, 1), outputs["y"])
    np.testing.assert_array_equal(kserve.output_array(response, 0), outputs["z"])


def test_check_output() -> None:
    spec = TensorSpec("y", "float32", (-1, 3))
    assert kserve.check_output(spec, np.zeros((2, 3), np.float32), 2, "s0") is None
    assert "as float64, expected float32" in kserve.check_output(spec, np.zeros((2, 3)), 2, "s0")
    assert "with shape [3, 3], expected [-1, 3] with batch size 2" in kserve.check_output(
        spec, np.zeros((3, 3), np.float32), 2, "s0"
    )


def test_model_metadata_and_config() -> None:
    meta = kserve.model_metadata(TOY, "keras_pipeline")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 4]), ("ids", "INT64", [-1, 2])]
    config = kserve.model_config(TOY, "keras_pipeline", 64)
    assert config.max_batch_size == 64
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [("x", mcpb.TYPE_FP32, [4]), ("ids", mcpb.TYPE_INT64, [2])]
    assert list(config.dynamic_batching.preferred_batch_size) == [4]
    assert config.dynamic_batching.max_queue_delay_microseconds == 1500
    fixed = _topology(TensorSpec("x", "float32", (1, 4)), outputs=(TensorSpec("y", "float32", (1, 3)),))
    config = kserve.model_config(fixed, "keras_pipeline", 64)
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [1, 4]


# ------------------------------------------------------------- pending table and liveness
def test_pending_table_joins_parts_and_ends_once() -> None:
    import asyncio

    async def scenario() -> None:
        table = PendingTable(capacity=2)
        future = table.add(1, ["a", "b"], batch_size=1, deadline_ns=0)
        assert table.part(1, {"a": np.zeros(1)}, []) is None and not future.done()
        assert table.part(1, {"c": np.zeros(1)}, []) == "unexpected_output"
        assert table.part(1, {"b": np.ones(1)}, []) is None
        outcome = future.result()
        assert isinstance(outcome, Outcome) and sorted(outcome.outputs) == ["a", "b"]
        assert len(table) == 0
        assert table.part(1, {"b": np.ones(1)}, []) == "unknown_request"  # late: ignored and counted
        assert table.ignored["unknown_request"] == 1
        table.add(2, ["a"], 1, 0)
        table.add(3, ["a"], 1, 0)
        assert table.full
        assert table.fail_all(lambda: InvalidInput("x")) == 2 and len(table) == 0
        assert not table.finish(2, InvalidInput("again"))  # ends exactly once
        f4 = table.add(4, ["a"], 1, 5)
        assert table.expired(now_ns=10) == [4]
        table.discard(4)
        assert f4.cancelled() and len(table) == 0

    asyncio.run(scenario())


def test_liveness() -> None:
    live = Liveness(["a", "b"], down_after_s=0.3)
    assert live.not_up(now=1.0) == {"a": "no heartbeat yet", "b": "no heartbeat yet"}
    assert not live.beat("a", True, 10, now=1.0)
    live.beat("b", False, 11, now=1.0)
    assert live.not_up(now=1.1) == {"b": "not ready (loading or warming up)"}
    live.beat("b", True, 11, now=1.1)
    assert live.all_up(now=1.2) and live.went_down(now=1.2) == []
    assert live.went_down(now=1.35) == ["a"]  # a's heartbeat is 0.35 s old
    assert live.went_down(now=1.36) == []  # edge-triggered
    assert live.beat("a", True, 12, now=1.4)  # a new pid: restarted
    live.set_connected("b", False)
    assert "not connected" in live.not_up(now=1.4)["b"]


def _whole(received: kserve.ReceivedRequest) -> kpb.ModelInferRequest:
    """The request parse_infer_request read, with its raw contents put back in."""
    whole = kpb.ModelInferRequest()
    whole.CopyFrom(received.request)
    whole.raw_input_contents.extend(bytes(r) for r in received.raw)
    return whole


def test_parse_infer_request_keeps_the_tensors_in_the_received_bytes() -> None:
    arrays = {"x": np.arange(24, dtype=np.float32).reshape(2, 12), "ids": np.array([[7], [9]], dtype=np.int64), "e": np.zeros((2, 0), np.float32)}
    request = kserve.infer_request("m", arrays, timing=True)
    request.id = "r-1"
    request.model_version = "1"
    request.outputs.add(name="y")
    data = request.SerializeToString()
    received = kserve.parse_infer_request(data)
    assert _whole(received) == request
    assert len(received.request.raw_input_contents) == 0 and len(received.raw) == 3
    for view, array in zip(received.raw, arrays.values()):
        assert view.obj is data and view.readonly and bytes(view) == array.tobytes()  # a view, not a copy
    decoded = kserve.decode_request(_topology(TensorSpec("x", "float32", (-1, 12)), TensorSpec("ids", "int64", (-1, 1)), TensorSpec("e", "float32", (-1, 0))), received.request, raw=received.raw)
    for name, array in arrays.items():
        np.testing.assert_array_equal(decoded.inputs[name], array)
    assert decoded.timing and decoded.requested_outputs == ("y",)
    # typed contents only: nothing to keep apart
    typed = kpb.ModelInferRequest(model_name="m")
    typed.inputs.add(name="x", datatype="FP32", shape=[1, 2]).contents.fp32_contents.extend([1.0, 2.0])
    assert kserve.parse_infer_request(typed.SerializeToString()) == kserve.ReceivedRequest(typed, ())


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200))
def test_parse_infer_request_accepts_and_refuses_what_protobuf_does(data: bytes) -> None:
    try:
        expected = kpb.ModelInferRequest.FromString(data)
    except protobuf_message.DecodeError:
        expected = None
    try:
        received = kserve.parse_infer_request(data)
    except (protobuf_message.DecodeError, ValueError):
        assert expected is None, f"protobuf parsed {data!r}"
        return
    assert expected is not None, f"parse_infer_request accepted {data!r}, which protobuf refuses"
    assert _whole(received) == expected
    assert len(received.request.raw_input_contents) == 0  # the tensors are only in received.raw


@settings(max_examples=200, deadline=None)
@given(st.lists(st.binary(max_size=40), max_size=4), st.integers(0, 400), st.binary(min_size=1, max_size=3))
def test_parse_infer_request_on_cut_and_spliced_requests(raws: list[bytes], cut: int, junk: bytes) -> None:
    request = kpb.ModelInferRequest(model_name="m", id="abc", raw_input_contents=raws)
    request.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    data = request.SerializeToString()
    group = bytes([15 << 3 | 3, 15 << 3 | 4])  # an empty group in unknown field 15: protobuf parses it itself
    for variant in (data, data[: cut % (len(data) + 1)], data + junk, junk + data, group + data):
        test_parse_infer_request_accepts_and_refuses_what_protobuf_does.hypothesis.inner_test(variant)  # type: ignore[attr-defined]
