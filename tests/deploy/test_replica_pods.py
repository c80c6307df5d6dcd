"""Replicas of a shard found by DNS, run as pods: one Deployment with N replicas behind a headless Service.

The residual model's join shard (shard1: fed by the ingress and by shard0) is
given two replicas; ``pipeline deploy kubernetes`` makes it one Deployment
with ``replicas: 2`` behind a headless Service, and the ConfigMap says
``replicas: {count: 2, discover: dns}``. Each replica is a pod in a network
namespace of its own (pods.py), its address from the downward API; the
headless Service's name is one line per ready pod in every hosts file (glibc's
getaddrinfo returns all of them), as cluster DNS answers for a headless
Service. Then:

1. two replicas: answers bitwise the whole model's (one request at a time),
   and both replicas compute (the ingress chooses, shard0 follows its choice);
2. a third pod: started, ready, added to the name: it receives work;
3. one replica SIGKILLed under load and dropped from the name: no wrong
   answer, errors only UNAVAILABLE or DEADLINE_EXCEEDED while it goes, the
   two left take the traffic, and the pipeline answers again.
"""

from __future__ import annotations

import dataclasses
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from netns_lab import NetnsLab  # noqa: E402
from pods import PodRunner  # noqa: E402
from test_pods import (  # noqa: E402,F401  (fixtures: context, reference, lab)
    OPTIONS,
    READY_TIMEOUT_S,
    ROWS,
    answers,
    check_bitwise,
    context,
    ingress_metric,
    lab,
    ok_count,
    reference,
    run_client,
    run_pods,
    wait_ok,
    wait_pipeline_ready,
)

from pipeline import topology as topo  # noqa: E402
from pipeline.launch import free_ports  # noqa: E402
from pipeline.deploy import checks, kubernetes  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
NAME = "residual-replicas"
#: heartbeats (0.5 s) for every producer to resolve the name again and say it reaches the new pods
DNS_SETTLE_S = 2.0


def replicated(ctx: Path) -> topo.Topology:
    """The residual topology with shard1 (the join) in two listed replicas, inside the build context."""
    source = topo.load(ctx / "topology" / "residual")
    dest = ctx / "topology" / NAME
    if not dest.exists():
        dest.mkdir(parents=True)
        for f in [*(s.file for s in source.shards), topo.MODEL_FILE]:
            (dest / f).symlink_to((source.directory / f).resolve())
        port, metrics = free_ports(2)  # replica 1's own addresses (the generator gives every pod its own)
        endpoint = f"tcp://127.0.0.1:{port}"
        extra = (topo.ReplicaSpec(endpoint=endpoint, bind=endpoint, host="127.0.0.1", metrics=f"127.0.0.1:{metrics}"),)
        shards = tuple(dataclasses.replace(s, extra_replicas=extra) if s.name == "shard1" else s for s in source.shards)
        source.replace(directory=dest, shards=shards).write(dest)
    return topo.load(dest)


def computed_when(runner: PodRunner, pod: Any, done: Callable[[float], bool], timeout_s: float = 60.0) -> tuple[str, float]:
    """:func:`computed` once ``done`` holds for the count, or as it is at the deadline (a loaded machine is slow
    to resolve, connect and report a new replica; the caller's assertion then says what was seen)."""
    deadline = time.monotonic() + timeout_s
    while True:
        label, n = computed(runner, pod)
        if done(n) or time.monotonic() > deadline:
            return label, n
        time.sleep(0.5)


def computed(runner: PodRunner, pod: Any) -> tuple[str, float]:
    """(the shard label, requests computed) from one replica pod's own metrics, read at its address."""
    from prometheus_client.parser import text_string_to_metric_families

    ok, text = runner.http_get(f"http://{pod.address}:{kubernetes.METRICS_PORT}/metrics")
    assert ok, text
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "pipeline_shard_requests_total" and s.labels.get("code") == "OK":
                return s.labels["shard"], float(s.value)
    raise AssertionError(f"no pipeline_shard_requests_total in the metrics of {pod.hostname}")


def test_a_replicated_join_found_by_dns(context: Path, reference: Any, lab: NetnsLab, tmp_path: Path) -> None:  # noqa: F811
    x, y = reference
    t = replicated(context)
    objects = kubernetes.manifests(t, OPTIONS)
    assert checks.pod_topology(objects)["shards"][1]["replicas"] == {"count": 2, "discover": "dns"}
    d = next(o for o in objects if o["kind"] == "Deployment" and o["metadata"]["name"] == "residual-shard1")
    assert d["spec"]["replicas"] == 2
    runner = run_pods(objects, context, lab, tmp_path, name=NAME)
    a = runner.pods["shard1"]
    b = runner.replica("shard1", "b")
    runner.members["shard1"] = []  # no pod is ready yet: the name resolves to nothing
    runner.write_hosts()
    try:
        for process in runner.pods:
            runner.start(process)
        runner.start("shard1", b)
        for process in runner.pods:
            runner.wait_ready(process, READY_TIMEOUT_S)
        runner.wait_ready("shard1", READY_TIMEOUT_S, pod=b)
        runner.members["shard1"] = [a, b]  # ready pods join the headless Service's DNS answer
        runner.write_hosts()
        wait_pipeline_ready(runner)
        time.sleep(DNS_SETTLE_S)
        target = str(checks.pod_topology(objects)["ingress"]["grpc"])
        np.savez(tmp_path / "inputs.npz", image=x)

        # 1. two replicas: bitwise, one request at a time; both compute; each is named shard1@<its pod IP>
        result = answers(run_client(lab, tmp_path, "two", target, tmp_path / "inputs.npz", "--count", str(4 * ROWS)), tmp_path)
        assert list(result["codes"]) == ["OK"] * 4 * ROWS, list(result["codes"])
        assert check_bitwise(result, y) == 4 * ROWS
        (label_a, done_a), (label_b, done_b) = computed(runner, a), computed(runner, b)
        assert (label_a, label_b) == (f"shard1@{a.address}", f"shard1@{b.address}")
        assert done_a > 0 and done_b > 0 and done_a + done_b == 4 * ROWS, (done_a, done_b)
        for pod in (a, b):
            assert ingress_metric(runner, f'pipeline_shard_up{{shard="shard1@{pod.address}"}}') == 1.0

        # 2. a third pod: ready, then in the name: it receives work (the others keep theirs)
        stop = tmp_path / "stop"
        client = run_client(lab, tmp_path, "load", target, tmp_path / "inputs.npz", "--until", str(stop))
        log = tmp_path / "load.log"
        wait_ok(log, 20)
        c = runner.replica("shard1", "c")
        runner.start("shard1", c)
        runner.wait_ready("shard1", READY_TIMEOUT_S, pod=c)
        runner.members["shard1"] = [a, b, c]
        runner.write_hosts()
        wait_ok(log, ok_count(log) + 60)
        label_c, done_c = computed_when(runner, c, lambda n: n > 0)  # once the producers resolved it and connected
        assert label_c == f"shard1@{c.address}" and done_c > 0, done_c
        before = {p.hostname: computed(runner, p)[1] for p in (b, c)}

        # 3. one replica killed under load, then dropped from the name: no wrong answer, the others take over
        code = runner.kill("shard1", signal.SIGKILL, pod=a)
        assert code == -signal.SIGKILL
        runner.members["shard1"] = [b, c]
        runner.write_hosts()
        wait_ok(log, ok_count(log) + 60)
        stop.touch()
        result = answers(client, tmp_path)
        codes = list(result["codes"])
        ok = check_bitwise(result, y)
        errors = {k: codes.count(k) for k in sorted(set(codes)) if k != "OK"}
        after = {p.hostname: computed_when(runner, p, lambda n, h=p.hostname: n > before[h])[1] for p in (b, c)}
        print(
            f"replicas found by DNS: two replicas {done_a:.0f}/{done_b:.0f} of {4 * ROWS}; under load {len(codes)} requests, "
            f"{ok} correct, errors {errors}; the third pod computed {done_c:.0f} after joining; after the kill "
            f"{ {h: after[h] - before[h] for h in after} } more on the two left; retries {ingress_metric(runner, 'pipeline_retries_total')}"
        )
        assert set(errors) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, errors
        assert all(code == "OK" for code in codes[-30:]), codes[-40:]
        assert all(after[h] > before[h] for h in after), (before, after)
        assert ingress_metric(runner, f'pipeline_shard_up{{shard="shard1@{a.address}"}}') == 0.0
    finally:
        stopped = runner.stop_all()
    assert {h: c for h, c in stopped.items() if h != a.hostname} == {h: 0 for h in stopped if h != a.hostname}, stopped
