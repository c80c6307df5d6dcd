"""Replicas of a shard (issue 16): real processes, real sockets, the real ingress.

The join topology (``tests.models.inception`` in 3 shards): ``shard0`` and ``shard1`` take the image from the
ingress, ``shard2`` joins the image (ingress), ``shard0``'s and ``shard1``'s outputs. Here ``shard0`` runs as two
replicas (one producer, the ingress) and the join ``shard2`` as two replicas fed by three different producers (the
ingress, ``shard0@0``/``shard0@1`` and ``shard1``), which must all pick the same replica for a request.

- answers bitwise at concurrency 1 and within the batching tolerance under load; every replica computes;
- ``shard2@1`` killed (SIGKILL) under load and restarted: nothing wrong, nothing past its deadline, the
  survivor takes the traffic, the restarted replica gets its share back;
- bad input: ``replicas: 0``, a colliding endpoint, ``--replica`` out of range, each a clear error naming the shard.
"""

from __future__ import annotations

import collections
import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers_pipeline import processes, record, serving, settled_stat, wait  # noqa: E402
from soak.helpers_soak import check, join_topology, pipeline  # noqa: E402

from answers import mismatches, require_discriminating  # noqa: E402
from pipeline import replicas  # noqa: E402
from pipeline import topology as topo  # noqa: E402
from pipeline.launch import Cluster, relocate  # noqa: E402
from pipeline.pb import grpc_service_pb2_grpc as kpb_grpc  # noqa: E402
from pipeline.serving import kserve  # noqa: E402
from pipeline.soak import replay  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]
THREADS = "1"  # every worker's intra-op pool; the references use the same, so batch-1 answers are bitwise
START_S = 300.0
DEADLINE_S = 10.0  # each request's deadline in the replica-loss run


@pytest.fixture(scope="module")
def replicated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[topo.Topology, Cluster, list[replay.Replay]]]:
    root = tmp_path_factory.mktemp("replicas")
    source = join_topology(root / "source")
    check(pipeline("replicas", str(source), "shard0=2", "shard2=2"))
    t = relocate(source, root / "run")
    assert [len(s.replicas) for s in t.shards] == [2, 1, 2]
    assert set(t.producers("shard2")) == {"ingress", "shard0", "shard1"}  # a join of three producers
    files = [record(t.directory, root / f"r{b}.npz", count=12, batch=b, seed=b, threads=THREADS) for b in (1, 3)]
    with serving(t, root / "logs", threads=THREADS, start_s=START_S) as cluster:  # every replica up (and reachable)
        yield t, cluster, files


def test_replicas_answer_right_and_share_the_work(replicated) -> None:  # type: ignore[no-untyped-def]
    t, cluster, files = replicated
    assert set(cluster.procs) == {"ingress", "shard0@0", "shard0@1", "shard1", "shard2@0", "shard2@1"}
    command = cluster.command("shard2@1")
    at = command.index("--replica")
    assert command[at - 2 : at + 2] == ["--shard", "shard2", "--replica", "1"], command
    inputs = [q.inputs for f in files for q in f.requests]
    references = [q.outputs for f in files for q in f.requests]
    assert mismatches(cluster.target, t.name, inputs, references, tolerance=0.0, concurrency=1) == []
    tolerance = max(f.tolerance or 0.0 for f in files) or 1e-6
    assert mismatches(cluster.target, t.name, inputs * 6, references * 6, tolerance=tolerance, concurrency=12) == []
    procs = processes(cluster.target)
    for name in ("shard0@0", "shard0@1", "shard2@0", "shard2@1"):
        assert procs[name].up and procs[name].metrics == replicas.metrics_of(t, name), procs[name]
        assert settled_stat(cluster.target, name, "computed") > 0, f"{name} computed nothing"
    # the join never waited on parts that went to another replica: nothing expired, nothing refused
    for name in ("shard2@0", "shard2@1"):
        stats = processes(cluster.target)[name].stats
        assert stats["join_expired"] == 0 and stats["join_refused"] == 0, dict(stats)
    # both replicas of shard0 send to both replicas of shard2 (their routers agree with the ingress's)
    s0 = processes(cluster.target)["shard0@0"].stats
    assert s0["routed.shard2@0"] > 0 and s0["routed.shard2@1"] > 0, dict(s0)


def _load(target: str, model: str, inputs, references, tolerance: float, stop: threading.Event, counts: collections.Counter) -> None:  # type: ignore[no-untyped-def]
    channel = grpc.insecure_channel(target)
    stub = kpb_grpc.GRPCInferenceServiceStub(channel)
    i = 0
    try:
        while not stop.is_set():
            k = i % len(inputs)
            i += 1
            t0 = time.monotonic()
            try:
                response = stub.ModelInfer(kserve.infer_request(model, inputs[k]), timeout=DEADLINE_S)
            except grpc.RpcError as exc:
                counts[f"error.{exc.code().name}"] += 1
                if time.monotonic() - t0 > DEADLINE_S + 1.0:
                    counts["late"] += 1
                continue
            if time.monotonic() - t0 > DEADLINE_S + 1.0:
                counts["late"] += 1
            index = {o.name: j for j, o in enumerate(response.outputs)}
            ok = all(
                float(np.abs(kserve.output_array(response, index[n]).astype(np.float64) - want.astype(np.float64)).max()) <= tolerance
                for n, want in references[k].items()
            )
            counts["correct" if ok else "wrong"] += 1
    finally:
        channel.close()


def test_a_replica_killed_under_load_and_restarted(replicated) -> None:  # type: ignore[no-untyped-def]
    t, cluster, files = replicated
    inputs = [q.inputs for q in files[0].requests]
    references = [q.outputs for q in files[0].requests]
    tolerance = max(f.tolerance or 0.0 for f in files) or 1e-6
    require_discriminating(inputs, references, tolerance)
    counts: collections.Counter[str] = collections.Counter()
    stop = threading.Event()
    with ThreadPoolExecutor(8) as pool:
        runs = [pool.submit(_load, cluster.target, t.name, inputs, references, tolerance, stop, counts) for _ in range(8)]
        try:
            time.sleep(3.0)
            before = settled_stat(cluster.target, "shard2@0", "computed")
            cluster.stop_process("shard2@1", signal.SIGKILL)
            wait(lambda: not processes(cluster.target)["shard2@1"].up, "shard2@1 reported down")
            assert processes(cluster.target)["shard2@0"].up
            time.sleep(4.0)  # load on the survivor alone
            during = settled_stat(cluster.target, "shard2@0", "computed")
            assert during > before, "the survivor took no traffic while its peer was down"
            served_alone = counts["correct"]
            cluster.start_process("shard2@1")
            wait(lambda: (lambda p: p.up and p.restarts >= 1)(processes(cluster.target)["shard2@1"]), "shard2@1 back", START_S)
            wait(lambda: settled_stat(cluster.target, "shard2@1", "computed") > 0, "traffic back on the restarted shard2@1")
            time.sleep(2.0)
        finally:
            stop.set()
            for run in runs:
                run.result(timeout=DEADLINE_S * 3)
    print(f"replica loss under load: {dict(counts)}")  # the report's numbers (pytest -s)
    assert counts["wrong"] == 0, dict(counts)
    assert counts["late"] == 0 and counts["error.DEADLINE_EXCEEDED"] == 0, dict(counts)
    assert counts["correct"] > served_alone > 0, dict(counts)
    errors = {k: v for k, v in counts.items() if k.startswith("error.")}
    assert set(errors) <= {"error.UNAVAILABLE"}, dict(counts)  # only around the loss, and only retryable
    assert sum(errors.values()) <= 0.1 * counts["correct"], dict(counts)


def test_bad_replica_input_is_a_clear_error(replicated, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    t, _, _ = replicated
    out = pipeline("replicas", str(t.directory), "shard2=0")
    assert out.returncode != 0 and "shard 'shard2' needs at least 1 replica, received 0" in out.stderr, out.stderr
    out = pipeline("worker", str(t.directory), "--shard", "shard2", "--replica", "5")
    assert out.returncode != 0 and "shard 'shard2' has 2 replica(s) (0..1); received --replica 5" in out.stderr, out.stderr
    data = yaml.safe_load((t.directory / topo.TOPOLOGY_FILE).read_text())
    bad = tmp_path / "bad"
    bad.mkdir()
    data["shards"][2]["replicas"][1]["endpoint"] = data["shards"][1]["endpoint"]
    (bad / topo.TOPOLOGY_FILE).write_text(yaml.safe_dump(data))
    out = pipeline("procfile", str(bad))
    assert out.returncode != 0 and "shard 'shard2' replica 1 has endpoint" in out.stderr and "shard 'shard1' already uses" in out.stderr, out.stderr
    data["shards"][2]["replicas"] = 0
    (bad / topo.TOPOLOGY_FILE).write_text(yaml.safe_dump(data))
    out = pipeline("procfile", str(bad))
    assert out.returncode != 0 and "shard 'shard2' has replicas: 0; expected at least 1" in out.stderr, out.stderr


# ------------------------------------------------------------------ a middle shard fed by one worker
@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[topo.Topology, Cluster, replay.Replay]]:
    """``tests.models.sequential`` in 3 shards, the middle one (fed by ``shard0`` alone) in two replicas."""
    import subprocess

    from soak.helpers_soak import TESTS, env

    root = tmp_path_factory.mktemp("replicas-chain")
    model = root / "sequential.keras"
    subprocess.run(
        [sys.executable, "-c", f"import models; models.sequential().save({str(model)!r})"],
        cwd=TESTS, env=env(), check=True, timeout=180, capture_output=True,
    )  # fmt: skip
    check(pipeline("partition", str(model), "--cut", "s1", "--cut", "s2", "--out", str(root / "source"), "--no-verify", "--replicas", "shard1=2"))
    t = relocate(root / "source", root / "run")
    assert [len(s.replicas) for s in t.shards] == [1, 2, 1] and list(t.producers("shard1")) == ["shard0"]
    file = record(t.directory, root / "r.npz", count=16, batch=1, seed=3, threads=THREADS)
    with serving(t, root / "logs", threads=THREADS, start_s=START_S) as cluster:
        yield t, cluster, file


def test_a_middle_shard_in_two_replicas(chain) -> None:  # type: ignore[no-untyped-def]
    t, cluster, file = chain
    inputs = [q.inputs for q in file.requests]
    references = [q.outputs for q in file.requests]
    assert mismatches(cluster.target, t.name, inputs, references, tolerance=0.0, concurrency=1) == []
    tolerance = file.tolerance or 1e-6
    assert mismatches(cluster.target, t.name, inputs * 20, references * 20, tolerance=tolerance, concurrency=12) == []
    for name in ("shard1@0", "shard1@1"):
        assert settled_stat(cluster.target, name, "computed") > 0, f"{name} computed nothing"
    routed = processes(cluster.target)["shard0"].stats
    assert routed["routed.shard1@0"] > 0 and routed["routed.shard1@1"] > 0, dict(routed)
    # the sole producer routes around a replica that is gone: stop one (SIGTERM), every answer still right
    cluster.stop_process("shard1@1")
    wait(lambda: not processes(cluster.target)["shard1@1"].up, "shard1@1 reported down")
    assert mismatches(cluster.target, t.name, inputs * 4, references * 4, tolerance=tolerance, concurrency=8) == []
    cluster.start_process("shard1@1")
    wait(lambda: processes(cluster.target)["shard1@1"].up, "shard1@1 back", START_S)
