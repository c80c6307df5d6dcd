"""The metric names a PromQL expression reads, and the names the project's registries export.

The parser is deliberately small: it drops string literals, label matchers
``{...}``, range and subquery selectors ``[...]``, the label lists of
``by (...)`` / ``without (...)`` / ``on (...)`` / ``ignoring (...)`` /
``group_left (...)`` / ``group_right (...)``, numbers and Grafana variables;
what is left that is not a function, an aggregation or a keyword is a metric
name.
"""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

#: PromQL functions, aggregations and keywords that may appear in the dashboard's expressions.
NOT_METRICS = frozenset(
    """
    sum avg min max count stddev stdvar topk bottomk quantile count_values group
    rate irate increase delta idelta deriv predict_linear histogram_quantile clamp clamp_min clamp_max
    abs ceil floor round exp ln log2 log10 sqrt time timestamp vector scalar sort sort_desc label_replace
    label_join absent absent_over_time changes resets avg_over_time min_over_time max_over_time
    sum_over_time count_over_time quantile_over_time last_over_time present_over_time
    by without on ignoring group_left group_right bool and or unless offset inf nan
    """.split()
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_BRACES = re.compile(r"\{[^{}]*\}")
_BRACKETS = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLE = re.compile(r"\$\{?\w+\}?")
_IDENT = re.compile(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    text = _STRING.sub(" ", expr)
    text = _VARIABLE.sub(" ", text)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\b\d+(\.\d+)?(e[-+]?\d+)?\b", " ", text)
    return {name for name in _IDENT.findall(text) if name not in NOT_METRICS}


def sample_names(family: str, kind: str) -> set[str]:
    """The series names a metric family of this type is scraped as."""
    if kind == "counter":
        return {f"{family}_total", f"{family}_created"}
    if kind == "histogram":
        return {f"{family}_bucket", f"{family}_count", f"{family}_sum", f"{family}_created"}
    if kind == "summary":
        return {family, f"{family}_count", f"{family}_sum", f"{family}_created"}
    return {family}


def exported_names() -> set[str]:
    """Every series name the ingress's and a worker's registries (pipeline/serving/metrics.py) export."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from helpers_ingress import IngressThread, single_topology

    from pipeline.serving.worker import Worker, load_config

    names: set[str] = set()
    with tempfile.TemporaryDirectory() as d, tempfile.TemporaryDirectory(prefix="plt-", dir="/tmp") as socks:
        t = single_topology(Path(d), socks)
        with IngressThread(t, metrics="none") as ing:
            assert ing.ingress is not None
            for family in ing.ingress.metrics.registry.collect():
                names |= sample_names(family.name, family.type)
        config, t = load_config(argparse.Namespace(directory=Path(d), shard=t.shards[0].name), environ={})
        worker = Worker(config, t)
        try:
            for family in worker.metrics.registry.collect():
                names |= sample_names(family.name, family.type)
        finally:
            worker._close()
    return names
