"""The Prometheus endpoints, scraped over HTTP after real traffic: the counts match what was sent.

Two set-ups: the real ingress with the fake shard worker of helpers_ingress
(fast; every ingress series, ModelStatistics, in flight, drops), and a real
pipeline (``pipeline partition`` of the residual test model into two shards,
the second one a join of the ingress's input and the first shard's output;
real ingress and worker processes on fresh ports via ``pipeline.launch``).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import helpers_ingress  # noqa: E402
import helpers_worker  # noqa: E402
from helpers_ingress import (  # noqa: E402
    FakeWorker,
    IngressThread,
    fake_workers,
    raw_request,
    single_topology,
    sock_dir,
    toy_compute,
    toy_inputs,
    wait_ready,
)

from pipeline.pb import admin_pb2 as apb  # noqa: E402
from pipeline.pb import admin_pb2_grpc as apb_grpc  # noqa: E402
from pipeline.pb import grpc_service_pb2 as kpb  # noqa: E402
from pipeline.pb import grpc_service_pb2_grpc as kpb_grpc  # noqa: E402
from pipeline.serving import metrics as prom  # noqa: E402
from pipeline.serving.metrics import OTHER_MODEL  # noqa: E402

SCRAPE_TIMEOUT_S = 5.0
WAIT_S = 10.0


class Scrape:
    """One scrape of an endpoint: ``value(name, **labels)`` is the sample (0 when absent)."""

    def __init__(self, address: str) -> None:
        with urllib.request.urlopen(f"http://{address}/metrics", timeout=SCRAPE_TIMEOUT_S) as response:
            assert response.status == 200
            self.content_type = response.headers["Content-Type"]
            self.text = response.read().decode()
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(self.text):
            self.types[family.name] = family.type
            for s in family.samples:
                self.samples[(s.name, frozenset(s.labels.items()))] = s.value

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def has(self, name: str, **labels: str) -> bool:
        return (name, frozenset(labels.items())) in self.samples

    def total(self, name: str, **labels: str) -> float:
        """Sum over the samples of ``name`` whose labels include ``labels``."""
        want = set(labels.items())
        return sum(v for (n, ls), v in self.samples.items() if n == name and want <= ls)


def wait_for(predicate, timeout_s: float = WAIT_S, what: str = "a condition"):  # type: ignore[no-untyped-def]
    return helpers_worker.wait_until(predicate, timeout_s, what, interval_s=0.05)


# ------------------------------------------------------------------ unit
def test_metrics_addresses() -> None:
    assert prom.parse_address("") is None and prom.parse_address("none") is None and prom.parse_address(" off ") is None
    assert prom.parse_address("127.0.0.1:0") == ("127.0.0.1", 0)  # loopback stays loopback
    assert prom.parse_address("10.0.0.5:9100") == ("0.0.0.0", 9100)  # a scraper on another host must reach it
    assert prom.parse_address(":0") == ("0.0.0.0", 0)
    for bad in ("9100", "host:port", "h:70000"):
        with pytest.raises(prom.UsageError, match="HOST:PORT"):
            prom.parse_address(bad)


# ------------------------------------------------------- ingress, fake shard
@contextlib.contextmanager
def toy_ingress(tmp_path: Path, timeout_s: float) -> Iterator[tuple[Any, FakeWorker, Any, str]]:
    """The real ingress (metrics on a free port) before the fake shard ``s0``, ready: (ingress thread, worker,
    stub, metrics address)."""
    with sock_dir() as sockets:
        toy = single_topology(tmp_path / "toy", sockets)
        worker = FakeWorker(toy, "s0", toy_compute)
        with IngressThread(toy, metrics="127.0.0.1:0", timeout_s=timeout_s) as ing, fake_workers(worker), ing.stub() as stub:
            wait_ready(stub)
            yield ing, worker, stub, ing.ingress.metrics.server.address


def test_ingress_metrics_count_the_traffic(tmp_path: Path) -> None:
    good = [1, 2, 3, 1, 4, 2, 1]  # batch sizes of the good requests
    with toy_ingress(tmp_path, 5.0) as (ing, worker, stub, address):
        toy = ing.topology
        assert address.startswith("127.0.0.1:") and not address.endswith(":0")
        before = Scrape(address)
        assert before.content_type.startswith("text/plain")
        assert before.value("pipeline_requests_total", model="toy", code="OK") == 0
        assert before.types["pipeline_requests"] == "counter"  # exposed as pipeline_requests_total
        assert before.types["pipeline_request_duration_seconds"] == "histogram"

        for i, batch in enumerate(good):
            stub.ModelInfer(raw_request("toy", toy_inputs(batch, seed=i)), timeout=WAIT_S)
        bad_shape = {"x": np.zeros((2, 5), np.float32), "ids": np.zeros((2, 2), np.int64)}
        for _ in range(3):
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(raw_request("toy", bad_shape), timeout=WAIT_S)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(raw_request("nope", toy_inputs(1)), timeout=WAIT_S)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        worker.mode = "silent"  # the shard never answers: the request ends at its deadline
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(raw_request("toy", toy_inputs(1)), timeout=0.5)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: ing.pending() == 0, what="the timed-out request to leave the table")

        # requests in flight: three held by a slow shard
        worker.mode, worker.delay_s = "ok", 1.0
        held = [stub.ModelInfer.future(raw_request("toy", toy_inputs(1)), timeout=WAIT_S) for _ in range(3)]
        wait_for(lambda: Scrape(address).value("pipeline_requests_in_flight", model="toy") == 3, what="3 in flight")
        for f in held:
            f.result()
        after_held = Scrape(address)
        assert after_held.value("pipeline_requests_in_flight", model="toy") == 0

        # a message the ingress cannot decode, straight onto its results socket
        ctx = zmq.Context.instance()
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(toy.ingress.results)
        try:
            push.send_multipart([b"\x08garbage", b"x"])
            wait_for(
                lambda: Scrape(address).value("pipeline_messages_dropped_total", process="ingress", reason="bad_envelope") == 1,
                what="the dropped message to be counted",
            )
        finally:
            push.close(linger=0)

        stats = stub.ModelStatistics(kpb.ModelStatisticsRequest(name="toy"), timeout=WAIT_S).model_stats[0]
        m = Scrape(address)

    ok = len(good) + len(held)
    rows = sum(good) + len(held)
    assert m.value("pipeline_requests_total", model="toy", code="OK") == ok
    assert m.value("pipeline_requests_total", model="toy", code="INVALID_ARGUMENT") == 3
    assert m.value("pipeline_requests_total", model="toy", code="DEADLINE_EXCEEDED") == 1
    assert m.value("pipeline_requests_total", model=OTHER_MODEL, code="NOT_FOUND") == 2
    assert m.total("pipeline_requests_total") == ok + 3 + 1 + 2
    assert m.value("pipeline_request_duration_seconds_count", model="toy") == ok  # successful requests only
    assert m.value("pipeline_request_duration_seconds_bucket", model="toy", le="+Inf") == ok
    assert m.value("pipeline_request_duration_seconds_sum", model="toy") >= 3 * 1.0  # the three held ones
    assert m.value("pipeline_inferences_total", model="toy") == rows
    assert m.value("pipeline_hop_duration_seconds_count", src="s0", dst="ingress") == ok
    assert m.value("pipeline_shard_up", shard="s0") == 1
    assert 0 <= m.value("pipeline_heartbeat_age_seconds", shard="s0") < 3 * toy.heartbeat_interval_s
    assert m.value("pipeline_heartbeats_total", shard="s0") >= 1
    assert m.value("pipeline_pending_requests") == 0
    assert m.value("pipeline_messages_dropped_total", process="ingress", reason="bad_envelope") == 1
    assert m.value("process_resident_memory_bytes") > 10 * 2**20

    # ModelStatistics agrees with the same traffic (Triton's fields, real times)
    s = stats.inference_stats
    assert stats.inference_count == rows and stats.execution_count == ok
    assert s.success.count == ok and s.fail.count == 3 + 1  # NOT_FOUND named another model
    for part in (s.queue, s.compute_input, s.compute_infer, s.compute_output):
        assert part.count == ok and part.ns > 0
    assert s.success.ns > s.compute_infer.ns + s.compute_input.ns + s.compute_output.ns
    assert sum(b.compute_infer.count for b in stats.batch_stats) == ok
    assert sorted(b.batch_size for b in stats.batch_stats) == sorted(set(good))


def test_a_deadline_that_passes_is_counted_so_whichever_timer_fires_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gRPC cancels the handler when the caller's deadline passes, racing the ingress's own timer for the same
    deadline; on a loaded machine the cancellation can come first (a full run saw it). Made certain here: the
    ingress's own timer is set 30 s late. A caller that gives up long before its deadline is still CANCELLED."""
    import types

    from pipeline.serving import ingress as ingress_module
    from pipeline.wire import deadline as dl

    late = types.SimpleNamespace(**{k: getattr(dl, k) for k in dir(dl) if not k.startswith("__")})
    late.deadline_after = lambda timeout_s, now: dl.deadline_after(timeout_s + 30.0, now)
    monkeypatch.setattr(ingress_module, "dl", late)
    with toy_ingress(tmp_path, 60.0) as (_, worker, stub, address):
        worker.mode = "silent"
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(raw_request("toy", toy_inputs(1)), timeout=0.3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        wait_for(lambda: Scrape(address).value("pipeline_requests_in_flight", model="toy") == 0, what="the request to end")

        call = stub.ModelInfer.future(raw_request("toy", toy_inputs(1)), timeout=30.0)
        wait_for(lambda: Scrape(address).value("pipeline_requests_in_flight", model="toy") == 1, what="1 in flight")
        call.cancel()
        wait_for(lambda: Scrape(address).value("pipeline_requests_in_flight", model="toy") == 0, what="the cancelled request to end")
        m = Scrape(address)
        stats = stub.ModelStatistics(kpb.ModelStatisticsRequest(name="toy"), timeout=WAIT_S).model_stats[0]
    assert m.value("pipeline_requests_total", model="toy", code="DEADLINE_EXCEEDED") == 1
    assert m.value("pipeline_requests_total", model="toy", code="CANCELLED") == 1
    assert stats.inference_stats.fail.count == 1  # the deadline; a cancellation is not a failed inference


def test_metrics_off_and_a_taken_port(tmp_path: Path) -> None:
    import socket

    with sock_dir() as sockets:
        toy = single_topology(tmp_path / "toy", sockets)
        with IngressThread(toy, metrics="none") as ing:
            assert ing.ingress.metrics.server.address == "" and ing.ingress.metrics.server.port == 0
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        try:
            wanted = f"127.0.0.1:{taken.getsockname()[1]}"
            with IngressThread(toy, metrics=wanted) as ing:  # it serves anyway, on another port
                address = ing.ingress.metrics.server.address
                assert address != wanted
                assert Scrape(address).has("pipeline_pending_requests")
        finally:
            taken.close()


# ------------------------------------------------------------- real pipeline
@pytest.fixture(scope="module")
def residual_pipeline(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """The residual model in two shards (shard1 joins the model input and shard0's output), running."""
    import models

    from pipeline.launch import Cluster, relocate
    from pipeline.partition.command import partition

    root = tmp_path_factory.mktemp("metrics")
    source = partition(models.residual(), name="residual", out=root / "source", cuts=["relu_a"], verify=False).topology
    t = relocate(source.directory, root / "run")
    assert [s.name for s in t.shards] == ["shard0", "shard1"]
    assert set(t.producers("shard1")) == {"ingress", "shard0"}  # a join
    cluster = Cluster(t, root / "logs", common_worker_args=["--threads", "1"])
    try:
        cluster.start()
        yield t, cluster
    finally:
        cluster.stop()


def _image(batch: int, seed: int) -> dict[str, np.ndarray]:
    return {"image": np.random.default_rng(seed).standard_normal((batch, 8, 8, 4)).astype(np.float32)}


def _processes(target: str) -> Mapping[str, apb.Process]:
    with grpc.insecure_channel(target) as channel:
        response = apb_grpc.PipelineAdminStub(channel).Processes(apb.ProcessesRequest(), timeout=WAIT_S)
    return {p.name: p for p in response.processes}


@pytest.mark.timeout(600)
def test_every_endpoint_counts_the_traffic(residual_pipeline) -> None:  # type: ignore[no-untyped-def]
    t, cluster = residual_pipeline
    batches = [1, 2, 1, 3, 1, 1, 2, 1, 4, 1, 1, 2, 1, 1, 3, 1]
    with grpc.insecure_channel(cluster.target) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        with concurrent.futures.ThreadPoolExecutor(4) as pool:  # concurrent, so the shards batch
            list(pool.map(lambda ib: stub.ModelInfer(raw_request("residual", _image(ib[1], ib[0])), timeout=60), enumerate(batches)))
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as err:
                stub.ModelInfer(raw_request("residual", {"image": np.zeros((1, 8, 8, 3), np.float32)}), timeout=60)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(raw_request("nope", _image(1, 0)), timeout=60)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND

    procs = _processes(cluster.target)
    addresses = {name: procs[name].metrics for name in ("shard0", "shard1")}
    addresses["ingress"] = t.ingress.metrics
    assert addresses["shard0"] == t.shard("shard0").metrics and addresses["shard1"] == t.shard("shard1").metrics
    n, rows = len(batches), sum(batches)

    ing = Scrape(addresses["ingress"])
    assert ing.value("pipeline_requests_total", model="residual", code="OK") == n
    assert ing.value("pipeline_requests_total", model="residual", code="INVALID_ARGUMENT") == 2
    assert ing.value("pipeline_requests_total", model=OTHER_MODEL, code="NOT_FOUND") == 1
    assert ing.value("pipeline_request_duration_seconds_count", model="residual") == n
    assert ing.value("pipeline_inferences_total", model="residual") == rows
    assert ing.value("pipeline_hop_duration_seconds_count", src="shard1", dst="ingress") == n
    assert ing.value("pipeline_requests_in_flight", model="residual") == 0
    for shard in ("shard0", "shard1"):
        assert ing.value("pipeline_shard_up", shard=shard) == 1
        assert 0 <= ing.value("pipeline_heartbeat_age_seconds", shard=shard) < 3 * t.heartbeat_interval_s
    assert ing.value("process_resident_memory_bytes") > 10 * 2**20

    hops = {"shard0": [("ingress", "shard0")], "shard1": [("ingress", "shard1"), ("shard0", "shard1")]}
    for shard in ("shard0", "shard1"):
        m = Scrape(addresses[shard])
        assert m.value("pipeline_shard_requests_total", shard=shard, code="OK") == n
        assert m.total("pipeline_shard_requests_total", shard=shard) == n  # no errors: bad requests stop at the ingress
        calls = m.value("pipeline_batch_size_count", shard=shard)
        assert 1 <= calls <= n
        assert m.value("pipeline_batch_size_sum", shard=shard) == n  # every request in exactly one call
        assert m.value("pipeline_batch_rows_sum", shard=shard) == rows
        assert m.value("pipeline_shard_compute_duration_seconds_count", shard=shard) == calls
        assert m.value("pipeline_shard_compute_duration_seconds_sum", shard=shard) > 0
        assert m.value("pipeline_shard_queue_duration_seconds_count", shard=shard) == n
        for src, dst in hops[shard]:
            assert m.value("pipeline_hop_duration_seconds_count", src=src, dst=dst) == n, (src, dst)
        assert m.value("pipeline_join_pending", shard=shard) == 0
        assert m.value("pipeline_shard_queued", shard=shard) == 0
        assert m.value("pipeline_shard_ready", shard=shard) == 1
        assert m.value("process_resident_memory_bytes") > 100 * 2**20  # TensorFlow is in there
        assert m.value("pipeline_shard_messages_received_total", shard=shard) == n * len(hops[shard])
        # the next heartbeat carries the same numbers (what `pipeline top` shows)
        hb = wait_for(
            lambda: (s := _processes(cluster.target)[shard].stats)["computed"] == n and s,  # noqa: B023
            what=f"a heartbeat from {shard} that counts the traffic",
        )
        assert hb["batches"] == calls and hb["pending_joins"] == 0

    # garbage straight onto shard0's endpoint: dropped, counted by reason, the worker lives on
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect(t.shard("shard0").endpoint)
    try:
        push.send_multipart([b"\x08garbage"])
        wait_for(
            lambda: Scrape(addresses["shard0"]).value("pipeline_messages_dropped_total", process="shard0", reason="bad_envelope") == 1,
            what="shard0 to count the dropped message",
        )
    finally:
        push.close(linger=0)
    assert cluster.procs["shard0"].alive


@pytest.mark.timeout(300)
def test_top_once_on_the_real_pipeline(residual_pipeline) -> None:  # type: ignore[no-untyped-def]
    """``pipeline top --once`` under load: both shards up, real rates and compute times, the slowest marked."""
    t, cluster = residual_pipeline
    stop = time.monotonic() + 30
    with grpc.insecure_channel(cluster.target) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)

        def load() -> int:
            sent = 0
            while time.monotonic() < stop:
                stub.ModelInfer(raw_request("residual", _image(1, sent)), timeout=30)
                sent += 1
            return sent

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            runs = [pool.submit(load) for _ in range(2)]
            time.sleep(0.5)
            try:
                top = subprocess.run(
                    [sys.executable, "-m", "pipeline.cli", "top", "--once", "--interval", "1", "--target", str(t.directory)],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
            finally:
                stop = time.monotonic()
            assert sum(r.result() for r in runs) > 0
    assert top.returncode == 0, top.stderr
    lines = top.stdout.splitlines()
    assert lines[0].startswith(f"pipeline top  {t.ingress.grpc}  model residual")
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("shard")}
    assert set(rows) == {"shard0", "shard1"}
    for cells in rows.values():
        assert cells[1] == "up"
        assert float(cells[5]) > 0  # requests per second
        assert float(cells[7]) > 0 and float(cells[8]) >= float(cells[7])  # p50 <= p99 compute ms
    assert sum("<< slowest" in line for line in lines) == 1
    ingress_rates = next(line for line in lines if "req/s" in line).split()
    assert float(ingress_rates[ingress_rates.index("req/s") + 1]) > 0


def test_scrape_config_lists_every_endpoint(tmp_path: Path) -> None:
    import yaml

    with sock_dir() as sockets:
        duo = helpers_ingress.two_output_topology(tmp_path / "duo", sockets)
    duo = duo.replace(
        ingress=dataclasses.replace(duo.ingress, metrics="10.0.0.1:9100"),
        shards=(dataclasses.replace(duo.shards[0], metrics="10.0.0.2:9101"), duo.shards[1]),
    )
    config = yaml.safe_load(prom.scrape_config(duo))["scrape_configs"][0]
    assert config["job_name"] == "keras-pipeline-duo"
    # shard b records no endpoint: not listed
    assert [(c["targets"], c["labels"]["pipeline_process"]) for c in config["static_configs"]] == [
        (["10.0.0.1:9100"], "ingress"),
        (["10.0.0.2:9101"], "a"),
    ]


def test_a_request_still_in_flight_when_the_ingress_stops_gets_unavailable(tmp_path: Path) -> None:
    """gRPC cancels what still runs when the stop's grace ends (the caller would see CANCELLED, as a rolling
    update of the ingress once did); the ingress ends it just before, with UNAVAILABLE."""
    with toy_ingress(tmp_path, 60.0) as (ing, worker, stub, address):
        worker.mode = "silent"  # the shard never answers
        call = stub.ModelInfer.future(raw_request("toy", toy_inputs(1)), timeout=30.0)
        wait_for(lambda: Scrape(address).value("pipeline_requests_in_flight", model="toy") == 1, what="1 in flight")
        ing.call(ing.ingress.stop(0.5))
        with pytest.raises(grpc.RpcError) as err:
            call.result(timeout=WAIT_S)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, err.value
        assert "shut down" in (err.value.details() or "")
