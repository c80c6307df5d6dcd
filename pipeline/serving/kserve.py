"""KServe v2 tensors: datatype names, request validation, contents to numpy and back.

Pure logic, no sockets: the ingress calls :func:`decode_request` on every
``ModelInferRequest`` before anything is queued, and :func:`encode_outputs`
on the joined results. Every error is an :class:`InvalidInput` (or
:class:`ModelNotFound`) whose message says what was expected, then what was
received, so the ingress answers with one lookup.

Zero copies where protobuf allows: a raw input becomes a read-only
``np.frombuffer`` view over the bytes protobuf hands us; typed ``contents``
are converted once (they are Python lists in protobuf, a copy cannot be
avoided). Outputs go back as the arrays' bytes in ``raw_output_contents``.

The ingress goes one step further with :func:`parse_infer_request`: protobuf
would copy each ``raw_input_contents`` entry twice (into its message, then
into a new ``bytes`` on access), so the ingress parses the request without
them and keeps them as views of the bytes gRPC received.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import InvalidInput, ModelNotFound
from pipeline.pb import grpc_service_pb2 as kpb
from pipeline.pb import model_config_pb2 as mcpb
from pipeline.topology import TensorSpec, Topology
from pipeline.wire.codec import NUMPY_DTYPES, dtype_name

#: KServe datatype name -> numpy dtype name (the topology's names).
KSERVE_TO_NUMPY: dict[str, str] = {
    "BOOL": "bool",
    "UINT8": "uint8",
    "UINT16": "uint16",
    "UINT32": "uint32",
    "UINT64": "uint64",
    "INT8": "int8",
    "INT16": "int16",
    "INT32": "int32",
    "INT64": "int64",
    "FP16": "float16",
    "FP32": "float32",
    "FP64": "float64",
    "BF16": "bfloat16",
}
NUMPY_TO_KSERVE: dict[str, str] = {v: k for k, v in KSERVE_TO_NUMPY.items()}

#: KServe datatype -> the typed ``InferTensorContents`` field that carries it (FP16 and BF16: raw only).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}
_ALL_CONTENTS_FIELDS = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
)

#: Triton's model-config data type enum, by numpy dtype name.
NUMPY_TO_TRITON_TYPE: dict[str, int] = {
    "bool": mcpb.TYPE_BOOL,
    "uint8": mcpb.TYPE_UINT8,
    "uint16": mcpb.TYPE_UINT16,
    "uint32": mcpb.TYPE_UINT32,
    "uint64": mcpb.TYPE_UINT64,
    "int8": mcpb.TYPE_INT8,
    "int16": mcpb.TYPE_INT16,
    "int32": mcpb.TYPE_INT32,
    "int64": mcpb.TYPE_INT64,
    "float16": mcpb.TYPE_FP16,
    "float32": mcpb.TYPE_FP32,
    "float64": mcpb.TYPE_FP64,
    "bfloat16": mcpb.TYPE_BF16,
}

#: the only model version the ingress serves; an empty version means "the latest", i.e. this one.
MODEL_VERSION = "1"


def kserve_datatype(dtype_name: str) -> str:
    """The KServe datatype of a numpy dtype name (``float32`` -> ``FP32``)."""
    return NUMPY_TO_KSERVE[dtype_name]


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    """The numpy dtype of a KServe datatype; :class:`InvalidInput` for one the pipeline does not carry."""
    name = KSERVE_TO_NUMPY.get(datatype)
    if name is None:
        raise InvalidInput(f"datatype {datatype!r} is not supported; expected one of {sorted(KSERVE_TO_NUMPY)}")
    return NUMPY_DTYPES[name]


def infer_request(
    model: str,
    arrays: Mapping[str, np.ndarray],
    *,
    datatypes: Mapping[str, str] | None = None,
    timing: bool = False,
) -> kpb.ModelInferRequest:
    """A ``ModelInferRequest`` carrying ``arrays`` in ``raw_input_contents`` (the client side of decode_request).

    ``datatypes`` overrides the KServe datatype per input (default: from each array's dtype);
    ``timing`` asks the ingress for the per-shard and per-hop spans.
    """
    request = kpb.ModelInferRequest(model_name=model)
    for name, value in arrays.items():
        array = np.ascontiguousarray(value)
        datatype = (datatypes or {}).get(name) or kserve_datatype(dtype_name(array.dtype))
        request.inputs.add(name=name, datatype=datatype, shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    if timing:
        request.parameters["timing"].bool_param = True
    return request


def check_model(topology: Topology, name: str, version: str = "") -> None:
    """:class:`ModelNotFound` unless ``name``/``version`` is the served model."""
    if name != topology.name:
        raise ModelNotFound(f"model {name!r} is not served here; expected {topology.name!r}")
    if version not in ("", MODEL_VERSION):
        raise ModelNotFound(
            f"model {name!r} has no version {version!r}; expected {MODEL_VERSION!r} or an empty version"
        )


@dataclass(frozen=True)
class DecodedRequest:
    """A validated request: its inputs as arrays (model input order), batch size and options."""

    inputs: dict[str, np.ndarray]
    batch_size: int
    requested_outputs: tuple[str, ...]
    timing: bool


#: the field number of ``ModelInferRequest.raw_input_contents`` (repeated bytes).
RAW_INPUT_CONTENTS = kpb.ModelInferRequest.DESCRIPTOR.fields_by_name["raw_input_contents"].number


@dataclass(frozen=True)
class ReceivedRequest:
    """A ``ModelInferRequest`` as the ingress receives it: the message without its ``raw_input_contents``,
    and those entries, in order, as read-only views of the received bytes."""

    request: kpb.ModelInferRequest
    raw: tuple[memoryview, ...]


def parse_infer_request(data: bytes) -> ReceivedRequest:
    """Parse a serialized ``ModelInferRequest`` without copying its ``raw_input_contents``.

    The top-level fields are walked once (protobuf's wire format: a varint key, then the value); each
    ``raw_input_contents`` entry becomes a view of ``data``, and the rest, a few hundred bytes, is parsed
    by protobuf as usual. Bytes that are not a well-formed message raise like protobuf's own parser.
    """
    view = memoryview(data).toreadonly()
    n = len(view)
    kept: list[memoryview] = []
    raw: list[memoryview] = []
    pos = start = 0
    while pos < n:
        field_start = pos
        key, pos = _varint(view, pos)
        wire = key & 7
        if wire == 0:
            _, pos = _varint(view, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        elif wire == 2:
            size, pos = _varint(view, pos)
            if key >> 3 == RAW_INPUT_CONTENTS and pos + size <= n:
                kept.append(view[start:field_start])
                raw.append(view[pos : pos + size])
                start = pos + size
            pos += size
        else:  # groups, or no wire type at all: protobuf decides (and names the problem)
            return _parsed_whole(data)
        if pos > n:
            raise ValueError(f"truncated message: a field ends at byte {pos} of {n}")
    kept.append(view[start:n])
    return ReceivedRequest(kpb.ModelInferRequest.FromString(b"".join(kept)), tuple(raw))


def _parsed_whole(data: bytes) -> ReceivedRequest:
    """protobuf's own parse of the whole request, its ``raw_input_contents`` then moved apart (copied once)."""
    request = kpb.ModelInferRequest.FromString(data)
    raw = tuple(memoryview(b) for b in request.raw_input_contents)
    request.ClearField("raw_input_contents")
    return ReceivedRequest(request, raw)


def _varint(view: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(view):
            raise ValueError(f"truncated message: a varint runs past byte {len(view)}")
        byte = view[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift >= 64:
            raise ValueError(f"a varint longer than 10 bytes ends at byte {pos}")


def decode_request(
    topology: Topology, request: kpb.ModelInferRequest, max_batch_size: int = 0, raw: Sequence[Any] | None = None
) -> DecodedRequest:
    """Validate ``request`` against the topology and convert its inputs; raise on the first problem.

    ``max_batch_size`` (0: no bound) bounds the first axis when every input is batched. ``raw``: the
    request's ``raw_input_contents`` when they were kept apart from it (:func:`parse_infer_request`).
    """
    check_model(topology, request.model_name, request.model_version)
    specs = {s.name: s for s in topology.inputs}
    received = [t.name for t in request.inputs]
    duplicates = sorted({n for n in received if received.count(n) > 1})
    if duplicates:
        raise InvalidInput(f"each input may appear once; received {duplicates} more than once")
    missing = [n for n in topology.input_names if n not in received]
    extra = [n for n in received if n not in specs]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {missing}")
        if extra:
            parts.append(f"unexpected {extra}")
        raise InvalidInput(f"expected inputs {list(topology.input_names)}, received {received} ({'; '.join(parts)})")

    if raw is None:
        raw = request.raw_input_contents
    typed = [t.name for t in request.inputs if t.HasField("contents")]
    if len(raw) and typed:
        raise InvalidInput(
            f"tensor data must be in raw_input_contents or in typed contents, not both; received "
            f"{len(raw)} raw_input_contents and typed contents for {typed}"
        )
    if len(raw) and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"expected one raw_input_contents entry per input ({len(request.inputs)}), received {len(raw)}"
        )
    if not len(raw):
        without = [t.name for t in request.inputs if not t.HasField("contents")]
        if without:
            raise InvalidInput(
                f"expected tensor data in raw_input_contents or in each input's typed contents; "
                f"received neither for {without}"
            )

    arrays: dict[str, np.ndarray] = {}
    for i, tensor in enumerate(request.inputs):
        spec = specs[tensor.name]
        shape = check_tensor_header(spec, tensor.datatype, tensor.shape)
        if len(raw):
            arrays[tensor.name] = raw_to_array(spec, raw[i], shape)
        else:
            arrays[tensor.name] = contents_to_array(tensor.name, tensor.datatype, tensor.contents, shape)
    batch_size = _batch_size(topology, arrays, max_batch_size)

    requested = tuple(o.name for o in request.outputs)
    unknown = [n for n in requested if n not in topology.output_names]
    if unknown:
        raise InvalidInput(f"requested outputs {unknown} do not exist; expected some of {list(topology.output_names)}")
    timing = request.parameters["timing"].bool_param if "timing" in request.parameters else False
    return DecodedRequest(
        inputs={n: arrays[n] for n in topology.input_names},
        batch_size=batch_size,
        requested_outputs=requested or topology.output_names,
        timing=timing,
    )


def check_tensor_header(spec: TensorSpec, datatype: str, shape: Sequence[int]) -> tuple[int, ...]:
    """Check an input's datatype and shape against its spec; return the shape as a tuple."""
    expected_type = kserve_datatype(spec.dtype)
    if datatype != expected_type:
        raise InvalidInput(f"input {spec.name!r}: expected datatype {expected_type}, received {datatype or '(none)'}")
    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {spec.name!r}: expected a concrete shape of sizes >= 0, received {list(shape)}")
    if len(shape) != len(spec.shape):
        raise InvalidInput(
            f"input {spec.name!r}: expected rank {len(spec.shape)} (shape {list(spec.shape)}), "
            f"received rank {len(shape)} (shape {list(shape)})"
        )
    if not spec.accepts(shape):
        raise InvalidInput(
            f"input {spec.name!r}: expected shape {list(spec.shape)} (-1: any size), received {list(shape)}"
        )
    return shape


def raw_to_array(spec: TensorSpec, data: bytes | memoryview, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only view over raw bytes; :class:`InvalidInput` when the byte count does not match."""
    dtype = NUMPY_DTYPES[spec.dtype]
    count = _count(shape)
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidInput(
            f"input {spec.name!r}: {kserve_datatype(spec.dtype)}{list(shape)} needs {expected} bytes "
            f"({count} x {dtype.itemsize}), received {len(data)} bytes in raw_input_contents"
        )
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape)


def contents_to_array(name: str, datatype: str, contents: kpb.InferTensorContents, shape: tuple[int, ...]) -> np.ndarray:
    """Convert typed ``contents`` to an array of ``datatype``; check the field, the count and the range."""
    dtype = numpy_dtype(datatype)
    field = CONTENTS_FIELD.get(datatype)
    used = [f for f in _ALL_CONTENTS_FIELDS if len(getattr(contents, f))]
    if field is None:
        raise InvalidInput(
            f"input {name!r}: datatype {datatype} has no typed contents field; expected its data in raw_input_contents, "
            f"received {used or 'empty contents'}"
        )
    wrong = [f for f in used if f != field]
    if wrong:
        raise InvalidInput(f"input {name!r}: datatype {datatype} expects contents.{field}, received {wrong}")
    values = getattr(contents, field)
    count = _count(shape)
    if len(values) != count:
        raise InvalidInput(
            f"input {name!r}: shape {list(shape)} needs {count} values in contents.{field}, received {len(values)}"
        )
    wide = np.asarray(values, dtype=_WIDE[field])
    if dtype.kind in "iu" and wide.size:
        info = np.iinfo(dtype)
        lo, hi = wide.min(), wide.max()
        if lo < info.min or hi > info.max:
            raise InvalidInput(
                f"input {name!r}: {datatype} values must lie in [{info.min}, {info.max}], "
                f"received values in [{lo}, {hi}]"
            )
    return wide.astype(dtype, copy=False).reshape(shape)


_WIDE: dict[str, Any] = {
    "bool_contents": np.bool_,
    "int_contents": np.int32,
    "int64_contents": np.int64,
    "uint_contents": np.uint32,
    "uint64_contents": np.uint64,
    "fp32_contents": np.float32,
    "fp64_contents": np.float64,
}


def array_to_contents(array: np.ndarray) -> kpb.InferTensorContents:
    """Typed contents for an array (the inverse of :func:`contents_to_array`; used by clients and tests)."""
    datatype = kserve_datatype(dtype_name(array.dtype))
    field = CONTENTS_FIELD.get(datatype)
    if field is None:
        raise InvalidInput(f"datatype {datatype} has no typed contents field; expected raw bytes")
    contents = kpb.InferTensorContents()
    getattr(contents, field).extend(np.asarray(array, dtype=_WIDE[field]).reshape(-1).tolist())
    return contents


def encode_outputs(
    topology: Topology, outputs: Mapping[str, np.ndarray], names: Sequence[str], response: kpb.ModelInferResponse
) -> None:
    """Append ``names`` (in that order) to ``response`` as raw outputs with datatype and shape."""
    for name in names:
        array = np.ascontiguousarray(outputs[name])
        tensor = response.outputs.add()
        tensor.name = name
        tensor.datatype = kserve_datatype(dtype_name(array.dtype))
        tensor.shape.extend(array.shape)
        response.raw_output_contents.append(array.tobytes())


def output_array(response: kpb.ModelInferResponse, index: int) -> np.ndarray:
    """The ``index``-th output of a response as an array (raw or typed contents)."""
    tensor = response.outputs[index]
    shape = tuple(tensor.shape)
    if len(response.raw_output_contents):
        dtype = numpy_dtype(tensor.datatype)
        return np.frombuffer(response.raw_output_contents[index], dtype=dtype).reshape(shape)
    return contents_to_array(tensor.name, tensor.datatype, tensor.contents, shape)


def check_output(spec: TensorSpec, array: np.ndarray, batch_size: int, origin: str) -> str | None:
    """A description of how a shard's output does not fit its spec and the batch, or ``None`` when it fits."""
    if dtype_name(array.dtype) != spec.dtype:
        return f"{origin} sent output {spec.name!r} as {array.dtype}, expected {spec.dtype}"
    if not spec.accepts(array.shape) or (array.ndim and spec.shape[0] == -1 and array.shape[0] != batch_size):
        return (
            f"{origin} sent output {spec.name!r} with shape {list(array.shape)}, expected {list(spec.shape)} "
            f"with batch size {batch_size}"
        )
    return None


# --------------------------------------------------------------- metadata
def model_metadata(topology: Topology, platform: str) -> kpb.ModelMetadataResponse:
    response = kpb.ModelMetadataResponse(name=topology.name, versions=[MODEL_VERSION], platform=platform)
    for group, specs in ((response.inputs, topology.inputs), (response.outputs, topology.outputs)):
        for spec in specs:
            group.add(name=spec.name, datatype=kserve_datatype(spec.dtype), shape=list(spec.shape))
    return response


def is_batched(topology: Topology) -> bool:
    """True when every model input and output has a variable first (batch) axis."""
    return all(len(s.shape) >= 1 and s.shape[0] == -1 for s in topology.inputs + topology.outputs)


def model_config(topology: Topology, platform: str, max_batch_size: int) -> mcpb.ModelConfig:
    """Triton's model configuration of the served model (dims without the batch axis when batched)."""
    batched = is_batched(topology)
    config = mcpb.ModelConfig(
        name=topology.name, platform=platform, backend=platform, max_batch_size=max_batch_size if batched else 0
    )
    for spec in topology.inputs:
        config.input.add(
            name=spec.name, data_type=NUMPY_TO_TRITON_TYPE[spec.dtype], dims=list(spec.shape[1:] if batched else spec.shape)
        )
    for spec in topology.outputs:
        config.output.add(
            name=spec.name, data_type=NUMPY_TO_TRITON_TYPE[spec.dtype], dims=list(spec.shape[1:] if batched else spec.shape)
        )
    batch_sizes = sorted({s.batching.max_batch for s in topology.shards if s.batching.max_batch > 1})
    if batched and batch_sizes:
        config.dynamic_batching.preferred_batch_size.extend(batch_sizes)
        config.dynamic_batching.max_queue_delay_microseconds = int(
            max(s.batching.max_delay_ms for s in topology.shards) * 1000
        )
    config.model_transaction_policy.decoupled = False
    return config


# ---------------------------------------------------------------- helpers
def _count(shape: Sequence[int]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def _batch_size(topology: Topology, arrays: Mapping[str, np.ndarray], max_batch_size: int) -> int:
    batched = [s.name for s in topology.inputs if s.shape and s.shape[0] == -1]
    if not batched:
        return 1
    sizes = {n: int(arrays[n].shape[0]) for n in batched}
    if len(set(sizes.values())) > 1:
        raise InvalidInput(f"expected every input to have the same batch size (first axis), received {sizes}")
    batch = next(iter(sizes.values()))
    if max_batch_size and batch > max_batch_size and is_batched(topology):
        raise InvalidInput(f"expected a batch size of at most {max_batch_size}, received {batch} (limit max_batch_size)")
    return batch

