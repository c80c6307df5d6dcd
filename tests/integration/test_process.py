"""The one launcher (pipeline/process.py): logs, group stop, kill after a bound, and a process inside a namespace."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from pipeline import process
from tests.netns import Network, unavailable_reason


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/stat")
    return status.exists() and status.read_text().split()[2] != "Z"


def test_command_puts_the_namespace_then_the_wrapper_before_the_program() -> None:
    assert process.command(["python", "-V"]) == ["python", "-V"]
    assert process.command(["python", "-V"], netns="h1", wrap=["faketime", "-f", "+30s"]) == [
        "ip", "netns", "exec", "h1", "faketime", "-f", "+30s", "python", "-V",
    ]  # fmt: skip
    with pytest.raises(ValueError, match="empty argv"):
        process.command([])


def test_stop_reaches_the_whole_group_and_the_log_keeps_the_output(tmp_path: Path) -> None:
    p = process.start("sh", ["sh", "-c", "echo started; sleep 300 & echo child $!; wait"], tmp_path)
    deadline = time.monotonic() + 30
    while "child" not in p.text() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(p.text().split("child")[1].split()[0])
    assert p.alive and _alive(child)
    assert p.stop(timeout_s=5) == -signal.SIGTERM
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child), "the background child outlived its group's stop"
    assert "started" in p.tail() and f"pid {p.pid}" in p.tail()


def test_a_process_that_ignores_sigterm_is_killed_after_the_bound(tmp_path: Path) -> None:
    code = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(300)"
    p = process.start("stubborn", [sys.executable, "-c", code], tmp_path)
    deadline = time.monotonic() + 30
    while "ready" not in p.text() and time.monotonic() < deadline:
        time.sleep(0.05)
    started = time.monotonic()
    assert process.stop_all([p], timeout_s=1.0) == {"stubborn": -signal.SIGKILL}
    assert time.monotonic() - started < 15


def test_a_process_runs_inside_a_namespace(tmp_path: Path) -> None:
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    with Network(1) as net:
        h1 = net.host("h1")
        p = process.start("ip", ["ip", "-4", "-o", "addr", "show", "dev", "eth0"], tmp_path, netns=h1.netns)
        assert p.wait(30) == 0, p.tail()
        assert "198.18.0.1/24" in p.text() and p.netns == h1.netns
