"""The generated manifests run: every pod a process in its own network namespace, as pods/kubelet would run it.

What the pods get is only what the manifests say (pods.py): command, args,
env, the ConfigMap's rewritten topology mounted over the image's copy, the
image's files from the generated Containerfile, the Secret of each process
installed by its init container; Services are names in per-namespace hosts
files. The client runs in a namespace of its own and reaches the pipeline
only through the ingress's Service name. A wrong port, a wrong DNS name, a
missing file or a key in the wrong pod makes these tests fail.

1. plain: answers bitwise equal to the whole model (one request at a time);
2. ``security: curve``: the same, each pod holding only its own key;
3. then a shard's process killed (SIGKILL) under load and started again from
   its manifest: no wrong answer, errors only while it is down, and the
   pipeline answers again;
4. rolling updates (a new pod beside the old one, then the old one
   terminated as a kubelet does: preStop, SIGTERM, the grace period) of a
   shard and of the ingress, under load: no wrong answer;
5. co-located (``processes``: both shards in one process, as ``pipeline
   partition --colocate`` makes it), with CURVE: one pod for both shards,
   holding both their keys, ready only when both are, answers bitwise equal
   through the ingress's Service name, drained within its grace period.

The residual test model is used: two shards, the second a join of the model
input (from the ingress) and the first shard's output, so one pod is fed by
two others.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from netns_lab import NetnsLab, skip_unless_possible  # noqa: E402
from pods import BASE_ENV, Pod, PodRunner, image_files  # noqa: E402

from pipeline import topology as topo  # noqa: E402
from pipeline.deploy import checks, containerfile, kubernetes  # noqa: E402
from pipeline.security.keys import generate_keys  # noqa: E402
from pipeline.topology import INGRESS, Topology  # noqa: E402
from pipeline.wire import security  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).resolve().parent / "pod_client.py"
pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
READY_TIMEOUT_S = 300.0
CLIENT_TIMEOUT_S = 300.0
ROWS = 8
#: the reference outputs of the inputs used must differ by far more than this (a comparison that can fail).
SPREAD_MIN = 1e-4
#: answers under a load that lives through a pod leaving: its requests go one at a time, but one retried after
#: its pod left may be computed in a batch of two with the late original, and a batch of two can move the last
#: bits (seen once: 3e-8). Far below SPREAD_MIN, so a misrouted answer still fails.
RETRY_TOLERANCE = 1e-6
OPTIONS = kubernetes.KubeOptions(drain_s=3, prestop_s=1, startup_timeout_s=int(READY_TIMEOUT_S))


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A build context: the project (linked) and the residual topology inside it."""
    import models

    from pipeline.partition.command import partition

    skip_unless_possible()
    ctx = tmp_path_factory.mktemp("context")
    for name in ("pyproject.toml", "README.md", "pipeline"):
        (ctx / name).symlink_to(ROOT / name)
    partition(models.residual(), name="residual", out=ctx / "topology" / "residual", cuts=["relu_a"], verify=False)
    return ctx


@pytest.fixture(scope="module")
def reference(context: Path) -> tuple[np.ndarray, np.ndarray]:
    """Inputs and the whole model's answers at batch 1 (eager, as the e2e test), checked to differ per input."""
    import keras

    t = topo.load(context / "topology" / "residual")
    whole = keras.saving.load_model(t.model_path)
    x = np.random.default_rng(11).standard_normal((ROWS, 8, 8, 4)).astype(np.float32)
    y = np.stack([np.asarray(whole(x[i : i + 1], training=False))[0] for i in range(ROWS)])
    spread = min(float(np.abs(y[i] - y[j]).max()) for i in range(ROWS) for j in range(i + 1, ROWS))
    assert spread > SPREAD_MIN, f"the reference outputs barely depend on the input (closest pair {spread}); this comparison could not fail"
    return x, y


@pytest.fixture()
def lab() -> Iterator[NetnsLab]:
    with NetnsLab() as made:
        yield made


def run_client(lab: NetnsLab, tmp: Path, name: str, target: str, inputs: Path, *extra: str) -> subprocess.Popen[bytes]:
    """The client in its own namespace; its log is ``tmp/NAME.log``, its answers ``tmp/NAME.npz``."""
    env = {**BASE_ENV, "PYTHONPATH": f"{ROOT}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    argv = [sys.executable, str(CLIENT), target, "residual", str(inputs), str(tmp / f"{name}.npz"), *extra]
    proc = lab.popen("client", argv, env=env, log=tmp / f"{name}.log")
    proc.name = name  # type: ignore[attr-defined]
    return proc


def answers(proc: subprocess.Popen[bytes], tmp: Path) -> dict[str, Any]:
    name = proc.name  # type: ignore[attr-defined]
    code = proc.wait(CLIENT_TIMEOUT_S)
    assert code == 0, (tmp / f"{name}.log").read_text()[-3000:]
    data = np.load(tmp / f"{name}.npz")
    return {"sent": data["sent"], "codes": data["codes"], "outputs": data["outputs"], "took": data["took"]}


def start_pipeline(runner: PodRunner) -> str:
    """Start every pod, wait for each as its probes say, then for the whole pipeline; return the client target."""
    for process in runner.pods:
        runner.start(process)
    for process in runner.pods:
        runner.wait_ready(process, READY_TIMEOUT_S)
    wait_pipeline_ready(runner)
    pod_topology = checks.pod_topology(runner.objects)
    return str(pod_topology["ingress"]["grpc"])


def wait_pipeline_ready(runner: PodRunner, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until the ingress's overall health (every shard up) says SERVING."""
    ingress = runner.pods[INGRESS]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if runner.grpc_health(f"{ingress.address}:{kubernetes.GRPC_PORT}", "")[0]:
            return
        time.sleep(0.5)
    raise AssertionError(f"the pipeline was not ready within {timeout_s} s:\n" + "\n".join(p.tail(15) for p in runner.pods.values()))


def check_bitwise(result: dict[str, Any], y: np.ndarray, tolerance: float = 0.0) -> int:
    """Every OK answer equals the whole model's for the row sent, bit for bit (or within ``tolerance``); return
    how many were OK."""
    ok = 0
    for i, (row, code) in enumerate(zip(result["sent"], result["codes"])):
        if code != "OK":
            continue
        got = result["outputs"][i]
        diff = float(np.abs(got.astype(np.float64) - y[row]).max())
        same = got.tobytes() == y[row].tobytes() if tolerance == 0 else diff <= tolerance
        assert same, f"request {i} (row {row}): {got} != {y[row]} (max diff {diff}, tolerance {tolerance})"
        ok += 1
    return ok


def run_pods(objects: list[dict[str, Any]], context: Path, lab: NetnsLab, tmp: Path, name: str = "residual") -> PodRunner:
    assert checks.all_problems(objects) == []
    t = topo.load(context / "topology" / name)
    image = image_files(containerfile.render(t, context), context)
    assert sorted(image) == sorted(f"{kubernetes.MODEL_DIR}/{f}" for f in ["shard0.keras", "shard1.keras", "topology.yaml"])
    runner = PodRunner(objects, lab, tmp, image)
    runner.create()
    return runner


# ------------------------------------------------------------------- tests
def test_the_manifests_run_and_answer_like_the_whole_model(context: Path, reference: Any, lab: NetnsLab, tmp_path: Path) -> None:
    x, y = reference
    t = topo.load(context / "topology" / "residual")
    runner = run_pods(kubernetes.manifests(t, OPTIONS), context, lab, tmp_path)
    try:
        target = start_pipeline(runner)
        assert target == "residual-ingress.default.svc.cluster.local:8001"
        first_answers(lab, tmp_path, target, x, y, 3 * ROWS)
        rss = {p: pod_rss(pod.proc.pid) for p, pod in runner.pods.items() if pod.proc}  # type: ignore[union-attr]
        print(f"resident memory of the warm pods (MiB): {rss}")
    finally:
        codes = runner.stop_all()
    # each process drained and exited 0 on SIGTERM, within the grace period the manifest gives
    assert sorted(codes) == sorted(p.hostname for p in runner.pods.values()) and set(codes.values()) == {0}, codes


def test_curve_and_a_pod_killed_and_restarted(context: Path, reference: Any, lab: NetnsLab, tmp_path: Path) -> None:
    x, y = reference
    source = topo.load(context / "topology" / "residual")
    keys_dir = tmp_path / "keys"
    secured_dir = tmp_path / "secured"
    secured_dir.mkdir()
    for f in [*(s.file for s in source.shards), topo.MODEL_FILE]:
        (secured_dir / f).symlink_to((source.directory / f).resolve())
    source.replace(directory=secured_dir).write(secured_dir)
    generate_keys(topo.load(secured_dir), keys_dir)
    secured: Topology = topo.load(secured_dir)
    assert secured.security == security.CURVE
    keys = {p: security.secret_path(keys_dir, p).read_bytes() for p in secured.processes_on(None)}
    objects = kubernetes.manifests(secured, OPTIONS, curve_keys=keys)
    runner = run_pods(objects, context, lab, tmp_path)
    try:
        for process, pod in runner.pods.items():  # each pod holds its own key, mode 0600, and no other
            held = sorted(os.listdir(pod.root / ".volumes" / "curve-key"))
            assert held == [f"{process}.key_secret"], (process, held)
            assert (pod.root / ".volumes" / "curve-key" / held[0]).stat().st_mode & 0o777 == 0o600
        target = start_pipeline(runner)
        first_answers(lab, tmp_path, target, x, y, 2 * ROWS)

        # under load: kill shard0's process, start it again from its manifest
        load = Load.start(lab, tmp_path, target)
        before = load.ok()
        code = runner.kill("shard0", signal.SIGKILL)
        assert code == -signal.SIGKILL
        time.sleep(2.0)  # the pipeline is without shard0 for a while: requests fail, none is wrong
        runner.start("shard0")
        runner.wait_ready("shard0", READY_TIMEOUT_S)
        load.wait_more(40)
        result, codes, ok, by_code = load.finish(y)
        errors = sorted(by_code)
        last_error = max((i for i, c in enumerate(codes) if c != "OK"), default=-1)
        print(f"kill and restart: {len(codes)} requests, {ok} correct, {len(codes) - ok} errors {errors}, "
              f"{len(codes) - 1 - last_error} correct in a row at the end; ok before the kill {before}")  # fmt: skip
        # the outage shows as errors, or, when the restart came back within a request's deadline, as a request
        # that waited for it (the ingress resends a request lost with a shard once it is up again)
        waited = [round(float(t), 2) for t in result["took"] if t >= 1.5]
        assert ok >= before + 40 and (len(codes) - ok >= 1 or waited), "the outage was not seen; the test did not test a kill"
        assert set(errors) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}, errors
        assert all(c == "OK" for c in codes[-30:]), codes[-40:]
    finally:
        codes_at_stop = runner.stop_all()
    assert set(codes_at_stop.values()) == {0}, codes_at_stop


# ------------------------------------------------------------------ helpers
def ok_count(log: Path) -> int:
    found = re.findall(r"ok (\d+)", log.read_text()) if log.exists() else []
    return int(found[-1]) if found else 0


def wait_ok(log: Path, n: int, timeout_s: float = CLIENT_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout_s
    while ok_count(log) < n:
        assert time.monotonic() < deadline, f"the client did not reach {n} correct answers: {log.read_text()[-2000:]}"
        time.sleep(0.2)


def first_answers(lab: NetnsLab, tmp: Path, target: str, x: np.ndarray, y: np.ndarray, count: int) -> None:
    """``count`` requests of the rows of ``x`` (saved as ``tmp/inputs.npz``), one at a time: every one OK and bitwise
    the whole model's answer ``y``."""
    np.savez(tmp / "inputs.npz", image=x)
    result = answers(run_client(lab, tmp, "first", target, tmp / "inputs.npz", "--count", str(count)), tmp)
    assert list(result["codes"]) == ["OK"] * count
    assert check_bitwise(result, y) == count


class Load:
    """The load client (``tmp/load.log``, ``tmp/load.npz``) sending ``tmp/inputs.npz`` until told to stop, around a fault."""

    def __init__(self, client: subprocess.Popen[bytes], tmp: Path) -> None:
        self.client, self.tmp = client, tmp
        self.log, self.stop = tmp / "load.log", tmp / "stop"

    @classmethod
    def start(cls, lab: NetnsLab, tmp: Path, target: str, x: np.ndarray | None = None) -> Load:
        """Start it (on the rows of ``x``, or the inputs saved already) and wait for its first 20 correct answers."""
        if x is not None:
            np.savez(tmp / "inputs.npz", image=x)
        load = cls(run_client(lab, tmp, "load", target, tmp / "inputs.npz", "--until", str(tmp / "stop")), tmp)
        wait_ok(load.log, 20)
        return load

    def ok(self) -> int:
        return ok_count(self.log)

    def wait_more(self, n: int) -> None:
        """Until ``n`` more correct answers than now."""
        wait_ok(self.log, self.ok() + n)

    def finish(self, y: np.ndarray) -> tuple[dict[str, Any], list[str], int, dict[str, int]]:
        """Stop it; its answers, every request's code, how many were OK (each right within RETRY_TOLERANCE), the
        count of each error."""
        self.stop.touch()
        result = answers(self.client, self.tmp)
        codes = list(result["codes"])
        ok = check_bitwise(result, y, RETRY_TOLERANCE)
        return result, codes, ok, {c: codes.count(c) for c in sorted(set(codes)) if c != "OK"}


def terminate(runner: PodRunner, pod: Pod) -> float:
    """Terminate ``pod`` as a kubelet does; it must exit 0 within its grace period. Returns how long it drained."""
    code, drain_s = runner.terminate(pod)
    assert code == 0, pod.tail()
    assert drain_s < pod.spec["terminationGracePeriodSeconds"]
    return drain_s


def pod_rss(pid: int) -> float:
    """Resident memory of a pod's pipeline process (the child of `ip netns exec`), MiB."""
    import psutil

    proc = psutil.Process(pid)
    procs = [proc, *proc.children(recursive=True)]
    return round(max(p.memory_info().rss for p in procs) / 2**20, 1)


def test_a_rolling_update_of_a_shard(context: Path, reference: Any, lab: NetnsLab, tmp_path: Path) -> None:
    """A new pod of shard0 beside the old one (maxSurge 1), then the old one terminated as a kubelet does it.

    The stage never has zero ready pods: the new pod is ready before the old one
    leaves. Under load: no wrong answer, the ingress does not take the two pods'
    heartbeats for restarts (at most one switch-over), and the pipeline answers
    through the new pod at the end.
    """
    x, y = reference
    t = topo.load(context / "topology" / "residual")
    runner = run_pods(kubernetes.manifests(t, OPTIONS), context, lab, tmp_path)
    try:
        target = start_pipeline(runner)
        load = Load.start(lab, tmp_path, target, x)
        new = runner.replica("shard0", "b")
        runner.start("shard0", new)
        runner.wait_ready("shard0", READY_TIMEOUT_S, pod=new)
        load.wait_more(40)  # both pods up, heartbeating, for a while: the surge window
        runner.retarget("shard0", new)  # the old pod leaves the Service's endpoints as it terminates
        drain_s = terminate(runner, runner.pods["shard0"])
        load.wait_more(40)
        _, codes, ok, errors = load.finish(y)
        restarts = ingress_metric(runner, 'pipeline_shard_restarts_total{shard="shard0"}')
        print(f"rolling update of shard0: {len(codes)} requests, {ok} correct, errors {errors}, "
              f"restarts the ingress counted {restarts}, old pod drained in {drain_s:.2f} s")  # fmt: skip
        assert restarts <= 1, f"the ingress took the two pods' heartbeats for {restarts} restarts"
        assert set(errors) <= {"UNAVAILABLE"}, errors
        assert all(c == "OK" for c in codes[-30:]), codes[-40:]
        assert new.proc is not None and new.proc.poll() is None
    finally:
        codes_at_stop = runner.stop_all()
    assert set(codes_at_stop.values()) == {0}, codes_at_stop


def ingress_metric(runner: PodRunner, series: str) -> float:
    """One sample of the ingress pod's metrics (0 when absent), read at its address as Prometheus would."""
    from prometheus_client.parser import text_string_to_metric_families

    pod = runner.pods[INGRESS]
    ok, text = runner.http_get(f"http://{pod.address}:{kubernetes.METRICS_PORT}/metrics")
    assert ok, text
    name, _, labels = series.partition("{")
    want = dict(kv.split("=") for kv in labels.rstrip("}").split(",")) if labels else {}
    want = {k: v.strip('"') for k, v in want.items()}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in want.items()):
                return float(s.value)
    return 0.0


def test_a_rolling_update_of_the_ingress(context: Path, reference: Any, lab: NetnsLab, tmp_path: Path) -> None:
    """A new ingress pod beside the old one, then the old one terminated: what clients see.

    The shards hold one connection to the results Service, to the old ingress,
    so the new one hears no heartbeat and counts no shard up until the old one
    is gone: a client that reaches it meanwhile gets UNAVAILABLE (never a wrong
    answer, never a hang), and once the old ingress has drained the shards
    reconnect and the new one answers.
    """
    x, y = reference
    t = topo.load(context / "topology" / "residual")
    runner = run_pods(kubernetes.manifests(t, OPTIONS), context, lab, tmp_path)
    try:
        target = start_pipeline(runner)
        load = Load.start(lab, tmp_path, target, x)
        new = runner.replica(INGRESS, "b")
        runner.start(INGRESS, new)
        runner.wait_ready(INGRESS, READY_TIMEOUT_S, pod=new)  # its process serves: the probe passes
        runner.retarget(INGRESS, new)  # new connections go to the new pod
        drain_s = terminate(runner, runner.pods[INGRESS])
        load.wait_more(40)
        _, codes, ok, errors = load.finish(y)
        print(f"rolling update of the ingress: {len(codes)} requests, {ok} correct, errors {errors}, old ingress drained in {drain_s:.2f} s")
        assert set(errors) <= {"UNAVAILABLE"}, errors
        assert all(c == "OK" for c in codes[-30:]), codes[-40:]
    finally:
        codes_at_stop = runner.stop_all()
    assert set(codes_at_stop.values()) == {0}, codes_at_stop


# ------------------------------------------------------------- co-located
def test_colocated_shards_run_as_one_pod(context: Path, reference: Any, lab: NetnsLab, tmp_path: Path) -> None:
    """Both shards in one process (``--colocate``), with CURVE: one worker pod, its probe over both shards."""
    from pipeline import colocation

    x, y = reference
    source = topo.load(context / "topology" / "residual")
    dest = context / "topology" / "residual-coloc"  # inside the build context: the Containerfile copies from there
    dest.mkdir(exist_ok=True)
    for f in [*(s.file for s in source.shards), topo.MODEL_FILE]:
        if not (dest / f).exists():
            (dest / f).symlink_to((source.directory / f).resolve())
    grouped = colocation.colocate(source.replace(directory=dest))
    grouped.write(dest)
    keys_dir = tmp_path / "keys"
    generate_keys(topo.load(dest), keys_dir, force=True)
    secured: Topology = topo.load(dest)
    assert secured.security == security.CURVE and [p.name for p in colocation.groups(secured)] == ["workers"]
    keys = {p: security.secret_path(keys_dir, p).read_bytes() for p in secured.processes_on(None)}
    objects = kubernetes.manifests(secured, OPTIONS, curve_keys=keys)
    assert [d["metadata"]["name"] for d in objects if d["kind"] == "Deployment"] == ["residual-ingress", "residual-workers"]
    runner = run_pods(objects, context, lab, tmp_path, name="residual-coloc")
    assert sorted(runner.pods) == [INGRESS, "workers"]
    try:
        held = sorted(os.listdir(runner.pods["workers"].root / ".volumes" / "curve-key"))
        assert held == ["shard0.key_secret", "shard1.key_secret"], held  # its shards' keys, and no other
        worker = runner.pods["workers"]
        runner.start("workers")
        # a pod is ready only when every shard is: the probe asked for shard0's port alone and for a port with
        # nothing behind it (a shard that is not up) shows the command really asks each port it is given
        runner.wait_ready("workers", READY_TIMEOUT_S)
        probe = worker.spec["containers"][0]["readinessProbe"]["exec"]["command"]
        assert probe[-2:] == [str(kubernetes.METRICS_PORT), str(kubernetes.METRICS_PORT + 1)]
        assert runner.exec_probe(worker, probe[:-1], 2)[0]
        assert not runner.exec_probe(worker, [*probe, str(kubernetes.METRICS_PORT + 2)], 2)[0]
        runner.start(INGRESS)
        runner.wait_ready(INGRESS, READY_TIMEOUT_S)
        wait_pipeline_ready(runner)
        target = str(checks.pod_topology(runner.objects)["ingress"]["grpc"])
        assert target == "residual-ingress.default.svc.cluster.local:8001"
        first_answers(lab, tmp_path, target, x, y, 3 * ROWS)
        rss = {p: pod_rss(pod.proc.pid) for p, pod in runner.pods.items() if pod.proc}  # type: ignore[union-attr]
        print(f"resident memory of the warm co-located pods (MiB): {rss}")
        assert "--process" in " ".join(worker.spec["containers"][0]["args"])
    finally:
        codes = runner.stop_all()
    # the process drained both shards and exited 0 on SIGTERM, within the grace period the manifest gives
    assert sorted(codes) == sorted(p.hostname for p in runner.pods.values()) and set(codes.values()) == {0}, codes
