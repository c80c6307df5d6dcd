"""MobileNetV3Large (the original study's model) split with K = 2..6 and at named cuts: bitwise equal."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import topology as topo
from pipeline.partition.command import partition
from pipeline.partition.source import load_source
from pipeline.partition.verify import verify_directory

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def mobilenet():
    model, name = load_source("mobilenet_v3_large")
    assert name == "mobilenet_v3_large"
    return model


@pytest.mark.parametrize("k", [2, 3, 4, 5, 6])
def test_balanced_k_shards_are_exact(mobilenet, k: int, tmp_path: Path) -> None:
    result = partition(mobilenet, name="mobilenet_v3_large", out=tmp_path / "m", shards=k, verify=False)
    t = result.topology
    assert len(t.shards) == k
    assert t.input_names == ("input_layer",)
    assert t.output_names == ("predictions",)
    rows = t.extra["plan"]["shards"]
    # the exact planner keeps the slowest shard close to the ideal 1/K on this model
    assert max(r["share"] for r in rows) < 1.0 / k + 0.05
    report = verify_directory(tmp_path / "m", batch_sizes=(1, 2), tolerance=0.0)
    assert report.ok, report.table()
    assert all(r.bitwise for r in report.rows)


def test_plan_balances_for_the_batch_it_will_run(mobilenet, tmp_path: Path) -> None:
    # batched, the early layers (large activations) cost as much per sample as alone and the late ones
    # (weights) less: balanced for batches of 8 (the default, --max-batch), the first shard ends earlier
    loaded = partition(mobilenet, name="m", out=tmp_path / "b8", shards=2, verify=False)
    alone = partition(mobilenet, name="m", out=tmp_path / "b1", shards=2, plan_batch=1, verify=False)
    assert loaded.topology.extra["plan"]["batch"] == 8 and alone.topology.extra["plan"]["batch"] == 1
    ops_8 = loaded.topology.extra["plan"]["shards"][0]["operations"]
    ops_1 = alone.topology.extra["plan"]["shards"][0]["operations"]
    assert ops_8 < ops_1
    assert "balanced for batches of 8" in loaded.table and "balanced for batches of 1" in alone.table


def test_named_cuts_after_non_layer_ops_and_inside_squeeze_excite(mobilenet, tmp_path: Path) -> None:
    # `add` and `multiply` are the keras.ops nodes of hard_sigmoid (x + 3.0, * 1/6) that model.layers
    # does not list; a cut after `add` falls inside the squeeze-excite block: the next shard holds the
    # join (expanded_conv_3_squeeze_excite_mul) without its fork.
    cuts = ["expanded_conv_3_squeeze_excite_conv", "add", "multiply", "expanded_conv_8_add"]
    result = partition(mobilenet, name="mobilenet_v3_large", out=tmp_path / "m", cuts=cuts, verify=False)
    t = result.topology
    assert len(t.shards) == 5
    third = t.shard("shard2")  # holds re_lu_7 and multiply, after `add`
    assert "add:0" in third.inputs
    fourth = t.shard("shard3")
    assert set(fourth.inputs) >= {"multiply:0", "re_lu_6:0"}  # both branches of the join arrive
    report = verify_directory(tmp_path / "m", batch_sizes=(1, 3), tolerance=0.0)
    assert report.ok, report.table()


def test_topology_contract_on_disk(mobilenet, tmp_path: Path) -> None:
    partition(mobilenet, name="mobilenet_v3_large", out=tmp_path / "m", shards=4, verify=False)
    t = topo.load(tmp_path / "m")
    assert [s.name for s in t.shards] == ["shard0", "shard1", "shard2", "shard3"]
    assert t.inputs[0].shape == (-1, 224, 224, 3) and t.inputs[0].dtype == "float32"
    assert t.outputs[0].shape == (-1, 1000)
    import keras

    shard = keras.saving.load_model(t.shard_path("shard1"), safe_mode=True)
    x = {n: np.zeros((1, *t.tensors[n].shape[1:]), t.tensors[n].dtype) for n in t.shard("shard1").inputs}
    out = shard(x)
    assert sorted(out) == sorted(t.shard("shard1").output_names)


def test_the_default_model_answers_differently_for_different_inputs(mobilenet) -> None:
    """weights=None leaves BatchNormalization at 0/1 and every answer at exactly 0.001; calibrated, it depends on the input."""
    from pipeline import oracle
    from pipeline.partition.source import weights_of

    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 224, 224, 3)).astype(np.float32)
    y = np.asarray(mobilenet(x, training=False))
    top3 = [tuple(np.argsort(-row)[:3]) for row in y]
    assert len(set(top3)) == 4, top3
    found = oracle.spread([{"x": x}], [{"y": y}])
    assert found.smallest > 1e-5, found
    record = weights_of(mobilenet)
    assert record["source"] == "keras.applications.MobileNetV3Large" and "46 layers" in record["calibration"]


def test_calibration_is_deterministic(mobilenet) -> None:
    again, _ = load_source("mobilenet_v3_large")
    assert [w.name for w in again.weights] == [w.name for w in mobilenet.weights]
    for a, b in zip(again.weights, mobilenet.weights):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), a.name


def test_the_topology_records_how_the_weights_were_made(mobilenet, tmp_path: Path) -> None:
    from pipeline.partition.show import weights_lines

    result = partition(mobilenet, name="mobilenet_v3_large", out=tmp_path / "m", shards=2)
    assert result.warning is None
    text = (tmp_path / "m" / "topology.yaml").read_text()
    assert "\nweights:\n" in text and "\n  calibration:" in text  # bin/run looks for this line
    lines = weights_lines(result.topology.extra["weights"])
    assert "MobileNetV3Large" in lines and "momentum 0" in lines


def test_verify_fails_when_the_chain_swaps_rows(mobilenet, tmp_path: Path, monkeypatch) -> None:
    """The exactness check can fail: answers routed to the wrong rows are caught."""
    from pipeline.partition import reference

    partition(mobilenet, name="mobilenet_v3_large", out=tmp_path / "m", shards=2, verify=False)
    good = verify_directory(tmp_path / "m", batch_sizes=(3,))
    assert good.ok and good.spread.smallest > 1e-5
    chain = reference.call_chain
    monkeypatch.setattr(reference, "call_chain", lambda t, s, x: {k: v[::-1] for k, v in chain(t, s, x).items()})
    bad = verify_directory(tmp_path / "m", batch_sizes=(3,))
    assert not bad.ok, bad.table()
