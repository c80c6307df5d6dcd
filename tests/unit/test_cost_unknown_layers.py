"""The cost model on a layer type it does not know (a user's own layer): an estimate from the output size and
the parameters, marked as such in the plan and listed by ``pipeline show``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pytest

from pipeline.partition import cost
from pipeline.partition import show as show_cmd
from pipeline.partition.command import partition
from pipeline.partition.graph import build_graph


class Mixer(keras.layers.Layer):
    """Not registered, not Keras's: a weight matrix used in a way no rule of the cost model describes."""

    def __init__(self, units: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.units = units

    def build(self, input_shape: Any) -> None:
        self.w = self.add_weight(shape=(input_shape[-1], self.units), initializer="glorot_uniform", name="w")
        self.b = self.add_weight(shape=(self.units,), initializer="zeros", name="b")

    def call(self, inputs: Any) -> Any:
        return keras.ops.tanh(keras.ops.matmul(inputs, self.w) + self.b) * 2.0


class Opaque(keras.layers.Layer):
    """Whose weights cannot even be read: the cost model must still give an estimate."""

    @property
    def weights(self) -> list[Any]:  # type: ignore[override]
        raise RuntimeError("no weights for you")

    def call(self, inputs: Any) -> Any:
        return inputs + 1.0


def _model() -> keras.Model:
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    x = keras.Input((6, 10), name="x")
    h = keras.layers.Dense(16, name="dense")(x)
    h = Mixer(32, name="mixer")(h)
    h = Opaque(name="opaque")(h)
    out = keras.layers.Dense(4, name="head")(keras.layers.Flatten(name="flat")(h))
    return keras.Model(x, out, name="custom")


def test_unknown_layers_are_estimated_from_output_size_and_parameters() -> None:
    graph = build_graph(_model())
    shapes = cost.concrete_shapes(graph)
    costs = {op.name: c for op, c in zip(graph.ops, cost.op_costs(graph, shapes))}
    assert {name for name, c in costs.items() if c.estimated} == {"mixer", "opaque"}
    mixer = costs["mixer"]
    params = 16 * 32 + 32
    assert mixer.params == params
    # each parameter used once per output position (6 steps), plus reading inputs and writing outputs
    assert mixer.flops == pytest.approx(6 * 16 + 6 * 32 + 2.0 * params * 6)
    assert mixer.weight_bytes == 4 * params
    assert costs["opaque"].params == 0 and costs["opaque"].flops == pytest.approx(2 * 6 * 32)
    for c in costs.values():
        assert np.isfinite(c.seconds(1)) and c.seconds(1) > 0 and np.isfinite(c.seconds(8))
    # Keras's own layers keep their rules: the Dense is known, and its estimate is the generic one
    assert not costs["dense"].estimated and costs["dense"].flops == pytest.approx(6 * 10 + 6 * 16 + 2.0 * 6 * 16 * 10)


def test_a_known_layer_the_rules_cannot_read_falls_back_to_the_estimate() -> None:
    graph = build_graph(_model())
    shapes = cost.concrete_shapes(graph)
    dense = next(op for op in graph.ops if op.name == "head")
    broken = dict(shapes)
    del broken[dense.outputs[0]]  # the rules need the output's shape; the estimate does without
    costs = cost.op_costs(graph, broken)
    assert costs[dense.id].estimated and np.isfinite(costs[dense.id].seconds(1))


def test_show_lists_the_estimated_operations(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    result = partition(_model(), name="custom", out=tmp_path / "custom", cuts=["mixer"], verify=False)
    assert "estimated from their output size and parameters" in result.table
    capsys.readouterr()
    assert show_cmd.run(argparse.Namespace(directory=tmp_path / "custom", format="table", out=None)) == 0
    text = capsys.readouterr().out
    assert "2 operation(s) of layer types the cost model does not know" in text
    assert "shard0: mixer (Mixer)" in text and "shard1: opaque (Opaque)" in text
    rows = result.topology.extra["plan"]["shards"]
    assert rows[0]["estimated"] == ["mixer (Mixer)"] and rows[1]["estimated"] == ["opaque (Opaque)"]


def test_a_plan_of_keras_layers_lists_nothing(tmp_path: Path) -> None:
    keras.backend.clear_session()
    x = keras.Input((5,), name="x")
    model = keras.Model(x, keras.layers.Dense(2, name="b")(keras.layers.Dense(3, name="a")(x)))
    result = partition(model, name="plain", out=tmp_path / "plain", shards=2, verify=False)
    assert "does not know" not in result.table
    assert all("estimated" not in r for r in result.topology.extra["plan"]["shards"])
