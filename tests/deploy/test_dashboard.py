"""The Grafana dashboard (docs/grafana-dashboard.json) reads only metrics the code exports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from promql import exported_names, metric_names  # noqa: E402

DASHBOARD = Path(__file__).resolve().parents[2] / "docs" / "grafana-dashboard.json"


def queries() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["definition"].removeprefix("label_values(").split(",")[0] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def test_the_parser() -> None:
    assert metric_names('sum by (code) (rate(pipeline_requests_total{model=~"$model",code!="OK"}[$__rate_interval]))') == {
        "pipeline_requests_total"
    }
    assert metric_names("histogram_quantile(0.95, sum by (shard, le) (rate(a_bucket[5m]))) / clamp_min(b, 1e-9)") == {"a_bucket", "b"}
    assert metric_names("x and on (instance) (y or z)") == {"x", "y", "z"}


@pytest.fixture(scope="module")
def exported() -> set[str]:
    return exported_names()


def test_every_query_names_an_exported_metric(exported: set[str]) -> None:
    assert {"pipeline_requests_total", "pipeline_shard_compute_duration_seconds_bucket", "pipeline_shard_ready"} <= exported
    exprs = queries()
    assert len(exprs) >= 15
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        unknown = names - exported
        assert not unknown, f"{expr!r} reads {sorted(unknown)}, which the code does not export"
        used |= names
    # and the check can fail: a misspelt name is caught
    assert metric_names("rate(pipeline_request_total[1m])") - exported == {"pipeline_request_total"}
    print(f"{len(exprs)} queries read {len(used)} metrics: {sorted(used)}")
