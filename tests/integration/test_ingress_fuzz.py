"""Malformed ``ModelInferRequest``s against the real ingress: each one answered with a status, the server fine after.

A list of hand-written bad requests (each with the status it must get), then
requests drawn by hypothesis with any names, datatypes, shapes, contents and
parameters, then bytes that are not a protobuf at all. After each group the
ingress must answer a good request correctly, hold no pending request, and
the shard must have seen valid requests only.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers_ingress import (  # noqa: E402
    FakeWorker,
    IngressThread,
    fake_workers,
    outputs_of,
    raw_request,
    single_topology,
    sock_dir,
    toy_compute,
    toy_inputs,
    typed_request,
    wait_ready,
    wait_until,
)

from pipeline.pb import grpc_service_pb2 as kpb  # noqa: E402
from pipeline.serving import kserve  # noqa: E402
from pipeline.topology import Topology  # noqa: E402

pytestmark = pytest.mark.timeout(240)
MAX_BATCH = 64
MAX_BYTES = 4 << 20
INV, NF, RE = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.RESOURCE_EXHAUSTED
#: the statuses a request the client got wrong may get; INTERNAL or UNKNOWN would mean the ingress failed.
CLIENT_FAULTS = {INV, NF, RE}


def _req(**fields: Any) -> kpb.ModelInferRequest:
    return kpb.ModelInferRequest(model_name=fields.pop("model_name", "toy"), **fields)


def _tensor(name: str, datatype: str, shape: list[int], **kw: Any) -> kpb.ModelInferRequest.InferInputTensor:
    return kpb.ModelInferRequest.InferInputTensor(name=name, datatype=datatype, shape=shape, **kw)


def _good_raw(batch: int = 2) -> tuple[list[Any], list[bytes]]:
    x, ids = toy_inputs(batch).values()
    return [_tensor("x", "FP32", list(x.shape)), _tensor("ids", "INT64", list(ids.shape))], [x.tobytes(), ids.tobytes()]


def _bad(case: str) -> kpb.ModelInferRequest:
    inputs, raw = _good_raw()
    x_bytes, ids_bytes = raw
    ids = _tensor("ids", "INT64", [2, 2])
    build: dict[str, Callable[[], kpb.ModelInferRequest]] = {
        "raw bytes one short": lambda: _req(inputs=inputs, raw_input_contents=[x_bytes[:-1], ids_bytes]),
        "raw bytes one too many": lambda: _req(inputs=inputs, raw_input_contents=[x_bytes + b"\0", ids_bytes]),
        "huge shape [2**40, 4]": lambda: _req(inputs=[_tensor("x", "FP32", [2**40, 4]), ids], raw_input_contents=raw),
        "int64-max shape": lambda: _req(inputs=[_tensor("x", "FP32", [2**63 - 1, 4]), ids], raw_input_contents=raw),
        "shape whose product overflows int64": lambda: _req(
            inputs=[_tensor("x", "FP32", [2**62, 2**62]), ids], raw_input_contents=raw
        ),
        "negative batch dimension": lambda: _req(inputs=[_tensor("x", "FP32", [-1, 4]), ids], raw_input_contents=raw),
        "all dimensions negative": lambda: _req(inputs=[_tensor("x", "FP32", [-5, -5]), ids], raw_input_contents=raw),
        "wrong inner dimension": lambda: _req(inputs=[_tensor("x", "FP32", [4, 2]), ids], raw_input_contents=raw),
        "rank 1": lambda: _req(inputs=[_tensor("x", "FP32", [8]), ids], raw_input_contents=raw),
        "rank 0": lambda: _req(inputs=[_tensor("x", "FP32", []), ids], raw_input_contents=raw),
        "rank 9": lambda: _req(inputs=[_tensor("x", "FP32", [1] * 9), ids], raw_input_contents=raw),
        "one raw entry for two inputs": lambda: _req(inputs=inputs, raw_input_contents=[x_bytes]),
        "three raw entries for two inputs": lambda: _req(inputs=inputs, raw_input_contents=[x_bytes, ids_bytes, b""]),
        "raw and typed contents together": lambda: _req(
            inputs=[_tensor("x", "FP32", [2, 4], contents=kpb.InferTensorContents(fp32_contents=[0.0] * 8)), ids],
            raw_input_contents=raw,
        ),
        "typed contents in the wrong field": lambda: _req(
            inputs=[
                _tensor("x", "FP32", [2, 4], contents=kpb.InferTensorContents(int64_contents=[0] * 8)),
                _tensor("ids", "INT64", [2, 2], contents=kpb.InferTensorContents(int64_contents=[0] * 4)),
            ]
        ),
        "typed contents with too few values": lambda: _req(
            inputs=[
                _tensor("x", "FP32", [2, 4], contents=kpb.InferTensorContents(fp32_contents=[0.0] * 7)),
                _tensor("ids", "INT64", [2, 2], contents=kpb.InferTensorContents(int64_contents=[0] * 4)),
            ]
        ),
        "typed contents for a huge shape": lambda: _req(
            inputs=[
                _tensor("x", "FP32", [2**31, 4], contents=kpb.InferTensorContents(fp32_contents=[0.0] * 8)),
                _tensor("ids", "INT64", [2, 2], contents=kpb.InferTensorContents(int64_contents=[0] * 4)),
            ]
        ),
        "no contents at all": lambda: _req(inputs=inputs),
        "wrong datatype (FP64 for FP32)": lambda: _req(inputs=[_tensor("x", "FP64", [2, 4]), ids], raw_input_contents=raw),
        "unknown datatype FP8": lambda: _req(inputs=[_tensor("x", "FP8", [2, 4]), ids], raw_input_contents=raw),
        "BYTES datatype": lambda: _req(inputs=[_tensor("x", "BYTES", [2, 4]), ids], raw_input_contents=raw),
        "empty datatype": lambda: _req(inputs=[_tensor("x", "", [2, 4]), ids], raw_input_contents=raw),
        "input given twice": lambda: _req(inputs=[inputs[0], inputs[0]], raw_input_contents=[x_bytes, x_bytes]),
        "input missing": lambda: _req(inputs=[inputs[0]], raw_input_contents=[x_bytes]),
        "extra input": lambda: _req(inputs=[*inputs, _tensor("z", "FP32", [2, 4])], raw_input_contents=[*raw, x_bytes]),
        "input with an empty name": lambda: _req(inputs=[_tensor("", "FP32", [2, 4]), ids], raw_input_contents=raw),
        "no inputs": lambda: _req(),
        "batch sizes that differ between inputs": lambda: _req(
            inputs=[_tensor("x", "FP32", [2, 4]), _tensor("ids", "INT64", [1, 2])], raw_input_contents=[x_bytes, ids_bytes[:16]]
        ),
        "batch over max_batch_size": lambda: raw_request("toy", toy_inputs(MAX_BATCH + 1)),
        "request over max_message_bytes": lambda: raw_request(
            "toy", {"x": np.zeros((MAX_BATCH, 4), np.float32), "ids": np.zeros((MAX_BATCH, 2), np.int64)}, pad="p" * MAX_BYTES
        ),
        "unknown model": lambda: _req(model_name="other", inputs=inputs, raw_input_contents=raw),
        "empty model name": lambda: _req(model_name="", inputs=inputs, raw_input_contents=raw),
        "unknown model version": lambda: _req(model_version="7", inputs=inputs, raw_input_contents=raw),
        "unknown requested output": lambda: _req(
            inputs=inputs, raw_input_contents=raw, outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name="nope")]
        ),
    }
    return build[case]()


BAD_CASES: dict[str, grpc.StatusCode] = {
    "raw bytes one short": INV,
    "raw bytes one too many": INV,
    "huge shape [2**40, 4]": INV,
    "int64-max shape": INV,
    "shape whose product overflows int64": INV,
    "negative batch dimension": INV,
    "all dimensions negative": INV,
    "wrong inner dimension": INV,
    "rank 1": INV,
    "rank 0": INV,
    "rank 9": INV,
    "one raw entry for two inputs": INV,
    "three raw entries for two inputs": INV,
    "raw and typed contents together": INV,
    "typed contents in the wrong field": INV,
    "typed contents with too few values": INV,
    "typed contents for a huge shape": INV,
    "no contents at all": INV,
    "wrong datatype (FP64 for FP32)": INV,
    "unknown datatype FP8": INV,
    "BYTES datatype": INV,
    "empty datatype": INV,
    "input given twice": INV,
    "input missing": INV,
    "extra input": INV,
    "input with an empty name": INV,
    "no inputs": INV,
    "batch sizes that differ between inputs": INV,
    "batch over max_batch_size": INV,
    "request over max_message_bytes": RE,
    "unknown model": NF,
    "empty model name": NF,
    "unknown model version": NF,
    "unknown requested output": INV,
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[IngressThread, FakeWorker, Any]]:
    with sock_dir() as sockets:
        t: Topology = single_topology(tmp_path_factory.mktemp("fuzz") / "toy", sockets)
        worker = FakeWorker(t, "s0", toy_compute)
        with IngressThread(t, max_batch_size=MAX_BATCH, max_message_bytes=MAX_BYTES) as ing, fake_workers(worker), ing.stub() as stub:
            wait_ready(stub)
            yield ing, worker, stub


def _still_right(served: tuple[IngressThread, FakeWorker, Any], seed: int) -> None:
    ing, worker, stub = served
    inputs = toy_inputs(3, seed=seed)
    for request in (raw_request("toy", inputs), typed_request("toy", inputs)):
        out = outputs_of(stub.ModelInfer(request, timeout=10))
        np.testing.assert_array_equal(out["y"], toy_compute(inputs)["y"])
    assert wait_until(lambda: ing.pending() == 0, 5)
    assert worker.is_alive()


def _status(stub: Any, request: kpb.ModelInferRequest) -> tuple[grpc.StatusCode, str, Any]:
    try:
        return grpc.StatusCode.OK, "", stub.ModelInfer(request, timeout=10)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None


def test_each_malformed_request_gets_its_status_and_nothing_reaches_the_shard(served: Any) -> None:
    ing, worker, stub = served
    before = worker.requests
    answers = {}
    for case, expected in BAD_CASES.items():
        code, details, _ = _status(stub, _bad(case))
        answers[case] = (code.name, details)
        assert code == expected, (case, code, details)
        assert details, f"{case}: a status without a message"
    assert worker.requests == before, "a malformed request reached the shard"
    _still_right(served, 1)


def test_valid_edge_cases_are_answered_correctly(served: Any) -> None:
    _, _, stub = served
    weird = {"x": np.array([[np.nan, np.inf, -np.inf, -0.0]], np.float32), "ids": np.array([[2**62, -(2**62)]], np.int64)}
    code, details, response = _status(stub, raw_request("toy", weird, timing="yes"))  # timing of the wrong type
    assert code == grpc.StatusCode.OK, details
    np.testing.assert_array_equal(outputs_of(response)["y"], toy_compute(weird)["y"])
    empty = {"x": np.zeros((0, 4), np.float32), "ids": np.zeros((0, 2), np.int64)}
    code, details, response = _status(stub, raw_request("toy", empty))
    assert code == grpc.StatusCode.OK, details
    assert outputs_of(response)["y"].shape == (0, 3)


# ------------------------------------------------------------ drawn requests
DATATYPES = sorted(kserve.KSERVE_TO_NUMPY) + ["BYTES", "FP8", "", "fp32"]
dims = st.one_of(st.integers(-3, 9), st.integers(-(2**63), 2**63 - 1))
contents = st.builds(
    kpb.InferTensorContents,
    fp32_contents=st.lists(st.floats(width=32, allow_nan=True), max_size=12),
    int64_contents=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=12),
    int_contents=st.lists(st.integers(-(2**31), 2**31 - 1), max_size=4),
    bytes_contents=st.lists(st.binary(max_size=8), max_size=2),
)
tensors = st.builds(
    lambda name, datatype, shape, typed: _tensor(name, datatype, shape, **({"contents": typed} if typed is not None else {})),
    st.sampled_from(["x", "ids", "x", "ids", "z", ""]),
    st.sampled_from(DATATYPES),
    st.lists(dims, max_size=4),
    st.none() | contents,
)


@st.composite
def requests(draw: st.DrawFn) -> kpb.ModelInferRequest:
    if draw(st.booleans()):  # start from a good request and break one thing, so the checks deep inside are reached
        inputs, raw = _good_raw(draw(st.integers(0, 4)))
        request = _req(inputs=inputs, raw_input_contents=raw)
        what = draw(st.sampled_from(["shape", "datatype", "raw", "name"]))
        i = draw(st.integers(0, 1))
        if what == "shape":
            del request.inputs[i].shape[:]
            request.inputs[i].shape.extend(draw(st.lists(dims, max_size=4)))
        elif what == "datatype":
            request.inputs[i].datatype = draw(st.sampled_from(DATATYPES))
        elif what == "raw":
            request.raw_input_contents[i] = draw(st.binary(max_size=80))
        else:
            request.inputs[i].name = draw(st.sampled_from(["x", "ids", "z", ""]))
        return request
    request = _req(
        model_name=draw(st.sampled_from(["toy", "toy", "toy", "toy", "", "other"])),
        model_version=draw(st.sampled_from(["", "", "1", "2"])),
        inputs=draw(st.lists(tensors, max_size=3)),
        raw_input_contents=draw(st.lists(st.binary(max_size=80), max_size=3)),
        outputs=[kpb.ModelInferRequest.InferRequestedOutputTensor(name=n) for n in draw(st.lists(st.sampled_from(["y", "q"]), max_size=2))],
    )
    if draw(st.booleans()):
        request.parameters["timing"].string_param = draw(st.text(max_size=4))
    return request


def test_any_drawn_request_is_answered_with_a_status(served: Any) -> None:
    ing, _, stub = served
    seen: dict[str, int] = {}

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(requests())
    def one(request: kpb.ModelInferRequest) -> None:
        code, details, response = _status(stub, request)
        seen[code.name] = seen.get(code.name, 0) + 1
        if code == grpc.StatusCode.OK:  # valid by chance: then the numbers must be right
            arrays = kserve.decode_request(ing.topology, request).inputs
            np.testing.assert_array_equal(outputs_of(response)["y"], toy_compute(arrays)["y"])
        else:
            assert code in CLIENT_FAULTS, (code, details, request)
            assert details

    one()
    print(f"statuses of the drawn requests: {seen}")
    assert seen.get(INV.name, 0) > 0
    _still_right(served, 2)


def test_bytes_that_are_not_a_request_get_a_status_and_harm_nothing(served: Any) -> None:
    ing, _, stub = served
    channel = grpc.insecure_channel(ing.target)
    call = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    codes = set()
    details = []
    try:
        rng = np.random.default_rng(3)
        payloads = [b"\xff" * 64, b"\x0a\xff\xff\xff\xff\x0f", b"\x12\x05toy", bytes(rng.integers(0, 256, 4096, dtype=np.uint8))]
        payloads += [bytes(rng.integers(0, 256, int(n), dtype=np.uint8)) for n in rng.integers(1, 512, 40)]
        for payload in payloads:
            try:
                call(payload, timeout=5)
                codes.add("OK")
            except grpc.RpcError as exc:
                codes.add(exc.code().name)
                details.append(exc.details())
    finally:
        channel.close()
    # bytes that do not parse as a ModelInferRequest get INVALID_ARGUMENT saying so (parse_guard); bytes
    # that happen to parse are checked like any request (INVALID_ARGUMENT or NOT_FOUND)
    assert "OK" not in codes and codes <= {"INVALID_ARGUMENT", "NOT_FOUND"}, codes
    unparsable = [d for d in details if "do not parse" in d]
    assert unparsable and all("expected a serialized inference.ModelInferRequest" in d for d in unparsable)
    _still_right(served, 3)
