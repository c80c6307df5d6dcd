"""A real Prometheus server scrapes a real pipeline with the scrape configuration the project generates.

The residual test model in two shards runs as real processes on fresh
127.0.0.1 ports (pipeline.launch); ``python -m pipeline.serving.metrics DIR``
writes the scrape configuration; Debian's ``prometheus`` runs it on a free
port with a temporary storage folder. After N requests, Prometheus's HTTP
API must report ``pipeline_requests_total`` = N (and each shard's count
too), every target up, and every query of the Grafana dashboard must parse
and run.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers_ingress import raw_request  # noqa: E402
from test_dashboard import queries  # noqa: E402

from pipeline.launch import Cluster, free_ports, relocate  # noqa: E402
from pipeline.pb import grpc_service_pb2_grpc as kgrpc  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
N = 37
SCRAPE_INTERVAL_S = 1.0
WAIT_S = 60.0
HTTP_TIMEOUT_S = 5.0


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Any, Cluster]]:
    import models

    from pipeline.partition.command import partition

    root = tmp_path_factory.mktemp("prom")
    source = partition(models.residual(), name="residual", out=root / "source", cuts=["relu_a"], verify=False).topology
    t = relocate(source.directory, root / "run")
    cluster = Cluster(t, root / "logs", common_worker_args=["--threads", "1"])
    try:
        cluster.start()
        yield t, cluster
    finally:
        cluster.stop()


def api(port: int, path: str, **params: str) -> Any:
    url = f"http://127.0.0.1:{port}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT_S) as response:
        body = json.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]


def scalar(port: int, query: str) -> float | None:
    result = api(port, "/api/v1/query", query=query)["result"]
    return float(result[0]["value"][1]) if result else None


@pytest.fixture()
def prometheus(pipeline: tuple[Any, Cluster], tmp_path: Path) -> Iterator[int]:
    if shutil.which("prometheus") is None:
        pytest.skip("Debian's prometheus is not installed (bin/setup installs it)")
    t, _ = pipeline
    config = subprocess.run(
        [sys.executable, "-m", "pipeline.serving.metrics", str(t.directory), "--interval", f"{SCRAPE_INTERVAL_S:g}"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout  # fmt: skip
    (tmp_path / "prometheus.yml").write_text(config)
    (port,) = free_ports(1)
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen(
        [
            "prometheus", f"--config.file={tmp_path / 'prometheus.yml'}", f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn",
        ],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + WAIT_S
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=HTTP_TIMEOUT_S) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus did not get ready"
            time.sleep(0.2)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def wait_value(port: int, query: str, want: float) -> float | None:
    deadline = time.monotonic() + WAIT_S
    value = None
    while time.monotonic() < deadline:
        value = scalar(port, query)
        if value == want:
            return value
        time.sleep(0.5)
    return value


def test_prometheus_reads_back_the_requests_sent(pipeline: tuple[Any, Cluster], prometheus: int) -> None:
    t, cluster = pipeline
    port = prometheus
    deadline = time.monotonic() + WAIT_S
    while len(targets := api(port, "/api/v1/targets")["activeTargets"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)  # the scrape manager takes the configuration a moment after /-/ready
    assert sorted(x["labels"]["pipeline_process"] for x in targets) == ["ingress", "shard0", "shard1"]
    assert wait_value(port, 'count(up{pipeline="residual"} == 1)', 3) == 3, api(port, "/api/v1/targets")
    rng = np.random.default_rng(3)
    with grpc.insecure_channel(cluster.target) as channel:
        stub = kgrpc.GRPCInferenceServiceStub(channel)
        for _ in range(N):
            x = rng.standard_normal((1, 8, 8, 4)).astype(np.float32)
            stub.ModelInfer(raw_request("residual", {"image": x}), timeout=30)
    got = wait_value(port, 'sum(pipeline_requests_total{pipeline="residual",model="residual",code="OK"})', N)
    assert got == N, f"Prometheus says {got} requests, {N} were sent"
    assert scalar(port, 'sum(pipeline_requests_total{pipeline="residual",code!="OK"})') == 0
    for shard in ("shard0", "shard1"):
        assert wait_value(port, f'sum(pipeline_shard_requests_total{{shard="{shard}",code="OK"}})', N) == N
    assert wait_value(port, 'sum(pipeline_request_duration_seconds_count{model="residual"})', N) == N
    print(f"prometheus read back pipeline_requests_total = {got} after {N} requests")

    # every dashboard query parses and runs; the main panels have data
    empty = []
    for expr in queries():
        q = expr.replace("$__rate_interval", "1m").replace("$model", ".*")
        if not api(port, "/api/v1/query", query=q)["result"]:
            empty.append(q)
    assert not [q for q in empty if "pipeline_requests_total" in q and "code!=" not in q], empty
    print(f"{len(queries())} dashboard queries ran; {len(empty)} without data (no drops, restarts, joins pending...): {empty}")
