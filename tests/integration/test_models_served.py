"""Models people actually have, served: a user's registered layers and Keras masks across cuts.

Real processes: ``pipeline partition`` on the command line, real shard workers
(``pipeline worker``), the real ingress (in a thread of this process), gRPC
requests. The custom layers live in a module in a temporary folder that only
``PYTHONPATH`` points at, as on a host where the user's code is deployed beside
the pipeline. One request at a time, so the workers compute exactly what the
whole model computes: the answers are compared bitwise.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers_ingress import IngressThread, outputs_of, raw_request  # noqa: E402
from helpers_worker import WORKER_START_TIMEOUT_S, WorkerProcess, start_worker, stop_workers, wait_until  # noqa: E402

from pipeline import topology as topo  # noqa: E402
from pipeline.pb import envelope_pb2 as pb  # noqa: E402
from pipeline.pb import grpc_service_pb2 as kpb  # noqa: E402
from pipeline.wire import codec  # noqa: E402
from tests import masked_models as mm  # noqa: E402

pytestmark = pytest.mark.timeout(WORKER_START_TIMEOUT_S + 300)
REPO = Path(__file__).resolve().parents[2]
MODULE = "acme_layers"
MODULE_SOURCE = textwrap.dedent(
    '''
    """A user's own layers, registered for safe-mode loading."""
    import keras


    @keras.saving.register_keras_serializable(package="acme")
    class ScaledTanh(keras.layers.Layer):
        """y = scale * tanh(x @ w), with a learned per-unit scale."""

        def __init__(self, units, **kwargs):
            super().__init__(**kwargs)
            self.units = units

        def build(self, input_shape):
            self.w = self.add_weight(shape=(input_shape[-1], self.units), initializer="glorot_uniform", name="w")
            self.scale = self.add_weight(shape=(self.units,), initializer="ones", name="scale")

        def call(self, inputs):
            return self.scale * keras.ops.tanh(keras.ops.matmul(inputs, self.w))

        def get_config(self):
            return {**super().get_config(), "units": self.units}
    '''
)


def _env(*extra_path: Path) -> dict[str, str]:
    """The environment of a child process: this worktree and ``extra_path`` on PYTHONPATH, no PIPELINE_* vars."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *map(str, extra_path)])
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _cli(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO
    )


def _custom_model(path: Path) -> None:
    import keras

    import acme_layers  # type: ignore[import-not-found]

    keras.backend.clear_session()
    keras.utils.set_random_seed(3)
    x = keras.Input((6,), name="features")
    h = keras.layers.Dense(8, name="dense_in")(x)
    h = acme_layers.ScaledTanh(8, name="scaled_a")(h)
    h = keras.layers.Dense(8, name="dense_mid")(h)
    h = acme_layers.ScaledTanh(4, name="scaled_b")(h)
    keras.Model(x, keras.layers.Dense(3, name="head")(h), name="acme").save(path)


@dataclass
class Served:
    directory: Path
    topology: topo.Topology
    ingress: IngressThread

    def infer(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        with self.ingress.stub() as stub:
            return outputs_of(stub.ModelInfer(raw_request(self.topology.name, inputs), timeout=20))

    def stats(self, shard: str) -> dict[str, float]:
        def read() -> dict[str, float]:
            seen = self.ingress.ingress.processes.get(shard)  # type: ignore[union-attr]
            return dict(seen.heartbeat.stats) if seen is not None else {}

        return self.ingress.in_loop(read)


@dataclass
class Fleet:
    modules: Path
    custom: Served
    masked: Served
    workers: dict[str, WorkerProcess]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("served")
    modules = root / "user_code"
    modules.mkdir()
    (modules / f"{MODULE}.py").write_text(MODULE_SOURCE)
    sys.path.insert(0, str(modules))  # this process computes the reference answers
    _custom_model(root / "acme.keras")
    custom_dir = root / "acme_topology"
    done = _cli(
        ["partition", str(root / "acme.keras"), "--import", MODULE, "--cut", "dense_mid", "--out", str(custom_dir)],
        _env(modules),
    )
    assert done.returncode == 0, done.stderr
    from pipeline.partition.command import partition

    masked_dir = root / "masked_topology"
    partition(mm.lstm_stack(), name="lstm_stack", out=masked_dir, cuts=["project", "lstm_a"])
    custom_t, masked_t = topo.load(custom_dir), topo.load(masked_dir)
    workers: dict[str, WorkerProcess] = {}
    ingresses: list[IngressThread] = []
    try:
        for t in (custom_t, masked_t):
            for shard in t.shards:
                workers[f"{t.name}/{shard.name}"] = start_worker(
                    t.directory, shard.name, root, env={"PYTHONPATH": os.pathsep.join([str(REPO), str(modules)])}
                )
        for t in (custom_t, masked_t):
            ingress = IngressThread(t)
            ingress.__enter__()
            ingresses.append(ingress)
            with ingress.stub() as stub:
                wait_until(
                    lambda: stub.ServerReady(kpb.ServerReadyRequest(), timeout=2).ready
                    or any(w.proc.poll() is not None for w in workers.values()),
                    WORKER_START_TIMEOUT_S,
                    f"{t.name} to be ready",
                    interval_s=0.2,
                )
        for name, w in workers.items():
            assert w.proc.poll() is None, f"{name}:\n{w.tail()}"
        yield Fleet(modules, Served(custom_dir, custom_t, ingresses[0]), Served(masked_dir, masked_t, ingresses[1]), workers)
    finally:
        for ingress in ingresses:
            ingress.__exit__(None, None, None)
        stop_workers(list(workers.values()))
        sys.path.remove(str(modules))


# --------------------------------------------------------------- custom layers
def test_partition_records_the_import(fleet: Fleet) -> None:
    data = yaml.safe_load((fleet.custom.directory / topo.TOPOLOGY_FILE).read_text())
    assert data["imports"] == [MODULE]
    assert fleet.custom.topology.imports == (MODULE,)
    classes = set()
    for shard in fleet.custom.topology.shards:
        config = _keras_config(fleet.custom.directory / shard.file)
        classes |= {layer.get("registered_name") for layer in config["config"]["layers"]}
    assert "acme>ScaledTanh" in classes


def _keras_config(path: Path) -> Any:
    import json
    import zipfile

    with zipfile.ZipFile(path) as archive:
        return json.loads(archive.read("config.json"))


def test_a_custom_layer_model_served_through_the_ingress(fleet: Fleet) -> None:
    from pipeline.partition.reference import call_whole
    from pipeline.partition.source import load_keras_file

    whole = load_keras_file(fleet.custom.topology.model_path, imports=(MODULE,))  # safe mode
    rng = np.random.default_rng(0)
    answers = []
    for batch in (1, 3, 2):
        x = rng.standard_normal((batch, 6)).astype(np.float32)
        expected = call_whole(whole, {"features": x})["head"]
        got = fleet.custom.infer({"features": x})["head"]
        assert got.dtype == expected.dtype and got.shape == expected.shape
        assert got.tobytes() == expected.tobytes(), np.abs(got - expected).max()
        answers.append(got)
    assert np.abs(answers[0][0] - answers[1][0]).max() > 1e-2  # different inputs, different answers


def test_registered_layers_load_in_safe_mode_and_lambda_still_needs_unsafe(fleet: Fleet, tmp_path: Path) -> None:
    import keras

    from pipeline.errors import UsageError
    from pipeline.partition.source import load_keras_file

    for shard in fleet.custom.topology.shards:
        load_keras_file(fleet.custom.topology.shard_path(shard.name), imports=(MODULE,))
    x = keras.Input((3,), name="x")
    keras.Model(x, keras.layers.Lambda(lambda t: t * 2.0, name="double")(x)).save(tmp_path / "lambda.keras")
    with pytest.raises(UsageError, match="--unsafe"):
        load_keras_file(tmp_path / "lambda.keras", imports=(MODULE,))


# ---------------------------------------------------------------------- masks
def test_a_masked_model_served_through_the_ingress(fleet: Fleet) -> None:
    from pipeline.partition.reference import call_whole
    from pipeline.partition.source import load_keras_file

    t = fleet.masked.topology
    assert set(t.masks) == {"project:0:mask", "lstm_a:0:mask"}
    whole = load_keras_file(t.model_path)
    plain = mm.lstm_stack(masked=False)
    for batch in (1, 5, 3):
        tokens = mm.padded_tokens(batch, seed=batch)
        expected = call_whole(whole, {"tokens": tokens})["head"]
        got = fleet.masked.infer({"tokens": tokens})["head"]
        assert got.tobytes() == expected.tobytes(), np.abs(got - expected).max()
        if batch > 1:  # the padded rows answer differently without the mask: the comparison can fail
            unmasked = np.asarray(plain(tokens))
            assert (np.abs(unmasked[1:] - got[1:]).max(axis=1) > 1e-4).all()


def test_a_malformed_mask_frame_is_dropped_and_counted_and_the_worker_serves_on(fleet: Fleet) -> None:
    t = fleet.masked.topology
    target = t.shards[1]
    assert {"project:0", "project:0:mask"} <= set(target.inputs)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 5_000)
    try:
        sock.connect(target.endpoint)
        before = fleet.masked.stats(target.name).get("dropped.bad_mask", 0)
        bad = {"project:0": np.zeros((2, mm.STEPS, 8), np.float32), "project:0:mask": np.ones((2, mm.STEPS), np.float32)}
        short = {"project:0": np.zeros((2, mm.STEPS, 8), np.float32), "project:0:mask": np.ones((2, mm.STEPS - 1), bool)}
        for rid, tensors in ((990_001, bad), (990_002, short)):
            env = pb.Envelope(kind=pb.REQUEST, request_id=rid, model=t.name, sender=t.shards[0].name)
            codec.send(sock, env, tensors)
        wait_until(
            lambda: fleet.masked.stats(target.name).get("dropped.bad_mask", 0) >= before + 2,
            15,
            "the worker to count two bad_mask drops",
            interval_s=0.1,
        )
    finally:
        sock.close(linger=0)
        ctx.term()
    worker = fleet.workers[f"{t.name}/{target.name}"]
    assert worker.proc.poll() is None
    assert "bad_mask" in worker.text() and "expected dtype bool, received float32" in worker.text()
    tokens = mm.padded_tokens(2)
    assert fleet.masked.infer({"tokens": tokens})["head"].shape == (2, 3)


# --------------------------------------------------------------------- errors
def test_partition_import_of_a_missing_module(tmp_path: Path) -> None:
    out = tmp_path / "never"
    done = _cli(["partition", "mobilenet_v3_small", "--import", "no_such_module_q7", "--shards", "2", "--out", str(out)], _env())
    assert done.returncode == 2, done.stderr
    assert "no_such_module_q7" in done.stderr and "ModuleNotFoundError" in done.stderr and "--import" in done.stderr
    assert "PYTHONPATH" in done.stderr
    assert not out.exists() and not list(tmp_path.iterdir())
    done = _cli(["partition", "x.keras", "--import", "not a module", "--shards", "2"], _env())
    assert done.returncode == 2 and "expected a Python module name" in done.stderr


def test_a_worker_without_the_module_fails_before_binding(fleet: Fleet, tmp_path: Path) -> None:
    """The module is not on this worker's path: a clear error naming it and the shard, exit code 2, and no socket:
    the shard's own port is held here, so a worker that bound first would fail with 'Address already in use'."""
    from pipeline.launch import free_ports

    directory = tmp_path / "copy"
    shutil.copytree(fleet.custom.directory, directory)
    port, metrics_port = free_ports(2, "127.0.0.1")  # the fleet's own workers hold the recorded ones
    data = yaml.safe_load((directory / topo.TOPOLOGY_FILE).read_text())
    data["shards"][1].update(endpoint=f"tcp://127.0.0.1:{port}", bind=f"tcp://127.0.0.1:{port}", metrics=f"127.0.0.1:{metrics_port}")
    (directory / topo.TOPOLOGY_FILE).write_text(topo.dump_yaml(data))
    shard = topo.load(directory).shards[1]
    held = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2)]
    try:
        for s, p in zip(held, (port, metrics_port)):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", p))
            s.listen(1)
        done = subprocess.run(
            [sys.executable, "-m", "pipeline.cli", "worker", str(directory), "--shard", shard.name],
            env=_env(),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tempfile.gettempdir(),
        )
    finally:
        for s in held:
            s.close()
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"shard {shard.name!r} needs the Python module {MODULE!r}" in done.stderr
    assert "ModuleNotFoundError" in done.stderr and "PYTHONPATH" in done.stderr
    assert "Address already in use" not in done.stdout + done.stderr
    assert "worker_listening" not in done.stdout + done.stderr


def test_verify_without_the_module_names_it(fleet: Fleet) -> None:
    done = _cli(["verify", str(fleet.custom.directory), "--batch-sizes", "1"], _env())
    assert done.returncode == 2
    assert f"the whole model (model.keras) needs the Python module {MODULE!r}" in done.stderr
    done = _cli(["verify", str(fleet.custom.directory), "--batch-sizes", "1,3"], _env(fleet.modules))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "OK: the shards reproduce the whole model" in done.stdout
