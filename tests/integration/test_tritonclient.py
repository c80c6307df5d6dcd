"""tritonclient.grpc, unchanged, against the live ingress (run from .venv-triton in a subprocess).

tritonclient pins protobuf<7 and ml-dtypes<=0.5.4, which clash with the main
venv, so scripts/triton_env.sh builds a separate venv; the test is skipped
only when that venv cannot be built (no network).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers_ingress import FakeWorker, IngressThread, fake_workers, single_topology, sock_dir, toy_compute, wait_ready  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TRITON_PY = ROOT / ".venv-triton" / "bin" / "python"

pytestmark = pytest.mark.timeout(900)

SCRIPT = r"""
import json, sys
import numpy as np
import tritonclient.grpc as tc

url = sys.argv[1]
client = tc.InferenceServerClient(url=url)
report = {"live": client.is_server_live(), "ready": client.is_server_ready(), "model_ready": client.is_model_ready("toy")}
meta = client.get_model_metadata("toy", as_json=True)
report["inputs"] = [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["inputs"]]
report["outputs"] = [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in meta["outputs"]]
config = client.get_model_config("toy", as_json=True)["config"]
report["backend"] = config.get("backend")
report["config"] = {
    "name": config["name"], "platform": config.get("platform"), "max_batch_size": config.get("max_batch_size"),
    "input": [(i["name"], i["data_type"], [int(d) for d in i["dims"]]) for i in config["input"]],
    "output": [(o["name"], o["data_type"], [int(d) for d in o["dims"]]) for o in config["output"]],
}
x = np.arange(12, dtype=np.float32).reshape(3, 4)
ids = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.int64)
inputs = [tc.InferInput("x", list(x.shape), "FP32"), tc.InferInput("ids", list(ids.shape), "INT64")]
inputs[0].set_data_from_numpy(x)
inputs[1].set_data_from_numpy(ids)
result = client.infer("toy", inputs, outputs=[tc.InferRequestedOutput("y")], request_id="r-1")
report["y"] = result.as_numpy("y").tolist()
report["y_dtype"] = str(result.as_numpy("y").dtype)
report["id"] = result.get_response().id
try:
    client.infer("nope", inputs)
except tc.InferenceServerException as exc:
    report["error"] = [exc.status(), exc.message()]
# more traffic, counted by the caller: batches of 1..4 rows, and requests the ingress refuses
for rows in (1, 2, 4, 1):
    more = [tc.InferInput("x", [rows, 4], "FP32"), tc.InferInput("ids", [rows, 2], "INT64")]
    more[0].set_data_from_numpy(np.ones((rows, 4), np.float32))
    more[1].set_data_from_numpy(np.ones((rows, 2), np.int64))
    client.infer("toy", more)
for _ in range(2):
    bad = [tc.InferInput("x", [1, 5], "FP32"), tc.InferInput("ids", [1, 2], "INT64")]
    bad[0].set_data_from_numpy(np.ones((1, 5), np.float32))
    bad[1].set_data_from_numpy(np.ones((1, 2), np.int64))
    try:
        client.infer("toy", bad)
    except tc.InferenceServerException as exc:
        report.setdefault("bad", []).append(exc.status())
stats = client.get_inference_statistics("toy", as_json=True)["model_stats"][0]
everything = client.get_inference_statistics("", as_json=True)["model_stats"]
report["stats"] = {
    "name": stats["name"],
    "models": [m["name"] for m in everything],
    "inference_count": int(stats.get("inference_count", 0)),
    "execution_count": int(stats.get("execution_count", 0)),
    "last_inference": int(stats.get("last_inference", 0)),
    **{
        f"{key}_{part}": int(stats["inference_stats"].get(key, {}).get(part, 0))
        for key in ("success", "fail", "queue", "compute_input", "compute_infer", "compute_output")
        for part in ("count", "ns")
    },
    "batch_sizes": sorted(int(b["batch_size"]) for b in stats.get("batch_stats", [])),
    "batch_counts": sum(int(b["compute_infer"].get("count", 0)) for b in stats.get("batch_stats", [])),
}
report["dynamic_batching"] = config.get("dynamic_batching", {})
print(json.dumps(report))
"""


def _triton_python() -> Path:
    result = subprocess.run(["bash", str(ROOT / "scripts" / "triton_env.sh")], capture_output=True, text=True, timeout=800)
    if result.returncode != 0 or not TRITON_PY.exists():
        pytest.skip(f"cannot build .venv-triton (no network?): {result.stderr.strip()[-500:]}")
    return TRITON_PY


def test_tritonclient_against_the_ingress(tmp_path: Path) -> None:
    python = _triton_python()
    with sock_dir() as sockets:
        toy = single_topology(tmp_path / "toy", sockets)
        with IngressThread(toy) as ing, fake_workers(FakeWorker(toy, "s0", toy_compute)), ing.stub() as stub:
            wait_ready(stub)
            result = subprocess.run([str(python), "-c", SCRIPT, ing.target], capture_output=True, text=True, timeout=120)
            assert result.returncode == 0, result.stderr
            report = json.loads(result.stdout.strip().splitlines()[-1])

    assert (report["live"], report["ready"], report["model_ready"]) == (True, True, True)
    assert report["inputs"] == [["x", "FP32", [-1, 4]], ["ids", "INT64", [-1, 2]]]
    assert report["outputs"] == [["y", "FP32", [-1, 3]]]
    assert report["config"] == {
        "name": "toy",
        "platform": "keras_pipeline",
        "max_batch_size": ing.config.max_batch_size,
        "input": [["x", "TYPE_FP32", [4]], ["ids", "TYPE_INT64", [2]]],
        "output": [["y", "TYPE_FP32", [3]]],
    }
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    ids = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.int64)
    np.testing.assert_array_equal(np.array(report["y"], np.float32), toy_compute({"x": x, "ids": ids})["y"])
    assert report["y_dtype"] == "float32" and report["id"] == "r-1"
    assert report["error"][0] == "StatusCode.NOT_FOUND" and "'nope'" in report["error"][1]
    assert report["backend"] == "keras_pipeline"
    assert report["dynamic_batching"]["preferred_batch_size"] == [8]  # the shard's max_batch
    assert int(report["dynamic_batching"]["max_queue_delay_microseconds"]) == 2000
    assert report["bad"] == ["StatusCode.INVALID_ARGUMENT"] * 2

    # the statistics count exactly the traffic sent: 5 successes (3 + 1 + 2 + 4 + 1 rows), 2 failures
    # (the request for "nope" named another model), real times for every part
    stats = report["stats"]
    assert stats["name"] == "toy" and stats["models"] == ["toy"]
    assert stats["inference_count"] == 11 and stats["execution_count"] == 5
    assert stats["success_count"] == 5 and stats["fail_count"] == 2
    for key in ("queue", "compute_input", "compute_infer", "compute_output"):
        assert stats[f"{key}_count"] == 5 and stats[f"{key}_ns"] > 0, key
    assert stats["success_ns"] > stats["compute_input_ns"] + stats["compute_infer_ns"] + stats["compute_output_ns"]
    assert stats["fail_ns"] > 0 and stats["last_inference"] > 0
    assert stats["batch_sizes"] == [1, 2, 3, 4] and stats["batch_counts"] == 5
