"""`pipeline partition`, `verify` and `show` as a user runs them, including every bad input:
a one-paragraph error naming what was expected and what was received, exit status 2, no output."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests import models

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def pipeline(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, timeout=timeout, env=ENV
    )


@pytest.fixture(scope="module")
def residual_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("models") / "residual.keras"
    models.residual().save(path)
    return path


def test_partition_verify_show(residual_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "topo"
    r = pipeline("partition", str(residual_file), "--shards", "3", "--out", str(out))
    assert r.returncode == 0, r.stderr
    assert "slowest shard" in r.stdout and "shard2" in r.stdout
    data = yaml.safe_load((out / "topology.yaml").read_text())
    assert data["name"] == "residual" and len(data["shards"]) == 3
    assert not list(tmp_path.glob(".topo.partial-*")), "temporary directory left behind"

    v = pipeline("verify", str(out), "--batch-sizes", "1,4")
    assert v.returncode == 0, v.stderr
    assert "OK" in v.stdout and "NO" not in v.stdout

    dot = pipeline("show", str(out), "--format", "dot")
    assert dot.returncode == 0 and dot.stdout.startswith('digraph "residual"')
    assert '"shard0" -> "shard1"' in dot.stdout
    mer = pipeline("show", str(out), "--format", "mermaid")
    assert mer.returncode == 0 and mer.stdout.startswith("flowchart LR")
    table = pipeline("show", str(out))
    assert "compute" in table.stdout and "shard1" in table.stdout
    assert "costs: the estimate from FLOPs and bytes (pipeline partition --measure corrects it" in table.stdout


def test_verify_fails_when_a_shard_is_wrong(residual_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "topo"
    assert pipeline("partition", str(residual_file), "--cut", "relu_a", "--out", str(out), "--no-verify").returncode == 0
    # replace the second shard's file with one whose weights differ
    import keras

    shard = keras.saving.load_model(out / "shard1.keras")
    for w in shard.weights:
        w.assign(w.numpy() + 0.01)
    shard.save(out / "shard1.keras")
    v = pipeline("verify", str(out))
    assert v.returncode == 1
    assert "FAILED" in v.stdout
    # a tolerance wider than the outputs of different inputs are apart cannot tell right from wrong: refused
    loose = pipeline("verify", str(out), "--tolerance", "10")
    _assert_usage_error(loose, "the reference outputs do not depend on the input")
    allowed = pipeline("verify", str(out), "--tolerance", "10", "--allow-input-independent")
    assert allowed.returncode == 0 and "WARNING: the reference outputs do not depend on the input" in allowed.stdout
    good = pipeline("verify", str(out), "--tolerance", "1e-6")
    assert good.returncode == 1 and "a wrong answer would show" in good.stdout


def _assert_usage_error(r: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr)


def test_not_a_keras_file(tmp_path: Path) -> None:
    bad = tmp_path / "notes.keras"
    bad.write_text("this is not a model")
    out = tmp_path / "out"
    _assert_usage_error(pipeline("partition", str(bad), "--shards", "2", "--out", str(out)), "not a Keras model file", "expected")
    assert not out.exists()


def test_lambda_layer_needs_unsafe(tmp_path: Path) -> None:
    import keras

    x = keras.Input((4,), name="x")
    y = keras.layers.Lambda(lambda t: t * 2.0, name="double")(x)
    y = keras.layers.Dense(3, name="d")(y)
    path = tmp_path / "lambda.keras"
    keras.Model(x, y).save(path)
    out = tmp_path / "out"
    _assert_usage_error(pipeline("partition", str(path), "--shards", "2", "--out", str(out)), "Lambda", "--unsafe")
    assert not out.exists()
    ok = pipeline("partition", str(path), "--shards", "2", "--out", str(out), "--unsafe")
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load((out / "topology.yaml").read_text())["unsafe"] is True
    assert pipeline("verify", str(out)).returncode == 0


def test_shard_count_out_of_range(residual_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    _assert_usage_error(pipeline("partition", str(residual_file), "--shards", "0", "--out", str(out)), "at least 1", "received 0")
    _assert_usage_error(pipeline("partition", str(residual_file), "--shards", "50", "--out", str(out)), "--shards 50", "between 1 and")
    _assert_usage_error(pipeline("partition", str(residual_file), "--shards", "2", "--plan-batch", "0", "--out", str(out)), "--plan-batch", "received 0")
    assert not out.exists()


def test_unknown_cut_lists_closest_names(residual_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    r = pipeline("partition", str(residual_file), "--cut", "conv_c", "--out", str(out))
    _assert_usage_error(r, "'conv_c'", "closest names", "conv_a")
    assert not out.exists()


def test_unknown_application_name(tmp_path: Path) -> None:
    r = pipeline("partition", "mobilenet_v9", "--shards", "2", "--out", str(tmp_path / "o"))
    _assert_usage_error(r, "mobilenet_v9", "keras.applications")


def test_subclassed_model_is_explained() -> None:
    import keras

    from pipeline.errors import PartitionError
    from pipeline.partition.graph import build_graph

    class Net(keras.Model):
        def __init__(self) -> None:
            super().__init__()
            self.d = keras.layers.Dense(2)

        def call(self, x):
            return self.d(x)

    net = Net()
    net(keras.ops.zeros((1, 3)))
    with pytest.raises(PartitionError, match="subclassed") as info:
        build_graph(net)
    assert "functional API" in str(info.value)


def test_cycle_in_a_hand_edited_topology_is_refused(residual_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "topo"
    assert pipeline("partition", str(residual_file), "--shards", "3", "--out", str(out), "--no-verify").returncode == 0
    data = yaml.safe_load((out / "topology.yaml").read_text())
    data["shards"] = list(reversed(data["shards"]))  # consumers before producers: a cycle in list order
    (out / "topology.yaml").write_text(yaml.safe_dump(data))
    r = pipeline("verify", str(out))
    _assert_usage_error(r, "topological order")


def test_existing_output_needs_force(residual_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "topo"
    out.mkdir()
    _assert_usage_error(pipeline("partition", str(residual_file), "--shards", "2", "--out", str(out)), "already exists", "--force")
    r = pipeline("partition", str(residual_file), "--shards", "2", "--out", str(out), "--force")
    assert r.returncode == 0 and (out / "topology.yaml").is_file()
