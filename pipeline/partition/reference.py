"""Running the whole model and the chained shards on named inputs (verify, record, bench)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from pipeline.topology import TensorSpec, Topology


def random_inputs(
    specs: Sequence[TensorSpec], batch: int, rng: np.random.Generator, sample_shapes: Mapping[str, Sequence[int]] | None = None
) -> dict[str, np.ndarray]:
    """Random inputs of the declared dtypes and shapes (unknown axes from ``sample_shapes``, else 1)."""
    from pipeline.wire.codec import NUMPY_DTYPES

    out = {}
    for spec in specs:
        sample = list((sample_shapes or {}).get(spec.name, []))
        shape = [batch]
        for i, d in enumerate(spec.shape[1:], start=1):
            shape.append(d if d != -1 else (int(sample[i]) if i < len(sample) else 1))
        dtype = NUMPY_DTYPES[spec.dtype]
        if np.issubdtype(dtype, np.floating) or spec.dtype == "bfloat16":
            value = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            value = rng.integers(0, 2, shape).astype(np.bool_)
        else:
            value = rng.integers(0, 8, shape).astype(dtype)
        out[spec.name] = value
    return out


def input_structure(model: Any) -> Any:
    """How the whole model takes its inputs: a dict key -> input name, a list of names, or one name."""
    from pipeline.partition.graph import functional_of

    fn = functional_of(model)
    struct = fn._inputs_struct
    name = lambda kt: kt._keras_history.operation.name  # noqa: E731
    if isinstance(struct, dict):
        return {k: name(v) for k, v in struct.items()}
    if isinstance(struct, (list, tuple)):
        return [name(v) for v in struct]
    return name(struct)


def call_whole(model: Any, inputs: Mapping[str, np.ndarray], fn: Any = None) -> dict[str, np.ndarray]:
    """Call the whole model on ``{input name: array}``; return ``{output name: array}``."""
    from keras.src import tree

    from pipeline.partition.graph import model_output_names

    struct = input_structure(model)
    if isinstance(struct, dict):
        args: Any = {k: inputs[v] for k, v in struct.items()}
    elif isinstance(struct, list):
        args = [inputs[v] for v in struct]
    else:
        args = inputs[struct]
    result = model(args, training=False) if fn is None else fn(args)
    names = model_output_names(model)
    flat = tree.flatten(result)  # the order of model.outputs (dict keys sorted), as output_names
    return {n: np.asarray(v) for n, v in zip(names, flat)}


def compiled(model: Any, inputs: Sequence[TensorSpec]) -> Any:
    """The whole model as one ``tf.function`` over ``{input name: tensor}``, as the workers run their shards.

    Compiled and eager calls differ in the last bits (graph optimisations fuse
    some kernels: ~1.6e-9 on MobileNetV3Large), and the shards run compiled, so
    a bitwise reference for served answers comes from this, not from an eager call.
    """
    import tensorflow as tf

    struct = input_structure(model)
    signature = [{s.name: tf.TensorSpec([None, *[None if d == -1 else d for d in s.shape[1:]]], s.dtype) for s in inputs}]

    def arrange(named: Any) -> Any:  # the model's own input structure, from {input name: tensor}
        if isinstance(struct, dict):
            return {k: named[v] for k, v in struct.items()}
        if isinstance(struct, list):
            return [named[v] for v in struct]
        return named[struct]

    @tf.function(input_signature=signature)
    def fn(named: Any) -> Any:
        return model(arrange(named), training=False)

    return fn


def call_compiled(model: Any, fn: Any, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Call :func:`compiled`'s function on ``{input name: array}``; return ``{output name: array}``."""
    from keras.src import tree

    from pipeline.partition.graph import model_output_names

    result = fn(dict(inputs))
    return {n: np.asarray(v) for n, v in zip(model_output_names(model), tree.flatten(result))}


def call_chain(topology: Topology, shards: Mapping[str, Any], inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Chain the shards in list order over a dict that starts with the model inputs."""
    values: dict[str, Any] = dict(inputs)
    for spec in topology.shards:
        result = shards[spec.name]({name: values[name] for name in spec.inputs}, training=False)
        for name in spec.output_names:
            values[name] = np.asarray(result[name])
    return {name: values[name] for name in topology.output_names}
