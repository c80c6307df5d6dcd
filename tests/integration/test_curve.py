"""CurveZMQ on every link: real shard workers and the real ingress, keys made by ``pipeline keys``.

A two-shard chain ``x -> s1 (a = 2x + 1) -> s2 (y = 3a) -> ingress``. Shard
``s2`` reads its secret from a folder of its own (``PIPELINE_KEYS_DIR``), as
on a host that holds only its own key. Intruders try PUSH sockets without
CURVE, with a key nobody knows, and with real keys of processes that do not
feed the target: none gets a message read, and the pipeline still answers.
"""

from __future__ import annotations

import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers_ingress import IngressThread, outputs_of, raw_request  # noqa: E402
from helpers_worker import WORKER_START_TIMEOUT_S, WorkerProcess, start_worker, stop_workers, wait_until  # noqa: E402

from pipeline import cli  # noqa: E402
from pipeline import topology as topo  # noqa: E402
from pipeline.errors import TopologyError, UsageError  # noqa: E402
from pipeline.pb import envelope_pb2 as pb  # noqa: E402
from pipeline.pb import grpc_service_pb2 as kpb  # noqa: E402
from pipeline.topology import INGRESS, Batching, IngressSpec, ShardOutput, ShardSpec, TensorSpec, Topology  # noqa: E402
from pipeline.wire import codec, security  # noqa: E402

pytestmark = pytest.mark.timeout(WORKER_START_TIMEOUT_S + 120)
HEARTBEAT_S = 0.2
ROGUE_WAIT_S = 10.0


def build_chain(directory: Path, sockets: Path) -> Topology:
    import keras

    def rescale(in_name: str, out_name: str, scale: float, offset: float, file: str) -> None:
        inp = keras.Input(shape=(4,), name=in_name)
        keras.Model({in_name: inp}, {out_name: keras.layers.Rescaling(scale, offset=offset)(inp)}).save(directory / file)

    rescale("x", "a", 2.0, 1.0, "s1.keras")
    rescale("a", "y", 3.0, 0.0, "s2.keras")
    specs = {n: TensorSpec(n, "float32", (-1, 4)) for n in ("x", "a", "y")}

    def shard(name: str, inputs: tuple[str, ...], outputs: dict[str, tuple[str, ...]]) -> ShardSpec:
        endpoint = f"ipc://{sockets}/{name}"
        return ShardSpec(
            name, f"{name}.keras", inputs, tuple(ShardOutput(o, c) for o, c in outputs.items()), endpoint, "127.0.0.1", endpoint,
            batching=Batching(max_batch=4, max_delay_ms=0.5),
        )

    results = f"ipc://{sockets}/ingress"
    t = Topology(
        name="chain",
        inputs=(specs["x"],),
        outputs=(specs["y"],),
        tensors=specs,
        shards=(shard("s1", ("x",), {"a": ("s2",)}), shard("s2", ("a",), {"y": (INGRESS,)})),
        ingress=IngressSpec(grpc="127.0.0.1:0", results=results, host="127.0.0.1", bind=results),
        directory=directory,
        heartbeat_interval_s=HEARTBEAT_S,
    )
    t.write(directory)
    return t


@dataclass
class Secured:
    topology: Topology
    directory: Path
    ingress: IngressThread
    workers: dict[str, WorkerProcess]
    ctx: zmq.Context

    def stats(self, shard: str) -> dict[str, float]:
        def read() -> dict[str, float]:
            seen = self.ingress.ingress.processes.get(shard)  # type: ignore[union-attr]
            return dict(seen.heartbeat.stats) if seen is not None else {}

        return self.ingress.in_loop(read)

    def fresh_stats(self, shard: str) -> dict[str, float]:
        """Stats from a heartbeat sent after this call (two beats later, so nothing in flight is missed)."""

        def count() -> int:
            seen = self.ingress.ingress.processes.get(shard)  # type: ignore[union-attr]
            return seen.count if seen is not None else 0

        start = self.ingress.in_loop(count)
        wait_until(lambda: self.ingress.in_loop(count) >= start + 2, 5.0, f"two heartbeats from {shard}")
        return self.stats(shard)

    def infer(self, x: np.ndarray) -> np.ndarray:
        with self.ingress.stub() as stub:
            response = stub.ModelInfer(raw_request("chain", {"x": x}), timeout=10)
        return outputs_of(response)["y"]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Secured]:
    directory = tmp_path_factory.mktemp("curve") / "chain"
    directory.mkdir()
    sockdir = Path(tempfile.mkdtemp(prefix="pc-", dir="/tmp"))
    build_chain(directory, sockdir)
    assert cli.main(["keys", str(directory)]) == 0
    own = directory.parent / "host-of-s2"  # s2's host holds s2's secret only
    own.mkdir(mode=0o700)
    shutil.move(str(directory / "keys" / "s2.key_secret"), own / "s2.key_secret")
    topology = topo.load(directory)
    workers: dict[str, WorkerProcess] = {}
    ctx = zmq.Context()
    ingress = IngressThread(topology)
    entered = False
    try:
        workers["s1"] = start_worker(directory, "s1", directory.parent)
        workers["s2"] = start_worker(directory, "s2", directory.parent, env={"PIPELINE_KEYS_DIR": str(own)})
        ingress.__enter__()
        entered = True
        with ingress.stub() as stub:
            wait_until(
                lambda: stub.ServerReady(kpb.ServerReadyRequest(), timeout=2).ready
                or any(w.proc.poll() is not None for w in workers.values()),
                WORKER_START_TIMEOUT_S,
                "the encrypted pipeline to be ready",
                interval_s=0.2,
            )
        for w in workers.values():
            assert w.proc.poll() is None, w.tail()
        yield Secured(topology, directory, ingress, workers, ctx)
    finally:
        if entered:
            ingress.__exit__(None, None, None)
        stop_workers(list(workers.values()))
        ctx.destroy(linger=0)
        shutil.rmtree(sockdir, ignore_errors=True)


# ------------------------------------------------------------------ the keys
def test_pipeline_keys_writes_private_keys_0600_and_public_keys_into_the_topology(secured: Secured) -> None:
    data = yaml.safe_load((secured.directory / topo.TOPOLOGY_FILE).read_text())
    assert data["security"] == "curve"
    publics = [data["ingress"]["curve_public_key"]] + [s["curve_public_key"] for s in data["shards"]]
    assert len(set(publics)) == 3 and all(security.is_key(k) for k in publics)
    keys_dir = secured.directory / "keys"
    assert stat.S_IMODE(keys_dir.stat().st_mode) == 0o700
    for process in ("ingress", "s1"):
        path = keys_dir / f"{process}.key_secret"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert security.read_secret(keys_dir, process).public.decode() == security.public_keys(secured.topology)[process]
    assert "secret-key" not in (secured.directory / topo.TOPOLOGY_FILE).read_text()


def test_the_encrypted_pipeline_answers_correctly(secured: Secured) -> None:
    for batch in (1, 3):
        x = np.arange(batch * 4, dtype=np.float32).reshape(batch, 4) - 2
        np.testing.assert_allclose(secured.infer(x), 3 * (2 * x + 1), rtol=1e-6)


def _intruder(ctx: zmq.Context, endpoint: str, pair: security.KeyPair | None, server_key: str | None) -> zmq.Socket:
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, 0)
    if pair is not None:
        sock.curve_secretkey = pair.secret
        sock.curve_publickey = pair.public
        sock.curve_serverkey = (server_key or "").encode()
    sock.connect(endpoint)
    return sock


def _forged(kind: int, rid: int, sender: str, tensors: dict[str, np.ndarray]) -> list[object]:
    env = pb.Envelope(kind=kind, request_id=rid, model="chain", sender=sender, budget_ns=60_000_000_000)
    return codec.encode(env, tensors)


def test_pushes_without_allowed_keys_get_no_message_processed(secured: Secured) -> None:
    t = secured.topology
    publics = security.public_keys(t)
    keys_dir = secured.directory / "keys"
    s2_pair = security.read_secret(secured.directory.parent / "host-of-s2", "s2")
    ingress_pair = security.read_secret(keys_dir, "ingress")
    x = np.ones((1, 4), np.float32)
    before = {s: secured.fresh_stats(s) for s in ("s1", "s2")}
    ignored_before = secured.ingress.in_loop(lambda: secured.ingress.ingress.table.ignored["unknown_request"])
    attempts = {
        # target, intruder keys, the server key it uses, the message
        "no CURVE at all -> s1": ("s1", None, None, _forged(pb.REQUEST, 9001, "ingress", {"x": x})),
        "unknown key -> s1": ("s1", security.generate(), publics["s1"], _forged(pb.REQUEST, 9002, "ingress", {"x": x})),
        "s2's real key -> s1 (s2 does not feed s1)": ("s1", s2_pair, publics["s1"], _forged(pb.REQUEST, 9003, "ingress", {"x": x})),
        "the ingress's real key -> s2 (it feeds s1 only)": ("s2", ingress_pair, publics["s2"], _forged(pb.REQUEST, 9004, "s1", {"a": x})),
        "unknown key -> ingress (a forged result)": (INGRESS, security.generate(), publics[INGRESS], _forged(pb.RESULT, 9005, "s2", {"y": x})),
        "no CURVE at all -> ingress": (INGRESS, None, None, _forged(pb.RESULT, 9006, "s2", {"y": x})),
    }
    socks = []
    try:
        for target, pair, server_key, frames in attempts.values():
            sock = _intruder(secured.ctx, t.endpoint_of(target), pair, server_key)
            socks.append(sock)
            try:
                sock.send_multipart(frames, copy=False)  # queued while it tries to connect, never delivered
            except zmq.Again:
                pass
        # the ZAP handlers refuse the keyed intruders (counted, and shown in the heartbeats)
        wait_until(lambda: secured.stats("s1").get("dropped.unauthorized", 0) >= 2, ROGUE_WAIT_S, "s1 to refuse two keys")
        wait_until(lambda: secured.stats("s2").get("dropped.unauthorized", 0) >= 1, ROGUE_WAIT_S, "s2 to refuse the ingress key")
        wait_until(
            lambda: secured.ingress.in_loop(lambda: secured.ingress.ingress.drops.snapshot().get("unauthorized", 0)) >= 1,
            ROGUE_WAIT_S,
            "the ingress to refuse the unknown key",
        )
        time.sleep(1.0)  # give the unkeyed sockets time to fail their handshakes too
        for shard in ("s1", "s2"):
            after = secured.fresh_stats(shard)
            assert after["messages_in"] == before[shard]["messages_in"], (shard, before[shard], after)
        assert secured.ingress.in_loop(lambda: secured.ingress.ingress.table.ignored["unknown_request"]) == ignored_before
    finally:
        for sock in socks:
            sock.close(linger=0)
    # and the pipeline is still up and right
    x = np.full((2, 4), 0.5, np.float32)
    np.testing.assert_allclose(secured.infer(x), 3 * (2 * x + 1), rtol=1e-6)
    for w in secured.workers.values():
        assert w.proc.poll() is None, w.tail()


# -------------------------------------------------------------- bad key set-ups
def test_bad_key_setups_stop_a_process_at_start_with_a_clear_error(secured: Secured, tmp_path: Path) -> None:
    from pipeline.serving.worker import Worker, WorkerConfig

    directory = tmp_path / "copy"
    shutil.copytree(secured.directory, directory, ignore=shutil.ignore_patterns("*.keras"))
    t = topo.load(directory, check_files=False)
    keys_dir = directory / "keys"
    with pytest.raises(UsageError, match="no secret key for 's2'"):
        security.load_setup(t, "s2")  # its secret is on "another host"
    (keys_dir / "s1.key_secret").chmod(0o644)
    with pytest.raises(UsageError, match="chmod 600"):
        security.load_setup(t, "s1")
    (keys_dir / "s1.key_secret").chmod(0o600)
    security.write_secret(keys_dir, "s1", security.generate())  # a key the topology does not know
    with pytest.raises(UsageError, match="do not belong together"):
        security.load_setup(t, "s1")
    config = WorkerConfig(directory=directory, shard="s1", bind=f"ipc://{tmp_path}/s1-copy")
    with pytest.raises(UsageError, match="do not belong together"):
        Worker(config, t, ctx=secured.ctx).serve()  # refuses before it binds or loads anything
    no_key = security.with_public_keys(t, {"s2": ""})
    with pytest.raises(TopologyError, match="'s2' has no curve_public_key"):
        security.check_topology(no_key)
    assert security.load_setup(t.replace(security="none"), "s1") is None


def test_pipeline_keys_keeps_existing_keys_unless_forced(tmp_path: Path, secured: Secured) -> None:
    directory = tmp_path / "again"
    shutil.copytree(secured.directory, directory, ignore=shutil.ignore_patterns("*.keras"))
    (directory / "s2.keras").write_bytes(b"")
    (directory / "s1.keras").write_bytes(b"")
    shutil.copy(secured.directory.parent / "host-of-s2" / "s2.key_secret", directory / "keys" / "s2.key_secret")
    before = security.public_keys(topo.load(directory))
    assert cli.main(["keys", str(directory)]) == 0
    assert security.public_keys(topo.load(directory)) == before
    assert cli.main(["keys", str(directory), "--force"]) == 0
    after = security.public_keys(topo.load(directory))
    assert all(after[p] != before[p] for p in before)


# ------------------------------------------------------------------ the bench
def test_curve_hop_bench_measures_both_kinds_of_hop() -> None:
    result = security.bench_curve(nbytes=64 << 10, hops=20)
    assert result["plain_ms"] > 0 and result["curve_ms"] > 0 and result["hops"] == 20
    assert result["ratio"] == pytest.approx(result["curve_ms"] / result["plain_ms"], rel=1e-2)
