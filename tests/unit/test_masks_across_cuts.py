"""Keras masks across cuts: masked sequence models split anywhere reproduce the whole model bitwise.

The inputs are padded (trailing zeros), and each test first checks that the
padding matters: the unmasked twin of the model (same weights, no
``mask_zero``) and a chain whose masks were replaced by all-true masks both
answer differently, so a lost mask would fail these tests.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from pipeline import topology as topo
from pipeline.errors import PartitionError
from pipeline.partition import planner
from pipeline.partition.command import partition
from pipeline.partition.graph import build_graph
from pipeline.partition.reference import call_chain, call_whole
from pipeline.partition.source import load_keras_file
from tests import masked_models as mm

pytestmark = pytest.mark.timeout(900)


def _load(directory: Path) -> tuple[topo.Topology, Any, dict[str, Any]]:
    t = topo.load(directory)
    whole = load_keras_file(t.model_path)
    shards = {s.name: load_keras_file(t.shard_path(s.name)) for s in t.shards}
    return t, whole, shards


def _chain_with(
    t: topo.Topology, shards: Mapping[str, Any], inputs: Mapping[str, np.ndarray], replace: Sequence[str]
) -> dict[str, np.ndarray]:
    """``call_chain``, with the tensors named in ``replace`` (bool) set to all-true on their way: a lost mask."""
    values: dict[str, Any] = dict(inputs)
    for spec in t.shards:
        fed = {n: (np.ones_like(values[n]) if n in replace else values[n]) for n in spec.inputs}
        result = shards[spec.name](fed, training=False)
        for name in spec.output_names:
            values[name] = np.asarray(result[name])
    return {name: values[name] for name in t.output_names}


def _bitwise(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes() for k in a)


def _inputs(batch: int) -> dict[str, np.ndarray]:
    return {"tokens": mm.padded_tokens(batch, seed=batch)}


def test_the_padding_matters() -> None:
    """The masked model and its unmasked twin agree on the unpadded row and differ on every padded one."""
    for build in mm.ALL.values():
        tokens = mm.padded_tokens(4)
        masked = np.asarray(build(masked=True)(tokens))
        plain = np.asarray(build(masked=False)(tokens))
        assert (tokens[0] != 0).all() and (tokens[1:] == 0).any(axis=1).all()
        np.testing.assert_array_equal(masked[0], plain[0])
        assert (np.abs(masked[1:] - plain[1:]).max(axis=1) > 1e-4).all(), build.__name__


def test_lstm_stack_every_set_of_cuts(tmp_path: Path) -> None:
    """Embedding(mask_zero) -> Dense -> LSTM -> LSTM -> Dense: every set of cuts (K = 2 up to the number of
    operations), shard files loaded fresh in safe mode, chained, bitwise equal to the whole model."""
    model = mm.lstm_stack()
    graph = build_graph(model)
    n = len(graph.ops)
    cross = planner.crossings(graph, [0] * len(graph.tensors))
    assert cross.allowed[1:n].all(), cross.reasons  # every interior position is a valid cut
    tokens = {1: _inputs(1), 5: _inputs(5)}
    names = [op.name for op in graph.ops[:-1]]
    seen_k = set()
    dropped_checked = 0
    for k in range(1, n):
        for cuts in itertools.combinations(names, k):
            out = tmp_path / ("cut_" + "_".join(cuts))
            partition(model, name="lstm_stack", out=out, cuts=list(cuts), verify=False)
            t, whole, shards = _load(out)
            assert len(t.shards) == k + 1
            seen_k.add(k + 1)
            for inputs in tokens.values():
                expected = call_whole(whole, inputs)
                assert _bitwise(call_chain(t, shards, inputs), expected), cuts
            crossing_bools = [n_ for s in t.shards for n_ in s.inputs if t.tensors[n_].dtype == "bool"]
            if "not_equal:0" in crossing_bools:
                # the mask the LSTMs read crosses: lost (all true), it shows on the padded rows
                dropped = _chain_with(t, shards, tokens[5], crossing_bools)
                assert not _bitwise(dropped, call_whole(whole, tokens[5])), cuts
                dropped_checked += 1
    assert seen_k == set(range(2, n + 1))
    assert dropped_checked >= 8


def test_lstm_stack_topology_lists_masks(tmp_path: Path) -> None:
    """A cut inside the masked region sends ``<tensor>:mask``: bool, its tensor's leading axes, same route."""
    result = partition(mm.lstm_stack(), name="lstm_stack", out=tmp_path / "m", cuts=["project"])
    t = topo.load(tmp_path / "m")
    assert t.masks == {"project:0:mask": "project:0"}
    spec = t.tensors["project:0:mask"]
    assert (spec.dtype, spec.shape, spec.mask_of) == ("bool", (-1, mm.STEPS), "project:0")
    first, second = t.shards
    outs = {o.name: o.consumers for o in first.outputs}
    assert outs["project:0:mask"] == outs["project:0"] == ("shard1",)
    assert {"project:0", "project:0:mask"} <= set(second.inputs)
    assert result.topology.masks == t.masks
    text = (tmp_path / "m" / topo.TOPOLOGY_FILE).read_text()
    assert "mask_of: project:0" in text


def test_lstm_stack_balanced_plans(tmp_path: Path) -> None:
    """The planner chooses cuts inside the masked region now; verify (bitwise, batches 1 and 2) passes."""
    model = mm.lstm_stack()
    n = len(build_graph(model).ops)
    for k in range(2, n + 1):
        result = partition(model, name="lstm_stack", out=tmp_path / f"k{k}", shards=k)  # verifies bitwise
        assert len(result.topology.shards) == k
        t, whole, shards = _load(tmp_path / f"k{k}")
        inputs = _inputs(4)
        assert _bitwise(call_chain(t, shards, inputs), call_whole(whole, inputs))


def test_masked_join_every_single_cut(tmp_path: Path) -> None:
    """Two branches of the masked embedding joined by Multiply and Concatenate: every single cut, bitwise."""
    model = mm.masked_join()
    graph = build_graph(model)
    inputs = _inputs(5)
    for op in graph.ops[:-1]:
        out = tmp_path / f"cut_{op.id}"
        partition(model, name="masked_join", out=out, cuts=[op.name], verify=False)
        t, whole, shards = _load(out)
        assert _bitwise(call_chain(t, shards, inputs), call_whole(whole, inputs)), op.name


def test_masked_join_inputs_from_different_shards(tmp_path: Path) -> None:
    """Cut between the two branches and after them: the Multiply's two inputs come from two shards, each with
    its mask; without the re-attached masks (all true) the answers differ, with them they are bitwise."""
    model = mm.masked_join()
    out = tmp_path / "join"
    partition(model, name="masked_join", out=out, cuts=["branch_a", "branch_b"])
    t, whole, shards = _load(out)
    join = t.shards[2]
    producers = t.producers(join.name)
    assert producers["shard0"] == ("branch_a:0", "branch_a:0:mask")
    assert producers["shard1"] == ("branch_b:0", "branch_b:0:mask")
    inputs = _inputs(5)
    expected = call_whole(whole, inputs)
    assert _bitwise(call_chain(t, shards, inputs), expected)
    dropped = _chain_with(t, shards, inputs, list(t.masks))  # only the <tensor>:mask tensors
    assert not _bitwise(dropped, expected)
    diff = np.abs(dropped["head"] - expected["head"]).max(axis=1)
    assert diff[0] == 0.0 and (diff[1:] > 1e-4).all()  # exactly the padded rows change


def test_masked_join_balanced_plans(tmp_path: Path) -> None:
    model = mm.masked_join()
    for k in (2, 3, 5):
        result = partition(model, name="masked_join", out=tmp_path / f"k{k}", shards=k)
        assert len(result.topology.shards) == k


def test_a_mask_not_shaped_like_the_leading_axes_refuses_the_cut() -> None:
    """The only masks that still refuse a cut: one the receiving side could not re-attach (no Keras layer
    makes one; a hand-made layer could)."""
    import keras

    class OddMask(keras.layers.Layer):
        def compute_mask(self, inputs: Any, previous_mask: Any = None) -> Any:
            return keras.ops.any(keras.ops.not_equal(inputs, 0.0), axis=1)  # (batch, 4) for (batch, 5, 4)

        def call(self, inputs: Any) -> Any:
            return inputs * 2.0

    keras.backend.clear_session()
    x = keras.Input((5, 4), name="x")
    h = OddMask(name="odd")(x)
    out = keras.layers.Dense(2, name="head")(keras.layers.Dense(3, name="mid")(h))
    graph = build_graph(keras.Model(x, out))
    cross = planner.crossings(graph, [0] * len(graph.tensors))
    assert not cross.allowed[1]
    assert "leading axes" in cross.reasons[1] and "odd:0" in cross.reasons[1]
    with pytest.raises(PartitionError, match="leading axes"):
        planner.boundaries_for_cuts(graph, ["odd"], cross)
