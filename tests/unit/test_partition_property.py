"""Property: random DAG models (layers and keras.ops nodes, forks, joins, several outputs) split
at random cut sets always reproduce the whole model bitwise."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.partition import cost, planner
from pipeline.partition.build import build_shard_model, split
from pipeline.partition.graph import build_graph
from pipeline.partition.reference import call_whole

WIDTH = 6


def dag_models(draw, seed: int):
    """A random DAG model; ``draw`` is the test's ``data.draw`` (seeding Keras is not allowed in a strategy)."""
    import keras
    from keras import layers, ops

    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    n_inputs = draw(st.integers(1, 2))
    inputs = [keras.Input((WIDTH,), name=f"in{i}") for i in range(n_inputs)]
    tensors = list(inputs)
    for i in range(draw(st.integers(2, 9))):
        kind = draw(st.sampled_from(["dense", "relu", "add", "mul", "const", "tanh", "concat"]))
        a = tensors[draw(st.integers(0, len(tensors) - 1))]
        b = tensors[draw(st.integers(0, len(tensors) - 1))]
        if kind == "dense":
            y = layers.Dense(WIDTH, name=f"dense{i}")(a)
        elif kind == "relu":
            y = layers.ReLU(name=f"relu{i}")(a)
        elif kind == "add":
            y = layers.Add(name=f"add{i}")([a, b])
        elif kind == "mul":
            y = a * b
        elif kind == "const":
            y = a * 0.5 + 3.0
        elif kind == "tanh":
            y = ops.tanh(a)
        else:
            y = layers.Dense(WIDTH, name=f"proj{i}")(layers.Concatenate(name=f"cat{i}")([a, b]))
        tensors.append(y)
    produced = tensors[n_inputs:]
    n_out = draw(st.integers(1, min(2, len(produced))))
    picks = draw(st.lists(st.sampled_from(range(len(produced))), min_size=n_out, max_size=n_out, unique=True))
    outs = [produced[-1]] + [produced[p] for p in picks if produced[p] is not produced[-1]][: n_out - 1]
    return keras.Model(inputs, outs if len(outs) > 1 else outs[0])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(seed=st.integers(0, 1000), data=st.data())
def test_random_cuts_reproduce_random_dags(seed: int, data: st.DataObject) -> None:
    model = dag_models(data.draw, seed)
    graph = build_graph(model)
    shapes = cost.concrete_shapes(graph)
    tbytes = [cost.tensor_bytes(graph, shapes, t.id) if t.id in shapes else 0 for t in graph.tensors]
    cross = planner.crossings(graph, tbytes)
    candidates = [int(b) for b in np.flatnonzero(cross.allowed)]
    cuts = sorted(data.draw(st.lists(st.sampled_from(candidates), unique=True, max_size=len(candidates))) if candidates else [])
    plans = split(graph, cuts)
    shard_models = [build_shard_model(graph, p) for p in plans]
    rng = np.random.default_rng(0)
    inputs = {name: rng.standard_normal((3, WIDTH)).astype("float32") for name in graph.input_names}
    expected = call_whole(model, inputs)
    values = dict(inputs)
    for plan, sub in zip(plans, shard_models):
        result = sub({graph.tensors[t].name: values[graph.tensors[t].name] for t in plan.inputs})
        assert set(result) == {graph.tensors[t].name for t in plan.outputs}
        values.update({k: np.asarray(v) for k, v in result.items()})
    for name in graph.output_names:
        assert values[name].tobytes() == expected[name].tobytes()
    # every tensor a shard takes comes from an earlier shard or the model inputs: a DAG, no cycle
    seen = set(graph.input_names)
    for plan in plans:
        assert {graph.tensors[t].name for t in plan.inputs} <= seen
        seen |= {graph.tensors[t].name for t in plan.outputs}
