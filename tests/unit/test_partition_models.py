"""Hand-built graphs split at every place (or K = 2..4): the shards reproduce the whole model bitwise."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from pipeline import topology as topo
from pipeline.partition.command import partition
from pipeline.partition.graph import build_graph
from pipeline.partition.reference import call_chain, call_whole, random_inputs
from pipeline.partition.source import load_keras_file
from tests import models


def _check_dir(directory: Path) -> None:
    """Load the shard files fresh (safe mode) and compare the chain with the whole model bitwise."""
    t = topo.load(directory)
    whole = load_keras_file(t.model_path)
    shards = {s.name: load_keras_file(t.shard_path(s.name)) for s in t.shards}
    rng = np.random.default_rng(1)
    for batch in (1, 3):
        inputs = random_inputs(t.inputs, batch, rng)
        expected = call_whole(whole, inputs)
        got = call_chain(t, shards, inputs)
        assert list(got) == list(t.output_names)
        for name in t.output_names:
            assert got[name].shape == expected[name].shape
            assert got[name].tobytes() == expected[name].tobytes(), name


@pytest.mark.parametrize("name", sorted(models.ALL))
def test_every_single_cut_reproduces_the_model(name: str, tmp_path: Path) -> None:
    model = models.ALL[name]()
    graph = build_graph(model)
    for op in graph.ops[:-1]:
        out = tmp_path / f"cut_{op.id}"
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            partition(model, name=name, out=out, cuts=[op.name], verify=False)
        naming = [w for w in caught if "must match the names" in str(w.message) or "used 2 times" in str(w.message)]
        assert not naming, [str(w.message) for w in naming]
        _check_dir(out)


@pytest.mark.parametrize("name", sorted(models.ALL))
def test_balanced_plans(name: str, tmp_path: Path) -> None:
    model = models.ALL[name]()
    n = len(build_graph(model).ops)
    for k in range(2, min(4, n) + 1):
        result = partition(model, name=name, out=tmp_path / f"k{k}", shards=k)
        assert len(result.topology.shards) == k
        _check_dir(tmp_path / f"k{k}")


def test_names_follow_the_contract(tmp_path: Path) -> None:
    result = partition(models.two_in_two_out(), name="m", out=tmp_path / "m", shards=3)
    t = result.topology
    assert t.input_names == ("left", "right")
    assert t.output_names == ("head_one", "head_two")
    assert [s.dtype for s in t.inputs] == ["float32", "float32"]
    assert t.inputs[0].shape == (-1, 6)
    internal = [n for s in t.shards for n in s.output_names if n not in t.output_names]
    assert all(":" in n for n in internal)
    assert len(set(internal)) == len(internal)
    # the on-disk contract: topology.yaml, a file per shard, model.keras
    assert (tmp_path / "m" / "topology.yaml").is_file()
    assert (tmp_path / "m" / "model.keras").is_file()
    assert sorted(p.name for p in (tmp_path / "m").glob("shard*.keras")) == ["shard0.keras", "shard1.keras", "shard2.keras"]


def test_sequential_output_is_last_layer_name(tmp_path: Path) -> None:
    t = partition(models.sequential(), name="seq", out=tmp_path / "s", shards=2).topology
    assert t.output_names == ("s_out",)
    assert t.input_names == ("seq_in",)


def test_join_without_fork_lists_every_branch(tmp_path: Path) -> None:
    """Cut inside the squeeze-excite block right after the non-layer Add: the shard holding the
    join (se_mul) but not its fork (expand) takes both branches as inputs."""
    model = models.squeeze_excite()
    t = partition(model, name="se", out=tmp_path / "se", cuts=["add"]).topology
    second = t.shards[1]
    assert set(second.inputs) == {"expand:0", "add:0"}
    first_out = {o.name: o.consumers for o in t.shards[0].outputs}
    assert first_out == {"expand:0": ("shard1",), "add:0": ("shard1",)}
    _check_dir(tmp_path / "se")


def test_skip_connection_goes_straight_to_its_consumer(tmp_path: Path) -> None:
    """A tensor consumed two shards later is sent directly, not relayed through the shard in between."""
    model = models.residual()
    t = partition(model, name="r", out=tmp_path / "r", cuts=["conv_a", "relu_a"]).topology
    assert t.shards[0].name == "shard0"
    # the model input feeds shard0 (conv_a) and shard2 (skip_add) directly from the ingress
    assert t.entry_routes() == {"shard0": ("image",), "shard2": ("image",)}
    assert "image" not in t.shards[1].inputs
    _check_dir(tmp_path / "r")
