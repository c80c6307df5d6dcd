"""Static checks a reviewer would otherwise do by hand: undefined names, unused imports, syntax errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_ruff_finds_no_undefined_names_or_unused_imports() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "F,E9", "--exclude", "pipeline/pb", "pipeline", "tests", "scripts"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
