"""Co-located shards (issue 15): real processes, real sockets, the real ingress.

- MobileNetV3Large in 4 shards in ONE worker process (``pipeline partition --colocate``): answers through the
  ingress bitwise one at a time and within the batching tolerance under load; each shard has its own metrics
  endpoint and heartbeats, all from one pid; a short soak; SIGKILL of the process takes all four shards down
  (each reported down by the ingress, requests fail with a status, none hangs) and a restart heals it.
- The join topology (``tests.models.inception`` in 3 shards) with CURVE and a mix of links: the ingress, shard0
  and the join shard2 share a process (``ingress: true``; inproc, no CURVE), shard1 runs alone (tcp + CURVE into
  shard2 and into the ingress's results socket), bitwise at concurrency 1 and within tolerance under load.
- A process that serves the ingress and two tiny shards: answers exact, SIGTERM drains the ingress then the
  shards, a taken gRPC port fails it before any shard loads.

The references come from ``pipeline record`` with the workers' thread count (``--threads 2``, the pool the
process's shards share), which makes one-at-a-time answers bitwise comparable.
"""

from __future__ import annotations

import signal
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers_pipeline import processes, record, serving, server_ready, settled_stat, wait  # noqa: E402
from soak.helpers_soak import check, join_topology, pipeline  # noqa: E402

from answers import mismatches  # noqa: E402
from pipeline import colocation  # noqa: E402
from pipeline import topology as topo  # noqa: E402
from pipeline.launch import Cluster, free_ports, relocate  # noqa: E402
from pipeline.pb import grpc_service_pb2_grpc as kpb_grpc  # noqa: E402
from pipeline.serving import kserve  # noqa: E402
from pipeline.soak import replay  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
THREADS = "2"  # the process's intra-op pool, shared by its shards; the references use the same
START_S = 300.0
WAIT_S = 30.0


# ------------------------------------------------------------------ MobileNetV3Large, 4 shards, 1 process
@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[topo.Topology, Cluster, list[replay.Replay]]]:
    root = tmp_path_factory.mktemp("coloc")
    check(pipeline("partition", "mobilenet_v3_large", "--shards", "4", "--colocate", "--out", str(root / "source"), "--no-verify"))
    t = relocate(root / "source", root / "run")
    assert [(p.name, p.shards) for p in t.processes] == [("workers", ("shard0", "shard1", "shard2", "shard3"))]
    files = [record(t.directory, root / f"r{b}.npz", count=8, batch=b, seed=b, threads=THREADS) for b in (1, 2)]
    assert sorted(Cluster(t, root / "logs", common_worker_args=["--threads", THREADS]).command("workers")[3:]) == sorted(
        ["worker", str(t.directory), "--process", "workers", "--threads", THREADS]
    )
    with serving(t, root / "logs", threads=THREADS, start_s=START_S) as cluster:
        yield t, cluster, files


def test_one_process_serves_four_shards_bitwise_and_under_load(mobilenet) -> None:  # type: ignore[no-untyped-def]
    t, cluster, files = mobilenet
    assert set(cluster.procs) == {"ingress", "workers"}
    inputs = [q.inputs for f in files for q in f.requests]
    references = [q.outputs for f in files for q in f.requests]
    assert mismatches(cluster.target, t.name, inputs, references, tolerance=0.0, concurrency=1) == []
    tolerance = files[0].tolerance
    assert tolerance is not None and 0 < tolerance < 1e-6, tolerance
    assert mismatches(cluster.target, t.name, inputs * 4, references * 4, tolerance=tolerance, concurrency=16) == []


def test_each_shard_reports_itself_from_the_one_process(mobilenet) -> None:  # type: ignore[no-untyped-def]
    from prometheus_client.parser import text_string_to_metric_families

    t, cluster, _ = mobilenet
    pid = cluster.procs["workers"].pid
    procs = processes(cluster.target)
    shards = [s.name for s in t.shards]
    for name in shards:
        assert procs[name].up and procs[name].ready, procs[name]
        assert procs[name].pid == pid  # one process, four heartbeats
        assert procs[name].metrics == t.shard(name).metrics
    for name in shards:
        with urllib.request.urlopen(f"http://{t.shard(name).metrics}/metrics", timeout=10) as r:
            text = r.read().decode()
        counts = {
            tuple(sorted(s.labels.items())): s.value
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "pipeline_shard_compute_duration_seconds_count"
        }
        assert counts == {(("shard", name),): pytest.approx(counts[(("shard", name),)])}  # only its own shard
        assert counts[(("shard", name),)] > 0, f"{name} computed nothing according to its metrics"
    # the links inside the process are inproc: their hops are measured by the receiver like any other
    with urllib.request.urlopen(f"http://{t.shard('shard2').metrics}/metrics", timeout=10) as r:
        assert 'pipeline_hop_duration_seconds_count{dst="shard2",src="shard1"}' in r.read().decode()


def test_a_short_soak_through_the_shared_process(mobilenet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    t, cluster, files = mobilenet
    out = check(
        pipeline(
            "soak", "--target", cluster.target, "--replay", str(files_path(t)),
            "--duration", "20", "--concurrency", "8", "--report", str(tmp_path / "soak.json"), "--no-progress",
            timeout_s=300,
        )
    )  # fmt: skip
    import json

    report = json.loads((tmp_path / "soak.json").read_text())
    totals = report["totals"]
    assert totals["wrong"] == 0 and totals["lost"] == 0 and totals["correct"] > 0, out.stdout[-2000:]


def files_path(t: topo.Topology) -> Path:
    """The single-sample replay recorded by the fixture (beside the run directory)."""
    return t.directory.parent / "r1.npz"


def test_killing_the_process_takes_down_all_its_shards_and_a_restart_heals(mobilenet) -> None:  # type: ignore[no-untyped-def]
    t, cluster, files = mobilenet
    shards = [s.name for s in t.shards]
    old_pid = cluster.procs["workers"].pid
    cluster.stop_process("workers", signal.SIGKILL)
    down = wait(lambda: (lambda p: p if all(not p[n].up for n in shards) else None)(processes(cluster.target)), "every shard reported down", WAIT_S)
    assert {n: down[n].up for n in shards} == dict.fromkeys(shards, False)
    assert not server_ready(cluster.target)
    with grpc.insecure_channel(cluster.target) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(kserve.infer_request(t.name, files[0].requests[0].inputs), timeout=20)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
    cluster.start_process("workers")
    cluster.wait_ready(START_S)
    procs = processes(cluster.target)
    assert all(procs[n].up and procs[n].pid != old_pid and procs[n].restarts >= 1 for n in shards), procs
    inputs = [q.inputs for q in files[0].requests]
    references = [q.outputs for q in files[0].requests]
    assert mismatches(cluster.target, t.name, inputs, references, tolerance=0.0, concurrency=1) == []


# ------------------------------------------------------------------ a join, CURVE, inproc and tcp links mixed
@pytest.fixture(scope="module")
def curve_join(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[topo.Topology, Cluster, list[replay.Replay]]]:
    root = tmp_path_factory.mktemp("coloc-join")
    source = join_topology(root / "source")
    t = relocate(source, root / "run")
    assert set(t.producers("shard2")) == {"ingress", "shard0", "shard1"}  # a join of three producers
    t = t.replace(processes=(topo.ProcessSpec("mixed", ("shard0", "shard2"), ingress=True),))
    t.write()
    check(pipeline("keys", str(t.directory)))
    t = topo.load(t.directory)
    assert t.security == "curve"
    # the ingress serves from "mixed" too: shard2 takes the parts of shard0 and the ingress over inproc and
    # shard1's over tcp (CURVE); the ingress takes shard2's results over inproc and shard1's heartbeats over tcp
    assert colocation.binds(t, "shard2") == colocation.Binds(tcp=t.shard("shard2").bind, inproc="inproc://shard/shard2")
    assert colocation.link_endpoint(t, "shard0", "shard2") == "inproc://shard/shard2"
    assert colocation.link_endpoint(t, "ingress", "shard2") == "inproc://shard/shard2"
    assert colocation.link_endpoint(t, "shard1", "shard2") == t.shard("shard2").endpoint
    assert colocation.ingress_binds(t, t.ingress.bind) == colocation.Binds(tcp=t.ingress.bind, inproc="inproc://shard/ingress")
    files = [record(t.directory, root / f"j{b}.npz", count=12, batch=b, seed=10 + b, threads=THREADS) for b in (1, 3)]
    with serving(t, root / "logs", threads=THREADS, start_s=START_S) as cluster:
        yield t, cluster, files


def test_a_join_with_curve_and_inproc_links_answers_right(curve_join) -> None:  # type: ignore[no-untyped-def]
    t, cluster, files = curve_join
    assert set(cluster.procs) == {"mixed", "shard1"}
    inputs = [q.inputs for f in files for q in f.requests]
    references = [q.outputs for f in files for q in f.requests]
    assert mismatches(cluster.target, t.name, inputs, references, tolerance=0.0, concurrency=1) == []
    tolerance = max(f.tolerance or 0.0 for f in files) or 1e-6
    assert mismatches(cluster.target, t.name, inputs * 5, references * 5, tolerance=tolerance, concurrency=12) == []
    procs = processes(cluster.target)
    assert procs["ingress"].pid == procs["shard0"].pid == procs["shard2"].pid != procs["shard1"].pid
    log = cluster.procs["mixed"].text()
    assert "curve_client_refused" not in log and "curve_enabled" in log


def test_curve_still_guards_the_tcp_side_of_a_grouped_shard(curve_join) -> None:  # type: ignore[no-untyped-def]
    """A PUSH without CURVE onto shard2's TCP endpoint gets nothing read; the inproc side is not reachable from outside."""
    import zmq

    from pipeline.wire import codec

    t, cluster, files = curve_join
    before = settled_stat(cluster.target, "shard2", "messages_in")
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    try:
        push.connect(t.shard("shard2").endpoint)
        env = codec.error_envelope(1, t.name, "intruder", 13, "x")
        try:
            codec.send(push, env, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # the handshake never completes: nothing to send to
        time.sleep(1.0)
    finally:
        push.close(0)
        ctx.term()
    assert settled_stat(cluster.target, "shard2", "messages_in") == before  # nothing of the intruder was read
    # and the pipeline still answers right
    inputs = [q.inputs for q in files[0].requests[:3]]
    references = [q.outputs for q in files[0].requests[:3]]
    assert mismatches(cluster.target, t.name, inputs, references, tolerance=0.0, concurrency=1) == []


# ------------------------------------------------------------------ the process's own lifecycle
def _tiny_group(directory: Path, *, ingress: bool = False) -> topo.Topology:
    """Two Rescaling shards (x -> a -> y) in one process, ipc endpoints in the folder (with ``ingress``: the ingress
    in that process too, on a free gRPC port)."""
    import keras

    from pipeline.topology import Batching, IngressSpec, ShardOutput, ShardSpec, TensorSpec, Topology

    def rescale(in_name: str, out_name: str, file: str) -> None:
        inp = keras.Input(shape=(4,), name=in_name)
        keras.Model({in_name: inp}, {out_name: keras.layers.Rescaling(2.0)(inp)}).save(directory / file)

    rescale("x", "a", "s1.keras")
    rescale("a", "y", "s2.keras")
    specs = {n: TensorSpec(n, "float32", (-1, 4)) for n in ("x", "a", "y")}

    def shard(name: str, inputs: tuple[str, ...], outputs: dict[str, tuple[str, ...]]) -> ShardSpec:
        endpoint = f"ipc://{directory}/{name}.ipc"
        outs = tuple(ShardOutput(o, c) for o, c in outputs.items())
        return ShardSpec(name, f"{name}.keras", inputs, outs, endpoint, "127.0.0.1", endpoint, batching=Batching(4, 0.5))

    results = f"ipc://{directory}/ingress.ipc"
    t = Topology(
        name="tiny",
        inputs=(specs["x"],),
        outputs=(specs["y"],),
        tensors=specs,
        shards=(shard("s1", ("x",), {"a": ("s2",)}), shard("s2", ("a",), {"y": (topo.INGRESS,)})),
        ingress=IngressSpec(
            grpc=f"127.0.0.1:{free_ports(1)[0]}" if ingress else "127.0.0.1:0", results=results, host="127.0.0.1", bind=results
        ),
        directory=directory,
        processes=(topo.ProcessSpec("pair", ("s1", "s2"), ingress=ingress),),
    )
    t.write(directory)
    return topo.load(directory)


def test_sigterm_drains_every_shard_of_the_process_and_a_bad_shard_stops_them_all(tmp_path: Path) -> None:
    from pipeline import process

    t = _tiny_group(tmp_path)
    argv = process.pipeline_command("worker", str(t.directory), "--process", "pair", "--metrics", "none")
    env = {**__import__("os").environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = process.start("pair", argv, tmp_path / "logs", env=env)
    try:
        wait(lambda: proc.text().count('"worker_ready"') == 2 or not proc.alive, "both shards ready", 180)
        assert proc.alive, proc.tail()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, proc.tail()
        text = proc.text()
        assert text.count('"worker_stopped"') == 2 and '"process_stopped"' in text, proc.tail()
    finally:
        proc.stop()
    # a shard whose file does not load takes the whole process down with its error (exit 2), naming it
    (tmp_path / "s2.keras").write_bytes(b"not a keras file")
    proc = process.start("pair", argv, tmp_path / "logs", env=env)
    try:
        code = proc.wait(180)
        assert code == 2, proc.tail()
        assert "s2.keras" in proc.text() and "shard_failed" in proc.text(), proc.tail()
    finally:
        proc.stop()


def test_a_process_that_serves_the_ingress_answers_drains_and_fails_whole(tmp_path: Path) -> None:
    """``ingress: true``: one process, one Procfile line; requests and results over inproc, answers exact; the
    admin view puts the ingress and both shards in it; killed, clients get UNAVAILABLE and a restart heals it;
    SIGTERM drains all three; a taken gRPC port fails the process before any shard loads, naming the address."""
    import os
    import socket

    import numpy as np

    from pipeline import process
    from pipeline.procfile import lines

    t = _tiny_group(tmp_path, ingress=True)
    assert lines(t, "D") == ["pair: exec pipeline worker D --process pair"]
    alone = pipeline("ingress", str(t.directory), timeout_s=120)  # it has no process of its own: the error says which to start
    assert alone.returncode == 2 and "runs in worker process 'pair' (ingress: true" in alone.stderr, alone.stderr
    argv = process.pipeline_command("worker", str(t.directory), "--process", "pair", "--metrics", "none")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    target = t.ingress.grpc
    proc = process.start("pair", argv, tmp_path / "logs", env=env)
    try:
        wait(lambda: server_ready(target) or not proc.alive, "the ingress in the process ready", 180)
        assert proc.alive, proc.tail()
        rng = np.random.default_rng(15)
        inputs = [{"x": rng.standard_normal((b, 4)).astype(np.float32)} for b in (1, 1, 3, 2)]
        references = [{"y": q["x"] * np.float32(4.0)} for q in inputs]
        assert mismatches(target, t.name, inputs, references, tolerance=0.0, concurrency=1) == []
        assert mismatches(target, t.name, inputs * 8, references * 8, tolerance=0.0, concurrency=8) == []
        procs = processes(target)
        assert {n: procs[n].pid for n in ("ingress", "s1", "s2")} == dict.fromkeys(("ingress", "s1", "s2"), proc.pid)
        text = proc.text()
        assert "inproc://shard/ingress" in text and '"tcp://' not in text, proc.tail()  # nothing went over TCP
        # killed, the ingress goes with its shards: a client gets UNAVAILABLE at once, not a hang; a restart heals
        proc.send_signal(signal.SIGKILL)
        proc.wait(15)
        with grpc.insecure_channel(target) as channel, pytest.raises(grpc.RpcError) as err:
            kpb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(kserve.infer_request(t.name, inputs[0]), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value.details()
        proc = process.start("pair", argv, tmp_path / "logs-restarted", env=env)
        wait(lambda: server_ready(target) or not proc.alive, "the restarted process ready", 180)
        assert proc.alive, proc.tail()
        assert mismatches(target, t.name, inputs, references, tolerance=0.0, concurrency=1) == []
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0, proc.tail()
        text = proc.text()
        assert text.count('"worker_stopped"') == 2 and '"ingress_stopped"' in text and '"process_stopped"' in text, proc.tail()
        assert text.index('"ingress_stopped"') < text.index('"worker_stopping"'), proc.tail()  # its calls first, then the shards
        assert '"ingress_unreachable"' not in text, proc.tail()
    finally:
        proc.stop()
    host, port = target.rsplit(":", 1)
    with socket.socket() as taken:
        taken.bind((host, int(port)))
        taken.listen(1)
        proc = process.start("pair", argv, tmp_path / "logs2", env=env)
        try:
            assert proc.wait(120) == 2, proc.tail()
            assert f"cannot bind the gRPC address {target!r}" in proc.text() and '"worker_ready"' not in proc.text(), proc.tail()
        finally:
            proc.stop()
