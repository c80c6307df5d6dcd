"""`pipeline partition --measure`: the model timed in segments in a real child process, the plan balanced on it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.errors import PartitionError, UsageError
from pipeline.partition import measure
from pipeline.partition.command import partition
from tests import models

ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}


def test_measured_plan_records_its_segments(tmp_path: Path) -> None:
    model = tmp_path / "residual.keras"
    models.residual().save(model)
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "partition", str(model), "--shards", "2", "--colocate", "--measure", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    assert "measured on this host (batch 8, " in r.stdout and "meas ms" in r.stdout
    plan = yaml.safe_load((out / "topology.yaml").read_text())["plan"]
    assert "corrected by times measured on this host" in plan["cost_model"]
    segments = plan["measured"]["segments"]
    assert 2 <= len(segments) <= measure.DEFAULT_SEGMENTS
    assert all(s["measured_ms"] > 0 and s["estimated_ms"] > 0 for s in segments)
    assert segments[0]["first"] == plan["shards"][0]["first"] and segments[-1]["last"] == plan["shards"][-1]["last"]
    # the shares are of the corrected costs, whose total is the estimate's
    assert sum(s["share"] for s in plan["shards"]) == pytest.approx(1.0, abs=1e-3)
    # partition verified the shards against the whole model bitwise before writing (it fails otherwise)
    assert len(plan["shards"]) == 2
    shown = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "show", str(out)], capture_output=True, text=True, timeout=120, env=ENV, check=False
    )
    assert shown.returncode == 0, shown.stderr
    conditions = measure.default_conditions(plan_batch=8, shards=2, colocate=True).describe()
    assert plan["measured"]["conditions"] == conditions
    assert f"costs: the estimate corrected by times measured on the host that partitioned ({conditions}, " in shown.stdout
    assert f"{len(segments)} segments; plan.measured in topology.yaml)" in shown.stdout


def test_a_failing_or_slow_measurement_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = models.residual()
    with pytest.raises(PartitionError, match=r"--measure: timing the model's segments failed \(exit [1-9]\d*\):(.|\n)*no_such_module_here"):
        partition(model, name="m", out=tmp_path / "a", shards=2, measure=True, imports=("no_such_module_here",), verify=False)
    monkeypatch.setattr(measure, "CHILD_TIMEOUT_S", 0.01)
    with pytest.raises(PartitionError, match=r"--measure: timing the model's segments took over 0.01 s; stopped"):
        partition(model, name="m", out=tmp_path / "b", shards=2, measure=True, verify=False)
    with pytest.raises(UsageError, match="with --cut the cuts are given"):
        partition(model, name="m", out=tmp_path / "c", cuts=["relu_a"], measure=True, verify=False)
    assert not any(tmp_path.iterdir())  # nothing half-written


def test_segments_carry_masks_and_joins(tmp_path: Path) -> None:
    # a masked LSTM feeding a join: segments take masks and skip tensors from earlier segments, as shards do
    from tests import masked_models

    result = partition(masked_models.masked_join(), name="m", out=tmp_path / "t", shards=3, measure=True)
    segments = result.topology.extra["plan"]["measured"]["segments"]
    assert len(segments) >= 3 and all(s["measured_ms"] > 0 for s in segments)
    # more shards than CPUs: the plan says the measured balance binds less (this machine kind has 2 CPUs)
    cpus = len(os.sched_getaffinity(0))
    assert ("note: 3 shards on" in result.table) == (cpus < 3)
