"""``pipeline top``: the frame from two admin answers, and the command against a live ingress.

The real pipeline (real workers, real stats) is covered by
``test_metrics.py::test_top_once_on_the_real_pipeline``, which shares its
running cluster; here the frame logic is checked on hand-made answers, and
the command end to end against the real ingress with fake shard workers.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers_ingress import (  # noqa: E402
    FakeWorker,
    IngressThread,
    duo_compute_a,
    duo_compute_b,
    fake_workers,
    raw_request,
    sock_dir,
    two_output_topology,
    wait_ready,
)

from pipeline import top  # noqa: E402
from pipeline.pb import admin_pb2 as apb  # noqa: E402
from pipeline.launch import free_ports  # noqa: E402

import numpy as np  # noqa: E402


def _answer(computed: dict[str, int], compute_s: dict[str, float], success: int, fail: int, t_ns: int) -> apb.ProcessesResponse:
    res = apb.ProcessesResponse(model="m", time_ns=t_ns, heartbeat_interval_s=0.5)
    ing = res.processes.add(name="ingress", role="ingress", host="h", pid=1, ready=True, up=True, state="up", rss_bytes=50 << 20)
    ing.stats.update({"success": success, "fail": fail, "pending": 2, "max_inflight": 1024, "codes.OK": success, "codes.UNAVAILABLE": fail})
    for i, name in enumerate(computed):
        p = res.processes.add(
            name=name, role="shard", host="h", pid=10 + i, ready=True, up=True, state="up", rss_bytes=300 << 20,
            heartbeat_age_s=0.2, heartbeats=5,
        )  # fmt: skip
        p.stats.update(
            {
                "computed": computed[name],
                "batches": computed[name] / 2,
                "compute_s": compute_s[name],
                "compute_ms_p50": 10.0 * (i + 1),
                "compute_ms_p99": 12.0 * (i + 1),
                "queued": 3 * i,
                "pending_joins": i,
                "errors": 0,
                "dropped": 0,
            }
        )
    return res


def test_frame_rates_and_the_slowest_shard() -> None:
    prev = top.Sample(_answer({"a": 0, "b": 0}, {"a": 0.0, "b": 0.0}, 0, 0, 0), at=100.0)
    cur = top.Sample(_answer({"a": 40, "b": 40}, {"a": 0.4, "b": 1.6}, 38, 2, 2 * 10**9), at=102.0)
    frame = top.render(cur, prev, target="host:1")
    lines = frame.splitlines()
    assert lines[0].startswith("pipeline top  host:1  model m") and "over 2.0 s" in lines[0]
    ingress = " ".join(lines[1:4])
    assert "req/s 20.0" in ingress and "ok/s 19.0" in ingress and "err/s 1.0" in ingress
    assert "in flight 2/1024" in ingress and "UNAVAILABLE 2" in ingress
    rows = {line.split()[0]: line for line in lines if line.startswith(("a ", "b "))}
    a, b = rows["a"].split(), rows["b"].split()
    assert a[5] == "20.0" and a[6] == "2.0"  # 40 requests in 20 calls over 2 s
    assert a[7] == "10.00" and b[7] == "20.00" and b[8] == "24.00"
    assert a[9] == "20%" and b[9] == "80%"  # 0.4 s and 1.6 s of compute in 2 s
    assert b[10] == "3" and b[11] == "1"  # queued, join
    assert rows["b"].endswith(top.SLOWEST) and not rows["a"].endswith(top.SLOWEST)


def test_shard_rates_are_timed_by_their_heartbeats() -> None:
    prev_answer = _answer({"a": 0}, {"a": 0.0}, 0, 0, 0)
    prev_answer.processes[1].heartbeat_age_s = 0.5  # its stats were 0.5 s old at the first answer
    cur_answer = _answer({"a": 60}, {"a": 0.0}, 60, 0, 2 * 10**9)
    cur_answer.processes[1].heartbeat_age_s = 0.0
    cur_answer.processes[1].heartbeats = 9
    frame = top.render(top.Sample(cur_answer, at=2.0), top.Sample(prev_answer, at=0.0), target="t")
    row = next(line for line in frame.splitlines() if line.startswith("a "))
    assert row.split()[5] == "24.0"  # 60 requests between heartbeats 2.5 s apart, not 2 s


def test_first_frame_has_no_rates_and_a_restart_resets_them() -> None:
    first = top.render(top.Sample(_answer({"a": 5}, {"a": 1.0}, 5, 0, 0), at=1.0), None, target="t")
    row = next(line for line in first.splitlines() if line.startswith("a "))
    assert row.split()[5] == "-" and "req/s -" in first
    prev = top.Sample(_answer({"a": 500}, {"a": 9.0}, 5, 0, 0), at=1.0)
    restarted = _answer({"a": 3}, {"a": 0.1}, 8, 0, 10**9)
    restarted.processes[1].pid = 99  # a new pid: its counters started again
    row = next(line for line in top.render(top.Sample(restarted, at=2.0), prev, target="t").splitlines() if line.startswith("a "))
    assert row.split()[5] == "-"


def test_top_once_against_the_ingress(tmp_path: Path) -> None:
    with sock_dir() as sockets:
        duo = two_output_topology(tmp_path / "duo", sockets)
        workers = (FakeWorker(duo, "a", duo_compute_a), FakeWorker(duo, "b", duo_compute_b))
        with IngressThread(duo) as ing, fake_workers(*workers), ing.stub() as stub:
            wait_ready(stub)
            for i in range(5):
                stub.ModelInfer(raw_request("duo", {"x": np.full((2, 4), i, np.float32)}), timeout=10)
            result = subprocess.run(
                [sys.executable, "-m", "pipeline.cli", "top", "--once", "--interval", "0.3", "--target", ing.target],
                capture_output=True,
                text=True,
                timeout=60,
            )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"pipeline top  {ing.target}  model duo")
    assert "ok 5  failed 0" in result.stdout
    header = next(i for i, line in enumerate(lines) if line.startswith("SHARD"))
    shards = [line.split() for line in lines[header + 1 :]]
    assert [(s[0], s[1], s[3]) for s in shards] == [("a", "up", "4242"), ("b", "up", "4242")]


def test_top_reports_an_unreachable_ingress() -> None:
    (port,) = free_ports(1)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "top", "--once", "--interval", "0.1", "--target", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert f"no answer from the admin service at 127.0.0.1:{port}" in result.stderr and "UNAVAILABLE" in result.stderr


def test_top_rejects_a_bad_interval() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "top", "--once", "--interval", "0"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "--interval must be > 0" in result.stderr


@pytest.mark.parametrize("tty", [False, True])
def test_loop_redraws_until_interrupted(tty: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    answers = iter(
        [top.Sample(_answer({"a": 0}, {"a": 0.0}, 0, 0, 0), 1.0), top.Sample(_answer({"a": 10}, {"a": 0.5}, 10, 0, 10**9), 2.0)]
    )

    class Client:
        def sample(self) -> top.Sample:
            try:
                return next(answers)
            except StopIteration:
                raise KeyboardInterrupt from None

    class Out(io.StringIO):
        def isatty(self) -> bool:
            return tty

    out = Out()
    monkeypatch.setattr(top.time, "sleep", lambda s: None)
    assert top._loop(Client(), "t", 1.0, out) == 0  # type: ignore[arg-type]
    text = out.getvalue()
    assert text.count("pipeline top  t") == 2
    assert (top.CLEAR in text) is tty
