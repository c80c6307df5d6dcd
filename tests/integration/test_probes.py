"""The probe endpoints on the metrics port: ``/ready`` only once the shard is loaded and warm, ``/live`` while it runs.

Real worker processes of the residual test model (one shard, no ingress
needed): one whose warm-up never ends (``--warmup-calls`` far beyond the
test), which must answer ``/ready`` 503 and ``/live`` 200, and one that
warms up, which must answer 200 on both; the metrics keep being served
beside them. The routing itself is checked without sockets.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers_worker import WORKER_START_TIMEOUT_S, start_worker, stop_worker, wait_until  # noqa: E402

from pipeline.launch import free_ports  # noqa: E402
from pipeline.serving import metrics as prom  # noqa: E402

pytestmark = pytest.mark.timeout(2 * WORKER_START_TIMEOUT_S + 60)
HTTP_TIMEOUT_S = 5.0


def get(address: str, path: str) -> tuple[int, str]:
    """(status, body) of ``GET http://address/path``; (0, reason) when nothing answers yet."""
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=HTTP_TIMEOUT_S) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        return 0, str(exc)


# ----------------------------------------------------------------- no sockets
def _call(app, path: str) -> tuple[str, bytes]:  # type: ignore[no-untyped-def]
    seen: list[str] = []
    body = b"".join(app({"PATH_INFO": path, "REQUEST_METHOD": "GET"}, lambda status, headers: seen.append(status)))
    return seen[0], body


def test_probe_routing() -> None:
    state = {"ready": (False, "loading"), "live": (True, "live")}
    probes = prom.Probes(ready=lambda: state["ready"], live=lambda: state["live"])

    def metrics_app(environ, start_response):  # type: ignore[no-untyped-def]
        start_response("200 OK", [])
        return [b"metrics"]

    app = prom.probe_app(metrics_app, probes)
    assert _call(app, "/ready") == ("503 Service Unavailable", b"loading\n")
    assert _call(app, "/readyz")[0].startswith("503")
    for path in ("/live", "/livez", "/healthz"):
        assert _call(app, path) == ("200 OK", b"live\n")
    assert _call(app, "/metrics") == ("200 OK", b"metrics")
    assert _call(app, "/") == ("200 OK", b"metrics")
    state["ready"] = (True, "ready")
    assert _call(app, "/ready") == ("200 OK", b"ready\n")

    def broken() -> tuple[bool, str]:
        raise RuntimeError("boom")

    app = prom.probe_app(metrics_app, prom.Probes(ready=broken, live=broken))
    status, body = _call(app, "/live")
    assert status.startswith("503") and b"RuntimeError: boom" in body
    assert _call(prom.probe_app(metrics_app, None), "/ready")[0] == "404 Not Found"


# ------------------------------------------------------------ real workers
@pytest.fixture(scope="module")
def residual_topology(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import models

    from pipeline.launch import relocate
    from pipeline.partition.command import partition

    root = tmp_path_factory.mktemp("probes")
    source = partition(models.residual(), name="residual", out=root / "source", shards=1, verify=False).topology
    return relocate(source.directory, root / "run").directory


def test_a_warming_worker_is_live_but_not_ready(residual_topology: Path, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    worker = start_worker(residual_topology, "shard0", tmp_path, "--metrics", address, "--warmup-calls", "100000000")
    try:
        status, body = wait_until(
            lambda: (r := get(address, "/ready"))[0] and r, WORKER_START_TIMEOUT_S, "the worker's probe endpoint", 0.05
        )
        assert status == 503, (status, body)
        # it stays so while TensorFlow loads and the (endless) warm-up runs
        wait_until(lambda: "warming up" in get(address, "/ready")[1], WORKER_START_TIMEOUT_S, "a 503 that says why")
        assert get(address, "/ready")[0] == 503
        assert get(address, "/live") == (200, "shard 'shard0' is live\n")
        assert get(address, "/healthz")[0] == 200
        assert get(address, "/metrics")[0] == 200
        assert worker.proc.poll() is None, worker.tail()
    finally:
        stop_worker(worker)


def test_a_warm_worker_is_ready(residual_topology: Path, tmp_path: Path) -> None:
    (port,) = free_ports(1)
    address = f"127.0.0.1:{port}"
    worker = start_worker(residual_topology, "shard0", tmp_path, "--metrics", address)
    try:
        wait_until(lambda: get(address, "/ready")[0] == 200, WORKER_START_TIMEOUT_S, "the worker to say ready")
        assert get(address, "/ready") == (200, "shard 'shard0' is ready\n")
        assert get(address, "/live")[0] == 200
        status, text = get(address, "/metrics")
        assert status == 200 and 'pipeline_shard_ready{shard="shard0"} 1.0' in text
        assert "worker_ready" in worker.text()  # the probe agrees with the worker's own log
    finally:
        code = stop_worker(worker)
    assert code == 0, worker.tail()
