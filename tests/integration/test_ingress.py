"""The real ingress (in-process, and once as a subprocess) against fake shard workers on ipc sockets."""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers_ingress import (  # noqa: E402
    HEARTBEAT_S,
    WAIT_S,
    FakeWorker,
    IngressThread,
    duo_compute_a,
    duo_compute_b,
    env_without_pipeline_vars,
    fake_workers,
    outputs_of,
    raw_request,
    single_topology,
    sock_dir,
    toy_compute,
    toy_inputs,
    two_output_topology,
    typed_request,
    wait_ready,
    wait_until,
)

from pipeline.pb import grpc_service_pb2 as kpb  # noqa: E402
from pipeline.pb import model_config_pb2 as mcpb  # noqa: E402
from pipeline.topology import Topology  # noqa: E402

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def toy(tmp_path: Path) -> Iterator[Topology]:
    with sock_dir() as sockets:
        yield single_topology(tmp_path / "toy", sockets)


@pytest.fixture
def duo(tmp_path: Path) -> Iterator[Topology]:
    with sock_dir() as sockets:
        yield two_output_topology(tmp_path / "duo", sockets)


def _code(excinfo: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return excinfo.value.code()


# ------------------------------------------------------------- round trips
def test_round_trip_raw_and_typed(toy: Topology) -> None:
    with IngressThread(toy) as ing, fake_workers(FakeWorker(toy, "s0", toy_compute)), ing.stub() as stub:
        wait_ready(stub)
        for batch, build in ((1, raw_request), (3, raw_request), (2, typed_request)):
            inputs = toy_inputs(batch, seed=batch)
            response = stub.ModelInfer(build("toy", inputs, timing=False), timeout=5)
            out = outputs_of(response)
            assert list(out) == ["y"]
            assert response.outputs[0].datatype == "FP32"
            assert list(response.outputs[0].shape) == [batch, 3]
            np.testing.assert_array_equal(out["y"], toy_compute(inputs)["y"])
            assert response.model_name == "toy" and response.model_version == "1"
        assert ing.pending() == 0


def test_workers_up_before_the_ingress(toy: Topology) -> None:
    with fake_workers(FakeWorker(toy, "s0", toy_compute)):
        time.sleep(2 * HEARTBEAT_S)
        for _ in range(3):  # the ingress (re)starts while the shard is already up
            with IngressThread(toy) as ing, ing.stub() as stub:
                wait_ready(stub, timeout=5)
                inputs = toy_inputs(2)
                out = outputs_of(stub.ModelInfer(raw_request("toy", inputs), timeout=5))
                np.testing.assert_array_equal(out["y"], toy_compute(inputs)["y"])


def test_two_outputs_from_two_shards_are_joined(duo: Topology) -> None:
    workers = FakeWorker(duo, "a", duo_compute_a), FakeWorker(duo, "b", duo_compute_b)
    with IngressThread(duo) as ing, fake_workers(*workers), ing.stub() as stub:
        wait_ready(stub)
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        response = stub.ModelInfer(raw_request("duo", {"x": x}, timing=True), timeout=5)
        out = outputs_of(response)
        assert [t.name for t in response.outputs] == ["out_a", "out_b"]
        np.testing.assert_array_equal(out["out_a"], x[:, :2] + 1)
        np.testing.assert_array_equal(out["out_b"], (x * 10).sum(axis=1).astype(np.int32))
        timing = json.loads(response.parameters["timing"].string_param)
        names = [s["name"] for s in timing["spans"]]
        # each result part's hop to the ingress too, from the shard's send to the ingress's receipt
        for name in ("a.compute", "b.compute", "a->ingress.hop", "b->ingress.hop", "ingress.wait", "ingress.decode"):
            assert name in names, names
        assert response.parameters["timing.b.compute_ns"].int64_param >= 0
        assert timing["total_ns"] > 0
        # only the requested output, when the client names one
        request = raw_request("duo", {"x": x})
        request.outputs.add(name="out_b")
        response = stub.ModelInfer(request, timeout=5)
        assert [t.name for t in response.outputs] == ["out_b"]
        assert workers[1].requests == 2 and workers[0].requests == 2
        assert ing.pending() == 0


def test_64_concurrent_requests_each_answered_once(toy: Topology) -> None:
    worker = FakeWorker(toy, "s0", toy_compute)
    with IngressThread(toy) as ing, fake_workers(worker), ing.stub() as stub:
        wait_ready(stub)
        inputs = [toy_inputs(1 + i % 3, seed=i) for i in range(64)]
        futures = [stub.ModelInfer.future(raw_request("toy", x), timeout=20) for x in inputs]
        for x, future in zip(inputs, futures):
            np.testing.assert_array_equal(outputs_of(future.result())["y"], toy_compute(x)["y"])
        assert worker.requests == 64
        assert len(set(worker.request_ids)) == 64
        assert ing.pending() == 0
        stats = stub.ModelStatistics(kpb.ModelStatisticsRequest(name="toy"), timeout=5).model_stats[0]
        assert stats.inference_stats.success.count == 64
        assert stats.inference_count == sum(x["x"].shape[0] for x in inputs)


# ------------------------------------------------------------- bad inputs
def _bad_cases() -> list[tuple[str, grpc.StatusCode, list[str]]]:
    return [
        ("unknown_model", grpc.StatusCode.NOT_FOUND, ["'nope'", "'toy'"]),
        ("missing_input", grpc.StatusCode.INVALID_ARGUMENT, ["missing ['ids']", "expected inputs ['x', 'ids']"]),
        ("extra_input", grpc.StatusCode.INVALID_ARGUMENT, ["unexpected ['z']"]),
        ("wrong_datatype", grpc.StatusCode.INVALID_ARGUMENT, ["'x'", "expected datatype FP32, received FP64"]),
        ("wrong_rank", grpc.StatusCode.INVALID_ARGUMENT, ["'x'", "expected rank 2", "received rank 3"]),
        ("wrong_dim", grpc.StatusCode.INVALID_ARGUMENT, ["'x'", "expected shape [-1, 4]", "received [2, 5]"]),
        ("byte_count", grpc.StatusCode.INVALID_ARGUMENT, ["'x'", "needs 32 bytes", "received 28 bytes"]),
        ("raw_and_typed", grpc.StatusCode.INVALID_ARGUMENT, ["not both", "['x']"]),
        ("neither", grpc.StatusCode.INVALID_ARGUMENT, ["received neither", "['x', 'ids']"]),
        ("batch_mismatch", grpc.StatusCode.INVALID_ARGUMENT, ["same batch size", "{'x': 2, 'ids': 3}"]),
    ]


def _bad_request(case: str) -> kpb.ModelInferRequest:
    good = toy_inputs(2)
    if case == "unknown_model":
        return raw_request("nope", good)
    if case == "missing_input":
        return raw_request("toy", {"x": good["x"]})
    if case == "extra_input":
        return raw_request("toy", {**good, "z": good["x"]})
    if case == "wrong_datatype":
        return raw_request("toy", {**good, "x": good["x"].astype(np.float64)})
    if case == "wrong_rank":
        return raw_request("toy", {**good, "x": good["x"].reshape(2, 2, 2)})
    if case == "wrong_dim":
        return raw_request("toy", {**good, "x": np.zeros((2, 5), np.float32)})
    if case == "byte_count":
        request = raw_request("toy", good)
        request.raw_input_contents[0] = request.raw_input_contents[0][:-4]
        return request
    if case == "raw_and_typed":
        request = raw_request("toy", good)
        request.inputs[0].contents.fp32_contents.extend([0.0] * 8)
        return request
    if case == "neither":
        request = raw_request("toy", good)
        del request.raw_input_contents[:]
        return request
    if case == "batch_mismatch":
        return raw_request("toy", {"x": good["x"], "ids": np.zeros((3, 2), np.int64)})
    raise AssertionError(case)


def test_bad_inputs_are_rejected_before_anything_is_queued(toy: Topology) -> None:
    worker = FakeWorker(toy, "s0", toy_compute)
    with IngressThread(toy) as ing, fake_workers(worker), ing.stub() as stub:
        wait_ready(stub)
        for case, code, fragments in _bad_cases():
            with pytest.raises(grpc.RpcError) as excinfo:
                stub.ModelInfer(_bad_request(case), timeout=5)
            assert _code(excinfo) == code, (case, excinfo.value.details())
            for fragment in fragments:
                assert fragment in excinfo.value.details(), (case, excinfo.value.details())
        assert worker.requests == 0
        assert ing.pending() == 0
        stats = stub.ModelStatistics(kpb.ModelStatisticsRequest(name="toy"), timeout=5).model_stats[0]
        assert stats.inference_stats.fail.count == len(_bad_cases()) - 1  # the unknown model is not ours


def test_message_size_limit(toy: Topology) -> None:
    with IngressThread(toy, max_message_bytes=1 << 20) as ing, ing.stub() as stub:
        big = toy_inputs(2)
        big["x"] = np.zeros((80_000, 4), np.float32)  # 1.28 MB
        big["ids"] = np.zeros((80_000, 2), np.int64)
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.ModelInfer(raw_request("toy", big), timeout=5)
        assert _code(excinfo) == grpc.StatusCode.RESOURCE_EXHAUSTED


# ------------------------------------------------------------- liveness
def test_not_ready_then_ready_and_unavailable_at_once(toy: Topology) -> None:
    with IngressThread(toy) as ing, ing.stub() as stub:
        assert stub.ServerLive(kpb.ServerLiveRequest(), timeout=5).live
        assert not stub.ServerReady(kpb.ServerReadyRequest(), timeout=5).ready
        assert not stub.ModelReady(kpb.ModelReadyRequest(name="toy"), timeout=5).ready
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.ModelInfer(raw_request("toy", toy_inputs(1)), timeout=10)
        assert time.monotonic() - started < 1.0
        assert _code(excinfo) == grpc.StatusCode.UNAVAILABLE
        assert "'s0' (no heartbeat yet)" in excinfo.value.details()

        worker = FakeWorker(toy, "s0", toy_compute, ready=False)
        with fake_workers(worker):
            time.sleep(3 * HEARTBEAT_S)
            assert not stub.ServerReady(kpb.ServerReadyRequest(), timeout=5).ready  # alive but not warm
            with pytest.raises(grpc.RpcError) as excinfo:
                stub.ModelInfer(raw_request("toy", toy_inputs(1)), timeout=10)
            assert "not ready" in excinfo.value.details()
            worker.ready = True
            wait_ready(stub)
            assert stub.ModelReady(kpb.ModelReadyRequest(name="toy"), timeout=5).ready
            stub.ModelInfer(raw_request("toy", toy_inputs(1)), timeout=5)
            # heartbeats stop: not ready after three intervals, and UNAVAILABLE naming the shard
            worker.heartbeat = False
            assert wait_until(lambda: not stub.ServerReady(kpb.ServerReadyRequest(), timeout=1).ready, 5)
            with pytest.raises(grpc.RpcError) as excinfo:
                stub.ModelInfer(raw_request("toy", toy_inputs(1)), timeout=10)
            assert _code(excinfo) == grpc.StatusCode.UNAVAILABLE
            assert "'s0' (last heartbeat" in excinfo.value.details()
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.ModelReady(kpb.ModelReadyRequest(name="other"), timeout=5)
        assert _code(excinfo) == grpc.StatusCode.NOT_FOUND


def test_in_flight_requests_end_when_a_shard_goes_down_or_restarts(toy: Topology) -> None:
    worker = FakeWorker(toy, "s0", toy_compute, mode="silent")
    # retries=0: fail at once (the default retries once the shard is back: tests/soak/test_faults.py)
    with IngressThread(toy, retries=0) as ing, fake_workers(worker), ing.stub() as stub:
        wait_ready(stub)
        # heartbeat lost while a request is in flight
        future = stub.ModelInfer.future(raw_request("toy", toy_inputs(1)), timeout=20)
        assert wait_until(lambda: worker.requests == 1)
        started = time.monotonic()
        worker.heartbeat = False
        with pytest.raises(grpc.RpcError) as excinfo:
            future.result(timeout=5)
        assert _code(excinfo) == grpc.StatusCode.UNAVAILABLE
        assert "'s0'" in excinfo.value.details() and "went down" in excinfo.value.details()
        assert time.monotonic() - started < 2.0
        # comes back with a new pid while a request is in flight
        worker.heartbeat = True
        wait_ready(stub)
        future = stub.ModelInfer.future(raw_request("toy", toy_inputs(1)), timeout=20)
        assert wait_until(lambda: worker.requests == 2)
        worker.pid += 1
        with pytest.raises(grpc.RpcError) as excinfo:
            future.result(timeout=5)
        assert _code(excinfo) == grpc.StatusCode.UNAVAILABLE
        assert "restarted" in excinfo.value.details()
        assert ing.pending() == 0


# ------------------------------------------------------------- failures
def test_deadline_exceeded(toy: Topology) -> None:
    worker = FakeWorker(toy, "s0", toy_compute, mode="silent")
    with IngressThread(toy, timeout_s=0.3) as ing, fake_workers(worker), ing.stub() as stub:
        wait_ready(stub)
        # the client's deadline
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.ModelInfer(raw_request("toy", toy_inputs(1)), timeout=0.5)
        assert _code(excinfo) == grpc.StatusCode.DEADLINE_EXCEEDED
        # no client deadline: the ingress's --timeout, with its own message
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.ModelInfer(raw_request("toy", toy_inputs(1)))
        assert _code(excinfo) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "deadline" in excinfo.value.details() and "['y']" in excinfo.value.details()
        assert time.monotonic() - started < 2.0
        assert wait_until(lambda: ing.pending() == 0, 2)
        # the deadline travels in the envelope
        assert worker.requests == 2


def test_shard_error_maps_to_its_status(toy: Topology) -> None:
    worker = FakeWorker(toy, "s0", toy_compute, mode="error", error_code=grpc.StatusCode.INVALID_ARGUMENT)
    with IngressThread(toy) as ing, fake_workers(worker), ing.stub() as stub:
        wait_ready(stub)
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.ModelInfer(raw_request("toy", toy_inputs(1)), timeout=5)
        assert _code(excinfo) == grpc.StatusCode.INVALID_ARGUMENT
        assert excinfo.value.details() == "s0: s0 cannot compute this"
        worker.error_code = grpc.StatusCode.INTERNAL
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.ModelInfer(raw_request("toy", toy_inputs(1)), timeout=5)
        assert _code(excinfo) == grpc.StatusCode.INTERNAL
        worker.mode = "bad_shape"
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.ModelInfer(raw_request("toy", toy_inputs(2)), timeout=5)
        assert _code(excinfo) == grpc.StatusCode.INTERNAL
        assert "'y'" in excinfo.value.details() and "[7, 7]" in excinfo.value.details()
        assert ing.pending() == 0


def test_duplicate_results_are_ignored(toy: Topology) -> None:
    worker = FakeWorker(toy, "s0", toy_compute, mode="twice")
    with IngressThread(toy) as ing, fake_workers(worker), ing.stub() as stub:
        wait_ready(stub)
        for seed in range(3):
            inputs = toy_inputs(1, seed)
            out = outputs_of(stub.ModelInfer(raw_request("toy", inputs), timeout=5))
            np.testing.assert_array_equal(out["y"], toy_compute(inputs)["y"])
        assert wait_until(lambda: ing.in_loop(lambda: ing.ingress.table.ignored["unknown_request"]) == 3, 2)
        assert ing.pending() == 0


def test_max_inflight(toy: Topology) -> None:
    worker = FakeWorker(toy, "s0", toy_compute, mode="silent")
    with IngressThread(toy, max_inflight=2) as ing, fake_workers(worker), ing.stub() as stub:
        wait_ready(stub)
        held = [stub.ModelInfer.future(raw_request("toy", toy_inputs(1)), timeout=20) for _ in range(2)]
        assert wait_until(lambda: ing.pending() == 2)
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.ModelInfer(raw_request("toy", toy_inputs(1)), timeout=10)
        assert _code(excinfo) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "at most 2 requests in flight" in excinfo.value.details()
        assert time.monotonic() - started < 1.0
        for future in held:
            future.cancel()
        assert wait_until(lambda: ing.pending() == 0, 2)  # cancelled calls leave nothing behind


# ------------------------------------------------------ metadata and health
def test_metadata_config_statistics_reflection(toy: Topology) -> None:
    with IngressThread(toy) as ing, fake_workers(FakeWorker(toy, "s0", toy_compute)), ing.stub() as stub:
        wait_ready(stub)
        meta = stub.ModelMetadata(kpb.ModelMetadataRequest(name="toy"), timeout=5)
        assert meta.name == "toy" and list(meta.versions) == ["1"] and meta.platform == "keras_pipeline"
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 4]), ("ids", "INT64", [-1, 2])]
        assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [("y", "FP32", [-1, 3])]
        assert stub.ModelMetadata(kpb.ModelMetadataRequest(), timeout=5).name == "toy"
        with pytest.raises(grpc.RpcError) as excinfo:
            stub.ModelMetadata(kpb.ModelMetadataRequest(name="nope"), timeout=5)
        assert _code(excinfo) == grpc.StatusCode.NOT_FOUND

        config = stub.ModelConfig(kpb.ModelConfigRequest(name="toy"), timeout=5).config
        assert config.name == "toy" and config.platform == "keras_pipeline"
        assert config.max_batch_size == ing.config.max_batch_size
        assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
            ("x", mcpb.TYPE_FP32, [4]),
            ("ids", mcpb.TYPE_INT64, [2]),
        ]
        assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [("y", mcpb.TYPE_FP32, [3])]
        assert list(config.dynamic_batching.preferred_batch_size) == [8]

        server = stub.ServerMetadata(kpb.ServerMetadataRequest(), timeout=5)
        assert server.name == "keras-pipeline" and "statistics" in server.extensions

        stub.ModelInfer(raw_request("toy", toy_inputs(4)), timeout=5)
        stats = stub.ModelStatistics(kpb.ModelStatisticsRequest(name="toy"), timeout=5).model_stats[0]
        assert (stats.inference_count, stats.execution_count) == (4, 1)
        assert stats.inference_stats.success.count == 1 and stats.inference_stats.success.ns > 0
        assert stats.inference_stats.compute_infer.count == 1
        assert [b.batch_size for b in stats.batch_stats] == [4]
        assert stats.last_inference > 0

        channel = grpc.insecure_channel(ing.target)
        try:
            refl = reflection_pb2_grpc.ServerReflectionStub(channel)
            answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
            services = {s.name for s in answers[0].list_services_response.service}
            assert {"inference.GRPCInferenceService", "grpc.health.v1.Health"} <= services
        finally:
            channel.close()


def test_health_service(toy: Topology) -> None:
    ing = IngressThread(toy)
    with ing:
        channel = grpc.insecure_channel(ing.target)
        try:
            health = health_pb2_grpc.HealthStub(channel)

            def status(service: str = "") -> int:
                return health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status

            assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
            worker = FakeWorker(toy, "s0", toy_compute)
            with fake_workers(worker):
                assert wait_until(lambda: status() == health_pb2.HealthCheckResponse.SERVING)
                assert status("inference.GRPCInferenceService") == health_pb2.HealthCheckResponse.SERVING
                worker.heartbeat = False
                assert wait_until(lambda: status() == health_pb2.HealthCheckResponse.NOT_SERVING, 5)
                worker.heartbeat = True
                assert wait_until(lambda: status() == health_pb2.HealthCheckResponse.SERVING)
                # shutdown: NOT_SERVING first, seen by a watcher before the server goes away
                watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
                assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
                seen: list[int] = []
                reader = threading.Thread(target=lambda: seen.extend(m.status for m in _drain(watch)), daemon=True)
                reader.start()
                ing.call(ing.ingress.stop(0.5))
                reader.join(WAIT_S)
                assert seen and seen[0] == health_pb2.HealthCheckResponse.NOT_SERVING
        finally:
            channel.close()


def _drain(stream: Iterator[health_pb2.HealthCheckResponse]) -> Iterator[health_pb2.HealthCheckResponse]:
    try:
        yield from stream
    except grpc.RpcError:
        return


# ------------------------------------------------------------- subprocess
def test_subprocess_serves_then_drains_on_sigterm(toy: Topology) -> None:
    env = {**env_without_pipeline_vars(), "PIPELINE_INGRESS_TIMEOUT": "5", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline.serving.ingress", str(toy.directory), "--address", "127.0.0.1:0"],
        cwd=ROOT,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    worker = FakeWorker(toy, "s0", toy_compute, delay_s=0.5)
    try:
        port = _read_port(proc)
        with fake_workers(worker):
            channel = grpc.insecure_channel(f"127.0.0.1:{port}")
            try:
                from pipeline.pb import grpc_service_pb2_grpc as kpb_grpc

                stub = kpb_grpc.GRPCInferenceServiceStub(channel)
                wait_ready(stub)
                inputs = toy_inputs(2)
                future = stub.ModelInfer.future(raw_request("toy", inputs), timeout=10)
                assert wait_until(lambda: worker.requests == 1)
                proc.send_signal(signal.SIGTERM)  # the request in flight still completes (0.5 s < 3 s drain)
                np.testing.assert_array_equal(outputs_of(future.result(timeout=5))["y"], toy_compute(inputs)["y"])
            finally:
                channel.close()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        if proc.stderr:
            proc.stderr.close()


def _read_port(proc: subprocess.Popen[str]) -> int:
    assert proc.stderr is not None
    deadline = time.monotonic() + 30
    lines = []
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        if not line:
            if proc.poll() is not None:
                break
            continue
        lines.append(line)
        if "ingress_started" in line:
            return int(json.loads(line)["port"])
    raise AssertionError(f"the ingress did not report its port; its output: {''.join(lines)}")


def test_port_taken_is_a_usage_error(toy: Topology) -> None:
    with IngressThread(toy) as ing:
        from pipeline.errors import UsageError
        from pipeline.serving.ingress import create_server

        import dataclasses

        config = dataclasses.replace(ing.config, address=ing.target, results_bind=toy.ingress.results.replace("ingress.ipc", "other.ipc"))
        with pytest.raises(UsageError, match="cannot bind the gRPC address"):
            ing.call(create_server(toy, config))


def test_env_and_command_line_precedence(toy: Topology) -> None:
    import argparse

    from pipeline.serving.ingress import IngressConfig, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    env = {"PIPELINE_INGRESS_TIMEOUT": "7", "PIPELINE_INGRESS_MAX_INFLIGHT": "9", "PIPELINE_INGRESS_ADDRESS": "127.0.0.1:9"}
    config = IngressConfig.resolve(toy, parser.parse_args([str(toy.directory), "--max-inflight", "5"]), env)
    assert (config.timeout_s, config.max_inflight, config.address) == (7.0, 5, "127.0.0.1:9")
    config = IngressConfig.resolve(toy, parser.parse_args([str(toy.directory)]), {})
    assert config.address == "127.0.0.1:0"  # from the topology
    assert config.max_message_bytes == 64 << 20 and config.down_after_s == pytest.approx(3 * HEARTBEAT_S)
    config = IngressConfig.resolve(toy, None, {"PIPELINE_HEARTBEAT_INTERVAL_S": "2"})
    assert config.down_after_s == pytest.approx(6.0)


# ------------------------------------------------------------- pipeline infer
def _infer_args(*argv: str) -> "argparse.Namespace":
    import argparse

    from pipeline.serving import client

    parser = argparse.ArgumentParser()
    client.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_pipeline_infer_prints_summary_and_errors(toy: Topology, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.serving import client

    with IngressThread(toy) as ing, fake_workers(FakeWorker(toy, "s0", toy_compute)), ing.stub() as stub:
        # not ready yet or ready: wait, then infer with random inputs and timings
        wait_ready(stub)
        assert client.run(_infer_args("--target", ing.target, "--random", "--batch", "2", "--timing")) == 0
        out = capsys.readouterr().out
        assert "output y: shape [2, 3] datatype FP32" in out
        assert "[0] top-3:" in out and "[1] top-3:" in out
        assert "latency" in out and "span s0.compute" in out
        # from a file, with an explicit model: the printed scores are the model's
        inputs = toy_inputs(1, seed=3)
        np.savez(tmp_path / "in.npz", **inputs)
        assert client.run(_infer_args("--target", ing.target, "--model", "toy", "--input", str(tmp_path / "in.npz"))) == 0
        out = capsys.readouterr().out
        y = toy_compute(inputs)["y"][0]
        best = int(np.argmax(y))
        assert f"top-3: {best}: {y[best]:.4f}" in out
        # a gRPC error: status code and message, exit status 1
        assert client.run(_infer_args("--target", ing.target, "--model", "nope")) == 1
        err = capsys.readouterr().err
        assert "NOT_FOUND" in err and "'nope'" in err
