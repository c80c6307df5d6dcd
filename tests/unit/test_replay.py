"""Replay files, the bounded recorder, the record input sources, and the soak's pure logic (no sockets)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

from pipeline.pb import grpc_service_pb2 as kpb
from pipeline import oracle
from pipeline.soak import chart, record, replay
from pipeline.soak import soak as soak_mod
from pipeline.topology import IngressSpec, ShardOutput, ShardSpec, TensorSpec, Topology

INPUTS = [("x", "float32"), ("ids", "int64")]
OUTPUTS = [("y", "float32"), ("h", "bfloat16")]


def _request(batch: int, seed: int) -> replay.Request:
    rng = np.random.default_rng(seed)
    return replay.Request(
        inputs={"x": rng.standard_normal((batch, 4)).astype(np.float32), "ids": rng.integers(0, 9, (batch, 2))},
        outputs={"y": rng.standard_normal((batch, 3)).astype(np.float32), "h": rng.standard_normal((batch, 2)).astype(ml_dtypes.bfloat16)},
    )


# ------------------------------------------------------------------ format
def test_round_trip_keeps_every_array_bit_for_bit(tmp_path: Path) -> None:
    requests = [_request(b, seed) for seed, b in enumerate((1, 3, 2))]  # batch sizes may differ
    path = replay.write(tmp_path / "r.npz", "toy", INPUTS, OUTPUTS, requests, source="unit test")
    loaded = replay.load(path)
    assert loaded.model == "toy" and len(loaded) == 3 and loaded.version == replay.FORMAT_VERSION
    assert loaded.input_names == ("x", "ids") and loaded.output_names == ("y", "h")
    assert loaded.output_dtypes == ("float32", "bfloat16") and loaded.reference == "model.keras"
    assert loaded.source == "unit test" and loaded.created
    for want, got in zip(requests, loaded.requests):
        for group in ("inputs", "outputs"):
            for name, array in getattr(want, group).items():
                other = getattr(got, group)[name]
                assert other.dtype == array.dtype and other.shape == array.shape
                assert other.tobytes() == array.tobytes()
    assert not (tmp_path / "r.npz.partial").exists()


def test_the_file_reads_with_numpy_alone(tmp_path: Path) -> None:
    requests = [_request(2, 0), _request(1, 1)]
    path = replay.write(tmp_path / "r.npz", "toy", INPUTS, OUTPUTS, requests)
    # exactly what docs/SOAK.md shows: no pickle, no project code
    with np.load(path, allow_pickle=False) as z:
        assert str(z["format"]) == "keras-pipeline-replay" and int(z["version"]) == 1
        assert int(z["count"]) == 2 and list(z["input_names"]) == ["x", "ids"]
        np.testing.assert_array_equal(z["in/1/0"], requests[1].inputs["x"])
        np.testing.assert_array_equal(z["out/0/0"], requests[0].outputs["y"])
        assert z["out/0/1"].dtype == np.uint16  # bfloat16 as its bit pattern
        assert z["out/0/1"].tobytes() == requests[0].outputs["h"].tobytes()
    with zipfile.ZipFile(path) as zf:
        assert all(info.compress_type == zipfile.ZIP_STORED for info in zf.infolist())


def test_bad_files_are_usage_errors_that_say_why(tmp_path: Path) -> None:
    with pytest.raises(replay.ReplayError, match="does not exist"):
        replay.load(tmp_path / "missing.npz")
    np.save(tmp_path / "one.npy", np.zeros(3))
    with pytest.raises(replay.ReplayError, match="single array"):
        replay.load(tmp_path / "one.npy")
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    with pytest.raises(replay.ReplayError, match="not a replay file"):
        replay.load(tmp_path / "junk.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(replay.ReplayError, match="missing member 'format'"):
        replay.load(tmp_path / "other.npz")
    path = replay.write(tmp_path / "r.npz", "toy", INPUTS, OUTPUTS, [_request(1, 0)])
    with np.load(path) as z:
        members = {k: z[k] for k in z.files}
    np.savez(tmp_path / "v2.npz", **{**members, "version": np.array(2)})
    with pytest.raises(replay.ReplayError, match="version 2 is not supported; expected 1"):
        replay.load(tmp_path / "v2.npz")
    del members["in/0/1"]
    np.savez(tmp_path / "cut.npz", **members)
    with pytest.raises(replay.ReplayError, match="missing member 'in/0/1'"):
        replay.load(tmp_path / "cut.npz")


def test_the_writer_refuses_a_tensor_of_another_dtype_and_leaves_no_file(tmp_path: Path) -> None:
    bad = _request(1, 0)
    bad.inputs["x"] = bad.inputs["x"].astype(np.float64)
    with pytest.raises(replay.ReplayError, match="'x' should be float32, received float64"):
        replay.write(tmp_path / "r.npz", "toy", INPUTS, OUTPUTS, [_request(1, 1), bad])
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- recorder
def test_recorder_stops_at_its_count_and_completes_the_file(tmp_path: Path) -> None:
    rec = replay.ReplayRecorder(tmp_path / "live.npz", "toy", INPUTS, OUTPUTS, max_count=2)
    sent = [_request(1, s) for s in range(4)]
    accepted = [rec.offer(r.inputs, r.outputs) for r in sent]
    assert accepted == [True, True, False, False] and rec.stopped_reason == "max_count"
    rec.close()
    loaded = replay.load(tmp_path / "live.npz")
    assert len(loaded) == 2 and loaded.reference == "pipeline"
    assert loaded.requests[1].inputs["x"].tobytes() == sent[1].inputs["x"].tobytes()
    assert rec.snapshot()["record.accepted"] == 2 and rec.snapshot()["record.recording"] == 0.0


def test_recorder_stops_before_its_byte_budget(tmp_path: Path) -> None:
    one = _request(4, 0)
    size = one.nbytes
    rec = replay.ReplayRecorder(tmp_path / "live.npz", "toy", INPUTS, OUTPUTS, max_count=100, max_bytes=int(2.5 * size))
    assert [rec.offer(one.inputs, one.outputs) for _ in range(4)] == [True, True, False, False]
    assert rec.stopped_reason == "max_bytes" and rec.accepted_bytes == 2 * size
    rec.close()
    assert len(replay.load(tmp_path / "live.npz")) == 2


def test_recorder_closed_early_writes_what_it_has(tmp_path: Path) -> None:
    rec = replay.ReplayRecorder(tmp_path / "live.npz", "toy", INPUTS, OUTPUTS)
    r = _request(1, 0)
    assert rec.offer(r.inputs, r.outputs)
    rec.close()
    assert rec.stopped_reason == "closed" and not rec.offer(r.inputs, r.outputs)
    assert len(replay.load(tmp_path / "live.npz")) == 1


# ------------------------------------------------------------ record inputs
def _image_topology(tmp_path: Path, dtype: str = "float32") -> Topology:
    spec = TensorSpec("image", dtype, (-1, 6, 5, 3))
    out = TensorSpec("p", "float32", (-1, 2))
    return Topology(
        name="img",
        inputs=(spec,),
        outputs=(out,),
        tensors={"image": spec, "p": out},
        shards=(ShardSpec("s0", "s0.keras", ("image",), (ShardOutput("p", ("ingress",)),), "ipc:///tmp/x", "127.0.0.1", "ipc:///tmp/x"),),
        ingress=IngressSpec("127.0.0.1:0", "ipc:///tmp/y", "127.0.0.1", "ipc:///tmp/y"),
        directory=tmp_path,
    )


def test_images_are_resized_to_the_input_and_cycled(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    Image.new("RGB", (40, 30), (255, 0, 0)).save(folder / "a.png")
    Image.new("L", (7, 9), 128).save(folder / "b.jpg")
    (folder / "notes.txt").write_text("not an image")
    batches = record.image_inputs(_image_topology(tmp_path), folder, batch=3)
    first, second = next(batches), next(batches)
    assert first["image"].shape == (3, 6, 5, 3) and first["image"].dtype == np.float32
    np.testing.assert_array_equal(first["image"][0, :, :, 0], 255)  # a.png, red
    assert abs(float(first["image"][1].mean()) - 128) < 2  # b.jpg, grey, made RGB
    np.testing.assert_array_equal(first["image"][2], first["image"][0])  # cycled
    np.testing.assert_array_equal(second["image"][0], first["image"][1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(record.UsageError, match="holds no image"):
        next(record.image_inputs(_image_topology(tmp_path), tmp_path / "empty", batch=1))


def test_npy_rows_are_taken_in_order_and_checked(tmp_path: Path) -> None:
    rows = np.arange(3 * 6 * 5 * 3, dtype=np.float64).reshape(3, 6, 5, 3)
    np.save(tmp_path / "rows.npy", rows)
    batches = record.array_inputs(_image_topology(tmp_path), tmp_path / "rows.npy", batch=2)
    a, b = next(batches), next(batches)
    assert a["image"].dtype == np.float32  # cast to the declared dtype
    np.testing.assert_array_equal(a["image"], rows[[0, 1]])
    np.testing.assert_array_equal(b["image"], rows[[2, 0]])
    np.save(tmp_path / "bad.npy", np.zeros((2, 5, 5, 3)))
    with pytest.raises(record.UsageError, match=r"expects shape \[-1, 6, 5, 3\], received rows of \[5, 5, 3\]"):
        next(record.array_inputs(_image_topology(tmp_path), tmp_path / "bad.npy", batch=1))


# --------------------------------------------------------------- soak logic
def _response(**arrays: np.ndarray) -> kpb.ModelInferResponse:
    from pipeline.serving import kserve

    response = kpb.ModelInferResponse(model_name="toy")
    for name, array in arrays.items():
        response.outputs.add(name=name, datatype=kserve.kserve_datatype(array.dtype.name), shape=list(array.shape))
        response.raw_output_contents.append(np.ascontiguousarray(array).tobytes())
    return response


def test_answers_are_compared_bitwise_by_default() -> None:
    y = np.array([[0.1, 0.2, np.nan]], dtype=np.float32)
    assert soak_mod.compare({"y": y}, _response(y=y.copy())) == (True, None)
    near = y + np.float32(1e-7)
    ok, detail = soak_mod.compare({"y": y}, _response(y=near))
    assert not ok and detail["output"] == "y" and 0 < detail["max_abs_diff"] < 1e-6
    assert soak_mod.compare({"y": y}, _response(y=near), tolerance=1e-6)[0]  # NaN matches NaN in place
    ok, detail = soak_mod.compare({"y": y}, _response(y=y.reshape(3, 1)))
    assert not ok and "expected float32[1, 3], received float32[3, 1]" in detail["problem"]
    ok, detail = soak_mod.compare({"y": y}, _response(z=y))
    assert not ok and "missing" in detail["problem"]
    ok, detail = soak_mod.compare({"y": y}, _response(y=np.where(np.isnan(y), 1.0, y).astype(np.float32)), tolerance=1.0)
    assert not ok and detail["max_abs_diff"] == "inf"  # NaN against a number is never within a tolerance


def test_percentiles_are_nearest_rank() -> None:
    values = list(range(1, 101))
    p = soak_mod.percentiles(values)
    assert (p["p50"], p["p95"], p["p99"], p["max"], p["mean"]) == (50, 95, 99, 100, 50.5)
    assert soak_mod.percentiles([])["p99"] == 0.0


def test_memory_growth_uses_windows_after_the_warm_up_and_the_last_pid() -> None:
    mib = 1 << 20
    flat = [(t, 7, 500 * mib + (3 * mib if t % 5 == 0 else 0)) for t in range(0, 60)]  # noise, no growth
    g = soak_mod.memory_growth(flat, warmup_s=10, end_s=60, interval_s=1)
    assert g is not None and abs(g["growth_bytes"]) <= 3 * mib and g["pid"] == 7
    leak = [(t, 7, 500 * mib + t * 2 * mib) for t in range(0, 60)]
    g = soak_mod.memory_growth(leak, warmup_s=10, end_s=60, interval_s=1)
    assert g is not None and 80 * mib < g["growth_bytes"] < 100 * mib
    restarted = [(t, 7 if t < 30 else 8, (900 if t < 30 else 400) * mib) for t in range(0, 60)]
    g = soak_mod.memory_growth(restarted, warmup_s=10, end_s=60, interval_s=1)
    assert g is not None and g["pid"] == 8 and g["growth_bytes"] == 0
    # a worker restarted at t=30 ramps up while it loads and warms up again (as after a SIGKILL):
    # that ramp is its warm-up, not a leak; a leak after it still counts
    ramp = [(t, 7 if t < 30 else 8, (600 if t < 30 else min(520 + 10 * (t - 30), 600)) * mib) for t in range(0, 60)]
    g = soak_mod.memory_growth(ramp, warmup_s=10, end_s=60, interval_s=1)
    assert g is not None and g["pid"] == 8 and g["growth_bytes"] == 0
    leak_after = [(t, 7 if t < 30 else 8, (600 if t < 30 else 600 + 5 * max(0, t - 40)) * mib) for t in range(0, 60)]
    g = soak_mod.memory_growth(leak_after, warmup_s=10, end_s=60, interval_s=1)
    assert g is not None and g["growth_bytes"] > 30 * mib
    assert soak_mod.memory_growth([(1, 7, 5)], warmup_s=10, end_s=60, interval_s=1) is None


def test_the_report_fails_on_wrong_lost_and_memory_and_the_chart_draws_it(tmp_path: Path) -> None:
    requests = [_request(1, 0), _request(1, 1)]
    rp = replay.Replay("toy", ("x", "ids"), ("float32", "int64"), ("y", "h"), ("float32", "bfloat16"), tuple(requests), "model.keras")
    config = soak_mod.SoakConfig(target="127.0.0.1:1", replay=tmp_path / "r.npz", duration_s=20, interval_s=1, max_rss_growth_mib=64)
    s = soak_mod.Soak(config, rp)
    s.started = 0.0
    s.ended_s = 20.0
    for t in range(20):
        s._count(0, "correct", 10.0 + t, t + 0.5, None)
    s._count(0, "UNAVAILABLE", 1.0, 3.5, "shard went down")
    s.totals["sent"] = 21
    mib = 1 << 20
    s.memory = {"ingress": [(t, 1, 80 * mib) for t in range(21)], "s0": [(t, 2, 500 * mib + t * 8 * mib) for t in range(21)]}
    report = s.report()
    assert report["totals"]["correct"] == 20 and report["totals"]["errors"] == {"UNAVAILABLE": 1}
    assert report["warmup_s"] == 5.0  # 20 % of 20 s, at least 5 s
    assert len(report["intervals"]) == 20 and report["intervals"][3]["errors"] == 1
    assert report["memory"]["failed"] == ["s0"] and not report["verdict"]["ok"]
    assert any("s0 memory grew" in r for r in report["verdict"]["reasons"])
    json.dumps(report, allow_nan=False)  # what --report writes
    s._count(0, "wrong", 12.0, 5.0, {"output": "y", "problem": "values differ", "max_abs_diff": 0.5})
    s._count(0, "lost", 15000.0, 19.0, None)
    report = s.report()
    assert {"1 wrong answers", "1 lost requests"} <= set(report["verdict"]["reasons"])
    assert report["wrong_examples"][0]["request"] == 0
    text = soak_mod.summary(report)
    assert "FAILED" in text and "correct 20, wrong 1, lost 1" in text
    png = chart.render(report, tmp_path / "chart.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("command", ["record", "soak"])
def test_help_of_the_commands(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline import cli

    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0 and f"pipeline {command}" in capsys.readouterr().out


def test_the_soak_refuses_a_replay_whose_answers_do_not_depend_on_the_input(tmp_path: Path) -> None:
    """The guard: a soak against a model that answers the same for every input proves nothing."""
    a, b = _request(1, 0), _request(1, 1)
    same = replay.Request(b.inputs, {k: v.copy() for k, v in a.outputs.items()})
    rp = replay.Replay("toy", ("x", "ids"), ("float32", "int64"), ("y", "h"), ("float32", "bfloat16"), (a, same), "model.keras")
    config = soak_mod.SoakConfig(target="127.0.0.1:1", replay=tmp_path / "r.npz", duration_s=1)
    with pytest.raises(oracle.NotDiscriminating, match="do not depend on the input"):
        soak_mod.Soak(config, rp)
    allowed = soak_mod.Soak(soak_mod.SoakConfig(target="127.0.0.1:1", replay=tmp_path / "r.npz", duration_s=1, allow_input_independent=True), rp)
    assert allowed.oracle["warning"] and "WARNING" in allowed.oracle["description"]


def test_the_soak_takes_the_replays_batching_tolerance(tmp_path: Path) -> None:
    requests = (_request(1, 0), _request(2, 1))
    rp = replay.Replay("toy", ("x", "ids"), ("float32", "int64"), ("y", "h"), ("float32", "bfloat16"), requests, "model.keras", tolerance=1e-7, tolerance_measured=1e-8)
    s = soak_mod.Soak(soak_mod.SoakConfig(target="127.0.0.1:1", replay=tmp_path / "r.npz", duration_s=1), rp)
    assert s.tolerance == 1e-7 and s.oracle["kind"].startswith("batching tolerance") and s.oracle["margin"] > 1
    explicit = soak_mod.Soak(soak_mod.SoakConfig(target="127.0.0.1:1", replay=tmp_path / "r.npz", duration_s=1, tolerance=0.0), rp)
    assert explicit.tolerance == 0.0 and explicit.oracle["kind"] == "bitwise"


def test_the_tolerance_round_trips_through_the_file(tmp_path: Path) -> None:
    with replay.ReplayWriter(tmp_path / "r.npz", "toy", INPUTS, OUTPUTS, reference=replay.REFERENCE_MODEL) as writer:
        writer.add(_request(1, 0).inputs, _request(1, 0).outputs)
        writer.tolerance, writer.tolerance_measured = 2e-8, 2e-9
    loaded = replay.load(tmp_path / "r.npz")
    assert loaded.tolerance == 2e-8 and loaded.tolerance_measured == 2e-9
    assert replay.load(replay.write(tmp_path / "old.npz", "toy", INPUTS, OUTPUTS, [_request(1, 0)])).tolerance is None
