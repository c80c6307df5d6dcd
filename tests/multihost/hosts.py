"""Helpers for pipelines spread over namespace hosts: placement, start, readiness and load from the ingress host.

Where processes live and which ports they use is decided by the project's
own planner, as a user would run it: :func:`cluster_file` writes a cluster
file with the namespaces' addresses, then ``pipeline place DIR --cluster``
(:func:`place`) or ``pipeline partition --cluster`` (:func:`partition`) fills
in every process's host, endpoint, bind and metrics address.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from pipeline import process
from pipeline import topology as topo
from pipeline.bench.multihost import READY_PROBE  # one probe for the bench and the tests
from pipeline.launch import Cluster
from tests.netns import Network

ROOT = Path(__file__).resolve().parents[2]
LOAD = Path(__file__).resolve().parent / "load.py"
#: starting three TensorFlow processes on a busy 2-core machine.
START_TIMEOUT_S = 300.0



def cluster_file(net: Network, path: Path, *, speed: float = 1.0, bandwidth: str = "1Gbit", latency: str = "0.1ms") -> Path:
    """A cluster file naming the namespaces' hosts (``h1``.. at ``198.18.0.X``), ingress on h1, every link alike.

    ``speed`` below 1 makes a toy model's microseconds of compute weigh like a real
    model's milliseconds, so that spreading it over the hosts pays (the planner
    rightly keeps a model cheaper than its transfers on one host).
    """
    lines = ["version: 1", "hosts:"]
    lines += [f"- {{name: {h.name}, address: {h.address}, speed: {speed}}}" for h in net.hosts]
    lines += [f"ingress: {net.hosts[0].name}", "links:", f"  default: {{bandwidth: {bandwidth}, latency: {latency}}}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def place(directory: Path, cluster: Path, *args: str, timeout_s: float = 300.0) -> topo.Topology:
    """``pipeline place DIR --cluster FILE [ARGS]``: the planner chooses each shard's host; the placed topology."""
    result = subprocess.run(
        process.pipeline_command("place", str(directory), "--cluster", str(cluster), *args),
        capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, f"place failed\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return topo.load(directory)


def hosts_of(t: topo.Topology) -> dict[str, str]:
    """Process name -> the host name (``h1``...) its placed topology gives it (from the recorded cluster)."""
    from pipeline.cluster import host_names

    return host_names(t)


@dataclasses.dataclass
class MultiHost:
    """A topology placed over a :class:`Network`'s hosts, run with one :class:`Cluster`."""

    network: Network
    topology: topo.Topology
    log_dir: Path
    hosts: Mapping[str, str]  # process name -> host name (h1, h2...)
    worker_args: Sequence[str] = ()
    cluster: Cluster | None = None

    @property
    def ingress_host(self) -> str:
        return self.hosts[topo.INGRESS]

    @property
    def target(self) -> str:
        return self.topology.ingress.grpc

    def start(self, timeout_s: float = START_TIMEOUT_S) -> MultiHost:
        netns = {name: self.network.host(h).netns for name, h in self.hosts.items()}
        self.cluster = Cluster(
            self.topology,
            self.log_dir,
            netns=netns,
            common_worker_args=list(self.worker_args),
            ready=self.ready,
        )
        self.cluster.start(timeout_s)
        return self

    def stop(self) -> dict[str, int | None]:
        return self.cluster.stop() if self.cluster is not None else {}

    def __enter__(self) -> MultiHost:
        """Started; whatever did start is stopped again when the start fails."""
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def ready(self) -> bool:
        """``ServerReady`` asked from the ingress's host (this process cannot reach the namespaces)."""
        result = self.network.run(self.ingress_host, [sys.executable, "-c", READY_PROBE, self.target], timeout_s=30, cwd=ROOT)
        return result.returncode == 0

    def load_command(self, replay: Path, out: Path, **options: Any) -> list[str]:
        argv = [sys.executable, str(LOAD), "--target", self.target, "--replay", str(replay), "--out", str(out)]
        for key, value in options.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        return argv

    def load(self, replay: Path, out: Path, timeout_s: float = 300.0, **options: Any) -> list[dict[str, Any]]:
        """Run the load client on the ingress's host to completion; its records."""
        result = self.network.run(self.ingress_host, self.load_command(replay, out, **options), timeout_s=timeout_s, cwd=ROOT)
        assert result.returncode == 0, f"load client exited {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        return read_records(out)

    def start_load(self, replay: Path, out: Path, **options: Any) -> process.Process:
        """Start the load client on the ingress's host in the background (stop it in a ``finally``)."""
        return process.start("load", self.load_command(replay, out, **options), self.log_dir, cwd=ROOT, netns=self.network.host(self.ingress_host).netns)

    def tails(self) -> str:
        return "\n".join(p.tail(20) for p in (self.cluster.procs.values() if self.cluster else []))


def read_records(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def counts(records: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    """Requests by fate: ``correct``, ``wrong``, ``LOST`` or the gRPC code of the error."""
    out: dict[str, int] = {}
    for r in records:
        key = ("wrong" if r["wrong"] else "correct") if r["code"] == "OK" else str(r["code"])
        out[key] = out.get(key, 0) + 1
    return out


def partition(source: str | Path, out: Path, *args: str, timeout_s: float = 900.0) -> Path:
    """``pipeline partition SOURCE ... --out OUT --no-verify`` (with ``--cluster FILE`` among ``args``: placed too)."""
    result = subprocess.run(
        [*process.pipeline_command("partition", str(source), *args, "--out", str(out), "--no-verify")],
        capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, f"partition failed\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return out


def record(directory: Path, out: Path, count: int, *args: str, timeout_s: float = 600.0) -> Path:
    """``pipeline record DIR --count N --out FILE``: inputs and the whole model's reference outputs."""
    result = subprocess.run(
        [*process.pipeline_command("record", str(directory), "--count", str(count), "--out", str(out), *args)],
        capture_output=True, text=True, timeout=timeout_s, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, f"record failed\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return out


def reference_spread(replay_path: Path) -> float:
    """The smallest largest-difference between the reference outputs of two different inputs of a replay.

    A comparison with tolerance ``tol`` can fail only if this is far above ``tol``
    (inputs that all answer the same would let a pipeline that mixes requests up pass).
    """
    from pipeline import oracle
    from pipeline.soak import replay as replay_mod

    requests = replay_mod.load(replay_path).requests
    found = oracle.spread([r.inputs for r in requests], [r.outputs for r in requests])
    return found.smallest if found.pairs else 0.0


def wait(predicate: Any, timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    """``predicate()`` once it is true; fails the test naming ``what`` after ``timeout_s`` (the soak tests' wait)."""
    from tests.soak.helpers_soak import wait_for

    return wait_for(predicate, timeout_s, what, interval_s=interval_s)
