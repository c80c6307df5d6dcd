"""The cost model: an estimated time per operation, from FLOPs and bytes.

Why an estimate and not a measurement: timing each operation alone measures
mostly the per-call overhead of eager execution (tens of microseconds), which
a compiled shard does not pay, and it would make partitioning slow and noisy
on a shared machine. FLOPs and bytes are exact for a given input shape, and
the three rates below turn them into time:

- ``flops / FLOP_RATE``: the arithmetic of convolutions, dense layers,
  recurrent cells, attention projections and matrix products;
- ``bytes / BYTE_RATE``: reading the inputs and writing the outputs, which
  dominates element-wise operations, normalisation and depthwise convolutions;
- ``OP_OVERHEAD_S``: a fixed cost per operation in a compiled function.

The three rates were fitted (least squares) to the measured compiled time of
the 12 shards of MobileNetV3Large on this project's reference machine (2
cores, TensorFlow 2.21 on CPU, batch 1, one thread); only the ratios between
operations matter for the balance of a plan. The bytes include the weights,
which are read on every call and dominate dense heads at small spatial sizes. FLOPs of an operation with weights are estimated
generically as ``2 × output elements × (weights of rank ≥ 2) / output
channels``, which is exact for Conv*, DepthwiseConv*, Dense/EinsumDense
projections and recurrent cells, so the model needs no table of layer types.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import PartitionError
from pipeline.partition.graph import Graph, Op

FLOP_RATE = 34e9  # FLOP/s
BYTE_RATE = 26e9  # B/s
OP_OVERHEAD_S = 6e-6


@dataclass(frozen=True)
class OpCost:
    flops: float
    bytes: float
    params: int

    @property
    def seconds(self) -> float:
        return self.flops / FLOP_RATE + self.bytes / BYTE_RATE + OP_OVERHEAD_S


def concrete_shapes(graph: Graph, input_shapes: dict[str, tuple[int, ...]] | None = None) -> dict[int, tuple[int, ...]]:
    """Shapes of every tensor at batch 1, by shape inference when the model leaves axes unknown."""
    shapes: dict[int, tuple[int, ...]] = {}
    unknown = False
    for t in graph.tensors:
        if t.producer is None and t.id not in graph.inputs:
            continue
        dims = t.shape[1:] if t.is_batched else t.shape
        if any(d is None for d in dims):
            unknown = True
        shapes[t.id] = ((1,) if t.is_batched else ()) + tuple(d if d is not None else 1 for d in dims)
    if not unknown and not input_shapes:
        return shapes
    given = dict(input_shapes or {})
    for tid, name in zip(graph.inputs, graph.input_names):
        t = graph.tensors[tid]
        if name in given:
            dims = tuple(given[name])
            expected = t.shape[1:] if t.is_batched else t.shape
            if len(dims) != len(expected) or any(e is not None and e != d for e, d in zip(expected, dims)):
                raise PartitionError(
                    f"--input-shape for {name!r} is {list(dims)}, but the model takes {['?' if e is None else e for e in expected]} (without the batch axis)"
                )
            shapes[tid] = (1, *dims) if t.is_batched else dims
        elif any(d is None for d in (t.shape[1:] if t.is_batched else t.shape)):
            raise PartitionError(
                f"model input {name!r} has shape {_fmt(t.shape)} with unknown axes, so the cost of each operation "
                f"cannot be estimated. Pass --input-shape with the sizes you will serve, e.g. --input-shape "
                f"{','.join('224' if d is None else str(d) for d in t.shape[1:])}"
            )
    _infer(graph, shapes)
    return shapes


def _infer(graph: Graph, shapes: dict[int, tuple[int, ...]]) -> None:
    import keras
    from keras.src import tree

    values: dict[int, Any] = {}
    for tid in graph.inputs:
        t = graph.tensors[tid]
        values[tid] = keras.KerasTensor(shapes[tid], dtype=t.dtype)
    for op in graph.ops:
        args, kwargs = op.node.arguments.fill_in(
            {id(kt): values[tid] for kt, tid in zip(op.node.input_tensors, op.inputs)}
        )
        try:
            out = tree.flatten(op.operation.compute_output_spec(*args, **kwargs))
        except Exception:  # shape inference is best effort; fall back to the declared shapes
            out = None
        for i, tid in enumerate(op.outputs):
            t = graph.tensors[tid]
            if out is not None and i < len(out) and hasattr(out[i], "shape"):
                shapes[tid] = tuple(1 if d is None else int(d) for d in out[i].shape)
            values[tid] = keras.KerasTensor(shapes[tid], dtype=t.dtype)


def op_costs(graph: Graph, shapes: dict[int, tuple[int, ...]]) -> list[OpCost]:
    return [_op_cost(op, graph, shapes) for op in graph.ops]


def _op_cost(op: Op, graph: Graph, shapes: dict[int, tuple[int, ...]]) -> OpCost:
    in_elems = sum(_numel(shapes[t]) for t in op.inputs)
    out_elems = sum(_numel(shapes[t]) for t in op.outputs)
    itemsize = max([_itemsize(graph.tensors[t].dtype) for t in op.inputs + op.outputs] or [4])
    weights = getattr(op.operation, "weights", None) or []
    matrix = sum(_numel(tuple(w.shape)) for w in weights if len(w.shape) >= 2)
    flops = float(in_elems + out_elems)
    if matrix and op.outputs:
        out_shape = shapes[op.outputs[0]]
        channels_first = getattr(op.operation, "data_format", "channels_last") == "channels_first"
        channels = out_shape[1] if channels_first and len(out_shape) > 2 else (out_shape[-1] if out_shape else 1)
        flops += 2.0 * out_elems * matrix / max(channels, 1)
    elif op.class_name.endswith(("Matmul", "Dot")) and len(op.inputs) == 2:
        a, b = (shapes[t] for t in op.inputs)
        if a and b:
            flops += 2.0 * _numel(a) * (b[-1] if len(b) > 1 else 1)
    # weights are read on every call too: this dominates dense heads at small spatial size
    weight_bytes = sum(_numel(tuple(w.shape)) * _itemsize(str(getattr(w, "dtype", "float32"))) for w in weights)
    return OpCost(flops=flops, bytes=float((in_elems + out_elems) * itemsize + weight_bytes), params=op.params)


def tensor_bytes(graph: Graph, shapes: dict[int, tuple[int, ...]], tid: int) -> int:
    """Bytes of one tensor for one sample (batch 1)."""
    return _numel(shapes[tid]) * _itemsize(graph.tensors[tid].dtype)


def _numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


def _itemsize(dtype: str) -> int:
    try:
        return np.dtype(dtype).itemsize
    except TypeError:
        return 2 if dtype == "bfloat16" else 4


def _fmt(shape: tuple[int | None, ...]) -> str:
    return "[" + ", ".join("None" if d is None else str(d) for d in shape) + "]"
