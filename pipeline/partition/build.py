"""Building the shard sub-models.

A shard is rebuilt as a new functional model: one ``keras.Input`` per tensor
it receives, named after that tensor (so the dict key and the input's name are
the same and Keras has nothing to warn about), then every operation of the
shard called again, in order, on the new tensors (the same layer objects, so
the same weights), and a dict of the tensors it sends on. Tensor names carry a
``:index`` suffix that no Keras operation name has, so an input can never take
the name of an operation ("The name ... is used 2 times").

A tensor that carries a Keras mask crosses a cut with its mask
(``<tensor>:mask``, :mod:`pipeline.partition.masks`): the sending shard returns
the mask as one more output (``ExportMask``), the receiving shard takes it as
one more input and attaches it to the tensor again (``AttachMask``) before
any of its operations sees the tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import PartitionError
from pipeline.partition.graph import Graph


@dataclass
class ShardPlan:
    """One shard: its operations (positions in the topological order) and the tensors crossing its border."""

    name: str
    ops: list[int]
    inputs: list[int] = field(default_factory=list)  # tensor ids received
    outputs: list[int] = field(default_factory=list)  # tensor ids sent on
    consumers: dict[int, list[str]] = field(default_factory=dict)  # tensor id -> shard names / "ingress"


def split(graph: Graph, boundaries: Sequence[int], prefix: str = "shard") -> list[ShardPlan]:
    """Cut the ordered ops at ``boundaries`` into shards, and work out what crosses each border."""
    from pipeline.topology import INGRESS

    edges = [0, *boundaries, len(graph.ops)]
    shards = [ShardPlan(name=f"{prefix}{i}", ops=list(range(a, b))) for i, (a, b) in enumerate(zip(edges, edges[1:]))]
    owner = {}
    for shard in shards:
        for op_id in shard.ops:
            owner[op_id] = shard
    model_outputs = set(graph.outputs)
    for shard in shards:
        seen_in: set[int] = set()
        for op_id in shard.ops:
            for tid in graph.ops[op_id].inputs:
                t = graph.tensors[tid]
                if (t.producer is None or owner[t.producer] is not shard) and tid not in seen_in:
                    seen_in.add(tid)
                    shard.inputs.append(tid)
        for op_id in shard.ops:
            for tid in graph.ops[op_id].outputs:
                t = graph.tensors[tid]
                consumers = []
                for c in t.consumers:
                    name = owner[c].name
                    if owner[c] is not shard and name not in consumers:
                        consumers.append(name)
                if tid in model_outputs:
                    consumers.append(INGRESS)
                if consumers:
                    shard.outputs.append(tid)
                    shard.consumers[tid] = consumers
    for shard in shards:
        _add_masks(graph, shard, INGRESS)
        shard.inputs.sort(key=lambda tid: (-1 if graph.tensors[tid].producer is None else graph.tensors[tid].producer, tid))
    return shards


def _add_masks(graph: Graph, shard: ShardPlan, ingress: str) -> None:
    """A tensor that carries a Keras mask takes its mask along: into every shard that receives it, and out of
    its producer to the same shards (the ingress needs no mask: the model's outputs are plain values)."""
    shard.inputs.extend(graph.tensors[tid].mask for tid in list(shard.inputs) if graph.tensors[tid].mask is not None)  # type: ignore[misc]
    outputs: list[int] = []
    for tid in shard.outputs:
        outputs.append(tid)
        mask = graph.tensors[tid].mask
        consumers = [c for c in shard.consumers[tid] if c != ingress]
        if mask is not None and consumers:
            outputs.append(mask)
            shard.consumers[mask] = consumers
    shard.outputs = outputs


def build_shard_model(graph: Graph, shard: ShardPlan) -> Any:
    """A Keras functional model taking ``{name: tensor}`` of the shard's inputs, returning its outputs."""
    import keras
    from keras.src import tree

    from pipeline.partition.masks import AttachMask, ExportMask

    op_names = {graph.ops[i].operation.name for i in shard.ops}
    inputs = {}
    values: dict[int, Any] = {}
    layer_names = _fresh_names(set(op_names))
    for tid in shard.inputs:
        t = graph.tensors[tid]
        if t.name in op_names:
            raise PartitionError(
                f"shard {shard.name!r} would take a tensor named {t.name!r} while also holding an operation of that "
                "name; rename that layer or output so the names differ"
            )
        kt = keras.Input(batch_shape=t.shape, dtype=t.dtype, name=t.name)
        inputs[t.name] = kt
        values[tid] = kt
    for tid in shard.inputs:
        mask = graph.tensors[tid].mask
        if mask is not None and mask in values:
            values[tid] = AttachMask(name=layer_names("pipeline_attach_mask"))([values[tid], values[mask]])
    for op_id in shard.ops:
        op = graph.ops[op_id]
        args, kwargs = op.node.arguments.fill_in(
            {id(kt): values[tid] for kt, tid in zip(op.node.input_tensors, op.inputs)}
        )
        try:
            out = op.operation(*args, **kwargs)
        except Exception as exc:
            raise PartitionError(
                f"calling operation {op.name!r} ({op.class_name}) again on new inputs to build {shard.name!r} failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        flat = tree.flatten(out)
        if len(flat) != len(op.outputs):
            raise PartitionError(
                f"operation {op.name!r} returned {len(flat)} tensors when rebuilt, but {len(op.outputs)} in the model"
            )
        for tid, value in zip(op.outputs, flat):
            values[tid] = value
    outputs = {}
    for tid in shard.outputs:
        t = graph.tensors[tid]
        if t.mask_of is None:
            outputs[t.name] = values[tid]
            continue
        source = values[t.mask_of]
        if getattr(source, "_keras_mask", None) is None:
            raise PartitionError(
                f"shard {shard.name!r} must send the Keras mask of {graph.tensors[t.mask_of].name!r}, but rebuilt on its "
                "own the shard computes that tensor without a mask; expected the same mask as in the whole model"
            )
        outputs[t.name] = ExportMask(mask_shape=t.shape, name=layer_names("pipeline_export_mask"))(source)
    return keras.Model(inputs=inputs, outputs=outputs, name=shard.name)


def _fresh_names(taken: set[str]) -> Any:
    """A function giving ``prefix_0``, ``prefix_1``, ... that no operation of the shard is named."""
    counter = [0]

    def fresh(prefix: str) -> str:
        while True:
            name = f"{prefix}_{counter[0]}"
            counter[0] += 1
            if name not in taken:
                taken.add(name)
                return name

    return fresh
