"""The cost model: an estimated time per operation, from FLOPs and bytes.

Why an estimate and not a measurement: timing each operation alone measures
mostly the per-call overhead of eager execution (tens of microseconds), which
a compiled shard does not pay, and it would make partitioning slow and noisy
on a shared machine. (``pipeline partition --measure`` times compiled segments
of a dozen operations instead, and corrects this estimate with them:
:mod:`pipeline.partition.measure`.) FLOPs and bytes are exact for a given input shape, and
four rates turn them into time:

- ``flops / flop``: the arithmetic of convolutions, dense layers, recurrent
  cells, attention projections and matrix products;
- ``activation bytes / activation_byte``: reading the inputs and writing the
  outputs, which dominates element-wise operations, normalisation and
  depthwise convolutions; it grows with the batch;
- ``weight bytes / weight_byte``: the weights, read (and laid out for the
  kernels) once per call whatever the batch; they dominate dense heads and
  late, narrow layers at batch 1;
- ``op_overhead_s``: a fixed cost per operation and call.

The batch changes which parts of a model are expensive: the early layers, on
large activations, cost as much per sample at batch 8 as at batch 1, while the
late layers, dominated by their weights, get 2× cheaper per sample. So a plan
balanced for batch 1 is unbalanced under load, when the workers batch. The
rates were fitted (least squares) twice, at batch 1 and at batch 8, to the
measured compiled times of the 15 shards of MobileNetV3Large split into 2, 3,
4 and 6 (the project's reference machine: 2 cores, TensorFlow 2.21 on CPU,
one thread; within ±10 % for most shards); between the two the estimate is
interpolated on log2 of the batch. Only the ratios between operations matter
for the balance of a plan. FLOPs of an operation with weights are estimated
generically as ``2 × output elements × (weights of rank ≥ 2) / output
channels``, which is exact for Conv*, DepthwiseConv*, Dense/EinsumDense
projections and recurrent cells, so the model needs no table of layer types.

A layer that is not Keras's own (a user's registered layer) may do anything
with its weights, so it is estimated from what is known from outside: its
output size and its parameters, as if every parameter were used once per
output position (``2 × parameters × output elements / output channels``) on
top of reading its inputs and writing its outputs. The same estimate stands in
for any operation the rules above cannot read (odd weights, shapes that do not
infer). Such operations are marked ``estimated`` and ``pipeline show`` lists
them, so a user knows which parts of the plan rest on a guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import PartitionError
from pipeline.partition.graph import Graph, Op


@dataclass(frozen=True)
class Rates:
    flop: float  # FLOP/s
    activation_byte: float  # B/s
    weight_byte: float  # B/s, once per call
    op_overhead_s: float  # per operation and call


#: fitted at batch 1 and at batch 8 (see above).
RATES_BATCH_1 = Rates(flop=75e9, activation_byte=26.8e9, weight_byte=9.0e9, op_overhead_s=5.5e-6)
RATES_BATCH_8 = Rates(flop=170e9, activation_byte=18.2e9, weight_byte=2.76e9, op_overhead_s=5.5e-6)


@dataclass(frozen=True)
class OpCost:
    flops: float  # per sample
    activation_bytes: float  # per sample: inputs and outputs
    weight_bytes: float  # per call
    params: int
    estimated: bool = False  # from output size and parameters only (a layer type the rules do not know)

    def call_seconds(self, batch: int, rates: Rates) -> float:
        """Estimated time of one call on ``batch`` rows with ``rates``."""
        return (
            batch * (self.flops / rates.flop + self.activation_bytes / rates.activation_byte)
            + self.weight_bytes / rates.weight_byte
            + rates.op_overhead_s
        )

    def seconds(self, batch: int = 1) -> float:
        """Estimated time per sample when the shard runs batches of ``batch`` rows."""
        one = self.call_seconds(1, RATES_BATCH_1)
        eight = self.call_seconds(8, RATES_BATCH_8) / 8
        w = min(max(np.log2(max(batch, 1)) / 3.0, 0.0), 1.0)
        return float(one + (eight - one) * w)


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
    _mask_shapes(graph, shapes)
    return shapes


def _mask_shapes(graph: Graph, shapes: dict[int, tuple[int, ...]]) -> None:
    """A Keras mask record is shaped like its tensor's leading axes (as inferred)."""
    for t in graph.tensors:
        if t.mask_of is not None and t.mask_of in shapes:
            shapes[t.id] = shapes[t.mask_of][: len(t.shape)]


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
    """The estimated cost of every operation, in the graph's order (never raises for an unknown layer)."""
    out = []
    for op in graph.ops:
        if is_known(op):
            try:
                out.append(_op_cost(op, graph, shapes))
                continue
            except Exception:  # a layer the rules cannot read: fall back to what is known from outside
                pass
        out.append(_estimate(op, graph, shapes))
    return out


def seconds_per_sample(graph: Graph, batch: int, input_shapes: dict[str, tuple[int, ...]] | None = None) -> float:
    """The estimate for a whole graph: seconds per sample when it runs batches of ``batch`` rows on a speed-1.0 host."""
    return float(sum(c.seconds(batch) for c in op_costs(graph, concrete_shapes(graph, input_shapes))))


def is_known(op: Op) -> bool:
    """Keras's own layers and operations follow the rules above; anything else is estimated."""
    return op.class_name.startswith(("keras.", "keras_hub.", "keras_nlp.", "keras_cv."))


def _estimate(op: Op, graph: Graph, shapes: dict[int, tuple[int, ...]]) -> OpCost:
    """From the output size and the parameters only: each parameter used once per output position."""
    in_elems = sum(_numel(shapes.get(t, ())) for t in op.inputs)
    out_elems = sum(_numel(shapes.get(t, ())) for t in op.outputs)
    itemsize = max([_itemsize(graph.tensors[t].dtype) for t in op.inputs + op.outputs] or [4])
    try:
        weights = list(getattr(op.operation, "weights", None) or [])
        params = int(sum(_numel(tuple(int(d) for d in w.shape)) for w in weights))
        weight_bytes = float(
            sum(_numel(tuple(int(d) for d in w.shape)) * _itemsize(str(getattr(w, "dtype", "float32"))) for w in weights)
        )
    except Exception:  # weights that cannot be read count as none
        params, weight_bytes = 0, 0.0
    first = shapes.get(op.outputs[0], ()) if op.outputs else ()
    channels = first[-1] if len(first) > 1 else 1
    positions = out_elems / max(channels, 1)
    flops = float(in_elems + out_elems) + 2.0 * params * positions
    return OpCost(
        flops=flops,
        activation_bytes=float((in_elems + out_elems) * itemsize),
        weight_bytes=weight_bytes,
        params=params,
        estimated=True,
    )


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
    return OpCost(
        flops=flops, activation_bytes=float((in_elems + out_elems) * itemsize), weight_bytes=float(weight_bytes), params=op.params
    )


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
