"""Starting a `pipeline probe serve` peer (on this host or in a namespace) and running `probe` commands, all bounded."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline import process

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
#: the peer prints its bound endpoint once it listens (python and pyzmq start slowly on a busy machine).
PEER_START_TIMEOUT_S = 60.0


def start_peer(log_dir: Path, bind: str = "tcp://127.0.0.1:0", *, netns: str | None = None, extra: Sequence[str] = ()) -> tuple[process.Process, str, str]:
    """``(process, bound endpoint, CURVE public key or "")``; the caller stops the process in a ``finally``."""
    peer = process.start(
        "probe-serve", process.pipeline_command("probe", "serve", "--bind", bind, "--idle-timeout", "120", *extra), log_dir, netns=netns, env=ENV
    )
    deadline = time.monotonic() + PEER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        text = peer.text()
        found = re.search(r"listening on (tcp://\S+)", text)
        if found and ("--curve" not in extra or "CURVE public key:" in text):
            key = re.search(r"CURVE public key: (\S+)", text)
            return peer, found.group(1), key.group(1) if key else ""
        if not peer.alive:
            break
        time.sleep(0.05)
    peer.stop()
    raise AssertionError(f"the probe peer did not listen within {PEER_START_TIMEOUT_S} s\n{peer.tail()}")


def probe(*args: str, netns: str | None = None, timeout_s: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run ``pipeline probe ARGS`` to completion (in ``netns`` when given), output captured."""
    argv = process.command(process.pipeline_command("probe", *args), netns=netns)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=ENV)


def report(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The JSON report a ``--json`` run printed (the run must have succeeded)."""
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))
