"""The operation graph of a Keras 3 functional model.

Every node of the graph is an operation: a layer, or a ``keras.ops`` operation
that is not a layer (``x + 3.0`` inside ``hard_sigmoid`` is a
``keras.src.ops.numpy.Add`` node that ``model.layers`` does not list). Nested
functional and ``Sequential`` models called as layers are inlined, so a cut
may fall inside them; a layer called more than once gives one node per call.

The graph is walked once, in a fixed order (like ``keras/src/ops/function.py``),
into plain records: operations and tensors with integer ids, a tensor id to
producer and consumers map, and a topological order. The partitioner works on
these records only; :mod:`pipeline.partition.build` turns a set of them back
into a Keras model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import PartitionError


@dataclass
class Tensor:
    id: int
    name: str
    shape: tuple[int | None, ...]
    dtype: str
    producer: int | None  # op id, None for a model input
    consumers: list[int] = field(default_factory=list)  # op ids, in topological order
    keras_tensor: Any = None
    has_mask: bool = False
    mask: int | None = None  # id of the record of this tensor's Keras mask (see _add_mask_records)
    mask_of: int | None = None  # on a mask record: the id of the tensor whose mask it is

    @property
    def is_batched(self) -> bool:
        return len(self.shape) > 0 and self.shape[0] is None


@dataclass
class Op:
    id: int
    name: str  # unique display name, used by --cut
    operation: Any  # the keras Operation (a Layer or an op)
    node: Any  # the keras Node of this call
    inputs: list[int]  # tensor ids, aligned with node.input_tensors
    outputs: list[int]  # tensor ids, aligned with flattened node.outputs
    kind: str  # "layer" or "op"
    class_name: str

    @property
    def params(self) -> int:
        weights = getattr(self.operation, "weights", None) or []
        return int(sum(int(_size(w.shape)) for w in weights))


@dataclass
class Graph:
    name: str
    ops: list[Op]  # in topological order: ops[i].id == i
    tensors: list[Tensor]
    inputs: list[int]  # model input tensor ids, in model order
    outputs: list[int]  # model output tensor ids, in model order
    input_names: list[str]
    output_names: list[str]


def functional_of(model: Any) -> Any:
    """The functional graph of a model (a ``Sequential``'s inner one), or raise a clear error."""
    from keras.src.models.functional import Functional
    from keras.src.models.sequential import Sequential

    if isinstance(model, Sequential):
        fn = getattr(model, "_functional", None)
        if fn is None:
            raise PartitionError(
                f"the Sequential model {model.name!r} has no graph yet: it was never built with an input shape. "
                "Expected a model whose first layer is keras.Input(shape=...); build it (model.build(...)) or pass --input-shape"
            )
        return fn
    if isinstance(model, Functional):
        return model
    raise PartitionError(
        f"the model {getattr(model, 'name', model)!r} is a subclassed {type(model).__name__}, not a functional or "
        "Sequential model. A subclassed model's call() is arbitrary Python code, so Keras records no graph of "
        "operations that could be cut. Rebuild it with the functional API (keras.Input, then call the layers, then "
        "keras.Model(inputs, outputs)), or wrap its pieces as layers of a functional model."
    )


def build_graph(model: Any) -> Graph:
    """Walk the model's graph once into :class:`Graph` records (nested models inlined)."""

    fn = functional_of(model)
    walker = _Walker()
    input_tids = []
    input_names = []
    for kt in fn.inputs:
        name = kt._keras_history.operation.name
        input_tids.append(walker.new_tensor(kt, producer=None, name=name))
        input_names.append(name)
    output_tids = walker.walk_functional(fn, "", input_tids)

    output_names = model_output_names(model)
    if len(output_names) != len(output_tids):
        raise PartitionError(
            f"the model declares {len(output_names)} output names {output_names} for {len(output_tids)} output tensors"
        )
    if len(set(output_tids)) != len(output_tids):
        raise PartitionError(
            f"the model returns the same tensor as two outputs ({output_names}); give each output its own operation"
        )
    for tid, name in zip(output_tids, output_names):
        if walker.tensors[tid].producer is None:
            raise PartitionError(
                f"model output {name!r} is a model input passed straight through; there is nothing for a shard to compute"
            )
    return _finish(walker, input_tids, output_tids, input_names, output_names, model.name)


def model_output_names(model: Any) -> list[str]:
    """``model.output_names`` (a Sequential's last layer name); repeats get ``:1``, ``:2`` suffixes."""
    from keras.src.models.sequential import Sequential

    names = [model.layers[-1].name] if isinstance(model, Sequential) else list(model.output_names)
    out: list[str] = []
    for name in names:
        out.append(f"{name}:{names[: len(out)].count(name)}" if name in names[: len(out)] else name)
    return out


class _Walker:
    def __init__(self) -> None:
        self.tensors: list[Tensor] = []
        self.ops: list[Op] = []
        self.calls: dict[tuple[str, int], int] = {}  # (prefix, id(operation)) -> calls so far

    def new_tensor(self, kt: Any, producer: int | None, name: str = "") -> int:
        tid = len(self.tensors)
        shape = tuple(None if d is None else int(d) for d in kt.shape)
        self.tensors.append(
            Tensor(
                id=tid,
                name=name,
                shape=shape,
                dtype=str(kt.dtype),
                producer=producer,
                keras_tensor=kt,
                has_mask=getattr(kt, "_keras_mask", None) is not None,
            )
        )
        return tid

    def walk_functional(self, fn: Any, prefix: str, input_tids: list[int]) -> list[int]:
        local: dict[int, int] = {}
        for kt, tid in zip(fn.inputs, input_tids):
            local[id(kt)] = tid
        for node in _execution_order(fn):
            op = node.operation
            in_tids = [local[id(x)] for x in node.input_tensors]
            inner = _inlinable(node)
            key = (prefix, id(op))
            call = self.calls.get(key, 0)
            self.calls[key] = call + 1
            display = f"{prefix}{op.name}" + (f":{call}" if call else "")
            if inner is not None:
                flat_args = _flat_call_inputs(node)
                arg_tids = [local[id(x)] for x in flat_args]
                out_tids = self.walk_functional(inner, f"{display}.", arg_tids)
                for kt, tid in zip(_flatten(node.outputs), out_tids):
                    local[id(kt)] = tid
                continue
            from keras.src.layers.layer import Layer

            op_id = len(self.ops)
            out_tids = [self.new_tensor(kt, producer=op_id) for kt in _flatten(node.outputs)]
            for kt, tid in zip(_flatten(node.outputs), out_tids):
                local[id(kt)] = tid
            self.ops.append(
                Op(
                    id=op_id,
                    name=display,
                    operation=op,
                    node=node,
                    inputs=in_tids,
                    outputs=out_tids,
                    kind="layer" if isinstance(op, Layer) else "op",
                    class_name=f"{type(op).__module__}.{type(op).__name__}",
                )
            )
        return [local[id(kt)] for kt in fn.outputs]


def _execution_order(fn: Any) -> list[Any]:
    nodes = []
    for depth in sorted(fn._nodes_by_depth.keys(), reverse=True):
        for node in fn._nodes_by_depth[depth]:
            if node.operation is None or node.is_input:
                continue
            nodes.append(node)
    return nodes


def _inlinable(node: Any) -> Any:
    """The inner functional graph of a nested model call that can be inlined, else ``None``."""
    from keras.src.models.functional import Functional
    from keras.src.models.sequential import Sequential

    op = node.operation
    if isinstance(op, Sequential):
        inner = getattr(op, "_functional", None)
    elif isinstance(op, Functional):
        inner = op
    else:
        return None
    if inner is None:
        return None
    extra = set(node.arguments.kwargs) - {"training", "mask"}
    if extra or len(node.arguments.args) != 1:
        return None
    if node.arguments.kwargs.get("mask") is not None:
        return None
    flat = _flat_call_inputs(node)
    if len(flat) != len(inner.inputs):
        return None
    for outer, inner_kt in zip(flat, inner.inputs):
        if len(outer.shape) != len(inner_kt.shape) or str(outer.dtype) != str(inner_kt.dtype):
            return None  # Keras would adjust ranks or cast: keep the call whole
    if any(getattr(x, "_keras_mask", None) is not None for x in flat):
        return None
    return inner


def _flat_call_inputs(node: Any) -> list[Any]:
    from keras.src import tree

    arg = node.arguments.args[0]
    inner_struct = getattr(node.operation, "_inputs_struct", None)
    if isinstance(arg, dict) and isinstance(inner_struct, dict):
        # Functional matches a dict by key; tree.flatten orders both the same (sorted keys).
        return list(tree.flatten({k: arg[k] for k in inner_struct if k in arg}))
    return list(tree.flatten(arg))


def _flatten(x: Any) -> list[Any]:
    from keras.src import tree

    return list(tree.flatten(x))


def _size(shape: Any) -> int:
    n = 1
    for d in shape:
        n *= int(d) if d is not None else 1
    return n


def _finish(
    walker: _Walker,
    input_tids: list[int],
    output_tids: list[int],
    input_names: list[str],
    output_names: list[str],
    name: str,
) -> Graph:
    """Order the ops topologically (depth first from the outputs, so branches stay together) and name tensors."""
    ops = walker.ops
    tensors = walker.tensors
    order = _topological_order(ops, tensors, output_tids)
    new_id = {old: new for new, old in enumerate(order)}
    ordered = [ops[old] for old in order]
    for op in ordered:
        op.id = new_id[op.id]
    for t in tensors:
        if t.producer is not None:
            t.producer = new_id.get(t.producer)
    # Ops that no output depends on are not part of the model's computation: they are left out.
    for t in tensors:
        t.consumers = []
    for op in ordered:
        for tid in op.inputs:
            tensors[tid].consumers.append(op.id)
    for tid, oname in zip(output_tids, output_names):
        tensors[tid].name = oname
    for tid, iname in zip(input_tids, input_names):
        tensors[tid].name = iname
    taken = set(input_names) | set(output_names)
    for op in ordered:
        for i, tid in enumerate(op.outputs):
            t = tensors[tid]
            if not t.name:
                t.name = f"{op.name}:{i}"
                if t.name in taken:
                    raise PartitionError(f"tensor name {t.name!r} is used twice; rename the layer {op.name!r}")
                taken.add(t.name)
    _add_mask_records(tensors, ordered, taken)
    return Graph(
        name=name,
        ops=ordered,
        tensors=tensors,
        inputs=input_tids,
        outputs=output_tids,
        input_names=input_names,
        output_names=output_names,
    )


def _add_mask_records(tensors: list[Tensor], ops: list[Op], taken: set[str]) -> None:
    """One more tensor record per computed tensor that carries a Keras mask: ``<tensor>:mask``, a boolean
    tensor with the same producer and consumers, which crosses a cut wherever its tensor does."""
    from pipeline.partition.masks import mask_name

    for op in ops:
        for tid in op.outputs:
            t = tensors[tid]
            if not t.has_mask:
                continue
            kmask = t.keras_tensor._keras_mask
            name = mask_name(t.name)
            if name in taken:
                raise PartitionError(f"tensor name {name!r} (the Keras mask of {t.name!r}) is used twice; rename the layer {op.name!r}")
            taken.add(name)
            mid = len(tensors)
            tensors.append(
                Tensor(
                    id=mid,
                    name=name,
                    shape=tuple(None if d is None else int(d) for d in kmask.shape),
                    dtype="bool",
                    producer=t.producer,
                    consumers=list(t.consumers),
                    keras_tensor=kmask,
                    mask_of=tid,
                )
            )
            t.mask = mid


def _topological_order(ops: list[Op], tensors: list[Tensor], output_tids: list[int]) -> list[int]:
    """Depth-first post-order from the outputs, visiting inputs in argument order (iterative)."""
    visited: set[int] = set()
    order: list[int] = []
    for out in output_tids:
        root = tensors[out].producer
        if root is None or root in visited:
            continue
        stack: list[tuple[int, int]] = [(root, 0)]
        visited.add(root)
        while stack:
            op_id, i = stack[-1]
            op = ops[op_id]
            if i < len(op.inputs):
                stack[-1] = (op_id, i + 1)
                producer = tensors[op.inputs[i]].producer
                if producer is not None and producer not in visited:
                    visited.add(producer)
                    stack.append((producer, 0))
            else:
                stack.pop()
                order.append(op_id)
    return order
