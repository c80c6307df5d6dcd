"""Run generated Kubernetes pods as processes, one network namespace each, the way a kubelet would.

Everything a pod gets comes from the manifests: the container's command,
args and env; its volume mounts (a ConfigMap item mounted with subPath, a
Secret's items with their mode, emptyDir folders, a memory volume); its init
containers, run to completion first; the image's files from the generated
Containerfile's ``COPY`` lines. A pod's file system is a folder: every
absolute path in the command, the args and the env is taken inside it (what
a container's own root does). The image's ``pipeline`` entry point is the
project's ``python -m pipeline.cli``. Each pod has a hostname of its own
(a UTS namespace, as a container has), which is what the ingress sees as a
heartbeat's host. Services become names in every namespace's hosts file:
the Service's DNS name to the address of the one pod its selector picks
(``retarget`` moves a Service to another pod, for a rolling update) (a Service port must equal its target port here,
since nothing translates ports); a headless Service's name is one line per
pod in ``members`` (its ready pods: the test says which), as cluster DNS
answers. An env var from the downward API's ``status.podIP`` is the pod's
address. Probes are asked like a kubelet asks them:
HTTP GET or the gRPC health check to the pod's address, from the host; an
exec probe runs its command inside the pod's namespace (the image's
``python3`` is the project's interpreter).
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netns_lab import KUBELET, NetnsLab

from pipeline.deploy import kubernetes as k8s

ROOT = Path(__file__).resolve().parents[2]
PROBE_TIMEOUT_S = 3.0
BASE_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8", "PYTHONPATH": str(ROOT)}

Obj = Mapping[str, Any]


def image_files(containerfile: str, context: Path) -> dict[str, Path]:
    """The files the Containerfile copies into the pod's model folder: destination -> source in the context."""
    files = {}
    for line in containerfile.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "COPY" and parts[2].startswith(k8s.MODEL_DIR + "/"):
            files[parts[2]] = context / parts[1]
    return files


@dataclass
class Pod:
    process: str
    deployment: Obj
    root: Path
    namespace: str  # the lab's name for it
    hostname: str = ""
    address: str = ""
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0
    logs: list[Path] = field(default_factory=list)

    @property
    def spec(self) -> Obj:
        return self.deployment["spec"]["template"]["spec"]  # type: ignore[no-any-return]

    @property
    def labels(self) -> Mapping[str, str]:
        return self.deployment["spec"]["template"]["metadata"]["labels"]  # type: ignore[no-any-return]

    def inside(self, value: str) -> str:
        """An absolute path in the container, as a path in this pod's folder."""
        return str(self.root) + value if value.startswith("/") else value

    def tail(self, lines: int = 60) -> str:
        if not self.logs:
            return ""
        return "\n".join(self.logs[-1].read_text(errors="replace").splitlines()[-lines:])


class PodRunner:
    """The pods of one manifest set in a :class:`NetnsLab`."""

    def __init__(self, objects: Sequence[Obj], lab: NetnsLab, root: Path, image: Mapping[str, Path]) -> None:
        self.objects = objects
        self.lab = lab
        self.root = root
        self.image = image
        self.extra: list[Pod] = []  # replicas made by `replica`
        self.pods: dict[str, Pod] = {}
        self.client = "client"
        self.targets: dict[str, Pod] = {}  # process -> the pod its Services lead to
        #: process -> the pods a headless Service's name resolves to (its ready pods; the test says which)
        self.members: dict[str, list[Pod]] = {}
        for d in (o for o in objects if o["kind"] == "Deployment"):
            process = d["spec"]["template"]["metadata"]["labels"][k8s.PROCESS_LABEL]
            pod = Pod(process, d, root / "pods" / process, namespace=f"pod-{process}", hostname=f"{d['metadata']['name']}-a")
            self.pods[process] = self.targets[process] = pod

    # ------------------------------------------------------------ set-up
    def create(self) -> None:
        """Namespaces, hosts files (every Service name), pod folders with image files, volumes, init containers."""
        for pod in self.pods.values():
            pod.address = self.lab.add(pod.namespace)
        self.lab.add(self.client)
        self.write_hosts()
        for pod in self.pods.values():
            self._prepare(pod)

    def _prepare(self, pod: Pod) -> None:
        self._filesystem(pod)
        for init in pod.spec.get("initContainers", []):
            code, log = self._run_to_end(pod, init)
            assert code == 0, f"init container {init['name']} of {pod.process} failed ({code}): {log}"

    def _namespaces(self) -> list[str]:
        return [*(p.namespace for p in self.pods.values()), *(p.namespace for p in self.extra), self.client]

    def write_hosts(self) -> None:
        """(Re)write every namespace's hosts file in place (a process reads it again at its next lookup)."""
        names = self.service_names()
        for name in self._namespaces():
            self.lab.hosts(name, names)

    def replica(self, process: str, suffix: str) -> Pod:
        """A second pod of ``process`` (a rolling update's new pod): own namespace, hostname, files, init containers."""
        old = self.pods[process]
        pod = Pod(process, old.deployment, self.root / "pods" / f"{process}-{suffix}", namespace=f"pod-{process}-{suffix}",
                  hostname=f"{old.deployment['metadata']['name']}-{suffix}")  # fmt: skip
        pod.address = self.lab.add(pod.namespace)
        self.extra.append(pod)
        self.write_hosts()
        self._prepare(pod)
        return pod

    def retarget(self, process: str, pod: Pod) -> None:
        """Point the Services of ``process`` at ``pod`` (new connections go there; established ones stay)."""
        self.targets[process] = pod
        self.write_hosts()

    def service_names(self) -> dict[str, str | list[str]]:
        """Every Service's DNS names -> the address of the pod it selects; a headless Service's -> the addresses of
        its ready pods (``members``; no line at all when there is none, as DNS would answer)."""
        names: dict[str, str | list[str]] = {}
        for svc in (o for o in self.objects if o["kind"] == "Service"):
            meta, spec = svc["metadata"], svc["spec"]
            (process,) = [n for n, p in self.pods.items() if all(p.labels.get(k) == v for k, v in spec["selector"].items())]
            pod = self.targets[process]
            ports = {p["name"]: p["containerPort"] for p in pod.spec["containers"][0]["ports"]}
            for port in spec["ports"]:
                target = port.get("targetPort", port["port"])
                assert ports.get(target, target) == port["port"], f"Service {meta['name']}: port {port['port']} -> {target}; nothing maps ports here"
            headless = spec.get("clusterIP") == "None"
            addresses = [p.address for p in self.members.get(process, [pod])] if headless else pod.address
            for name in (meta["name"], f"{meta['name']}.{meta['namespace']}", f"{meta['name']}.{meta['namespace']}.svc",
                         f"{meta['name']}.{meta['namespace']}.svc.cluster.local"):  # fmt: skip
                names[name] = addresses
        return names

    def _volume(self, pod: Pod, name: str) -> Path:
        return pod.root / ".volumes" / name

    def _filesystem(self, pod: Pod) -> None:
        pod.root.mkdir(parents=True, exist_ok=True)
        for dest, src in self.image.items():  # the image's layer
            target = Path(pod.inside(dest))
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(src.resolve())
        by_name = {o["metadata"]["name"]: o for o in self.objects if o["kind"] in ("ConfigMap", "Secret")}
        for volume in pod.spec.get("volumes", []):
            folder = self._volume(pod, volume["name"])
            folder.mkdir(parents=True)
            if "configMap" in volume:
                source = by_name[volume["configMap"]["name"]]["data"]
                for item in volume["configMap"].get("items") or [{"key": k, "path": k} for k in source]:
                    (folder / item["path"]).write_text(source[item["key"]])
            elif "secret" in volume:
                data = by_name[volume["secret"]["secretName"]]["data"]
                mode = volume["secret"].get("defaultMode", 0o644)
                for item in volume["secret"].get("items") or [{"key": k, "path": k} for k in data]:
                    path = folder / item["path"]
                    path.write_bytes(base64.b64decode(data[item["key"]]))
                    path.chmod(item.get("mode", mode))
            elif "emptyDir" not in volume:
                raise AssertionError(f"volume {volume} of {pod.process}: this runner knows ConfigMap, Secret and emptyDir")

    def _mount(self, pod: Pod, container: Obj) -> None:
        """The container's mounts as links in the pod's folder (re-made for each container)."""
        for mount in container.get("volumeMounts", []):
            target = Path(pod.inside(mount["mountPath"]))
            source = self._volume(pod, mount["name"])
            if mount.get("subPath"):
                source = source / mount["subPath"]
                assert source.exists(), f"{pod.process}: subPath {mount['subPath']} is not in volume {mount['name']}"
            if target.is_symlink() or target.is_file():
                target.unlink()
            target.parent.mkdir(parents=True, exist_ok=True)
            assert not target.exists(), f"{pod.process}: {mount['mountPath']} is already there"
            target.symlink_to(source)

    def _unmount(self, pod: Pod, container: Obj) -> None:
        for mount in container.get("volumeMounts", []):
            target = Path(pod.inside(mount["mountPath"]))
            if target.is_symlink():
                target.unlink()

    def _argv_env(self, pod: Pod, container: Obj) -> tuple[list[str], dict[str, str]]:
        command = list(container.get("command") or [])
        args = [pod.inside(a) for a in container.get("args", [])]
        if command == ["pipeline"]:
            argv = [sys.executable, "-m", "pipeline.cli", *args]  # the image's entry point
        else:
            argv = [pod.inside(c) if i else c for i, c in enumerate(command)] + args
        env = dict(BASE_ENV)
        for e in container.get("env", []):
            if "valueFrom" in e:  # the downward API: what this runner knows of a pod
                field = e["valueFrom"].get("fieldRef", {}).get("fieldPath")
                assert field == "status.podIP", f"{pod.process}: env {e['name']} from {e['valueFrom']}; this runner knows status.podIP"
                env[e["name"]] = pod.address
                continue
            env[e["name"]] = pod.inside(e["value"])
        return argv, env

    def _run_to_end(self, pod: Pod, container: Obj) -> tuple[int, str]:
        self._mount(pod, container)
        try:
            argv, env = self._argv_env(pod, container)
            result = subprocess.run(self.lab.command(pod.namespace, _with_hostname(pod, argv)), env=env, capture_output=True, text=True, timeout=60)
            return result.returncode, result.stdout + result.stderr
        finally:
            self._unmount(pod, container)

    # ----------------------------------------------------------- processes
    def start(self, process: str, pod: Pod | None = None) -> Pod:
        """Start (or restart) the main container of a pod; its volumes persist, as in a container restart."""
        pod = pod or self.pods[process]
        container = pod.spec["containers"][0]
        self._unmount(pod, container)
        self._mount(pod, container)
        argv, env = self._argv_env(pod, container)
        log = self.root / "logs" / f"{pod.hostname}-{pod.starts}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        pod.logs.append(log)
        pod.proc = self.lab.popen(pod.namespace, _with_hostname(pod, argv), env=env, log=log)
        pod.starts += 1
        return pod

    def kill(self, process: str, sig: int = signal.SIGKILL, timeout_s: float = 30.0, pod: Pod | None = None) -> int | None:
        pod = pod or self.pods[process]
        assert pod.proc is not None
        os.killpg(pod.proc.pid, sig)
        return pod.proc.wait(timeout_s)

    def stop_all(self) -> dict[str, int | None]:
        """SIGTERM every pod's process (as a kubelet would after preStop); SIGKILL at the end of its grace period.

        A process that had to be killed shows as -9: the drain did not fit in terminationGracePeriodSeconds."""
        pods = [*self.pods.values(), *self.extra]
        timeout_s = max(p.spec["terminationGracePeriodSeconds"] for p in pods)
        for pod in pods:
            if pod.proc is not None and pod.proc.poll() is None:
                os.killpg(pod.proc.pid, signal.SIGTERM)
        codes = {}
        deadline = time.monotonic() + timeout_s
        for pod in pods:
            if pod.proc is None:
                continue
            try:
                codes[pod.hostname] = pod.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(pod.proc.pid, signal.SIGKILL)
                codes[pod.hostname] = pod.proc.wait(10)
        return codes

    def terminate(self, pod: Pod) -> tuple[int | None, float]:
        """Terminate a pod as a kubelet does: the preStop pause, SIGTERM, SIGKILL at the grace period's end.

        Returns the exit status and the seconds from SIGTERM to exit."""
        container = pod.spec["containers"][0]
        grace = pod.spec["terminationGracePeriodSeconds"]
        started = time.monotonic()
        pause = container.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        time.sleep(pause)
        assert pod.proc is not None
        os.killpg(pod.proc.pid, signal.SIGTERM)
        term = time.monotonic()
        try:
            code = pod.proc.wait(max(0.1, grace - (term - started)))
        except subprocess.TimeoutExpired:
            os.killpg(pod.proc.pid, signal.SIGKILL)
            code = pod.proc.wait(10)
        return code, time.monotonic() - term

    # -------------------------------------------------------------- probes
    def probe(self, process: str, kind: str, pod: Pod | None = None) -> tuple[bool, str]:
        """Ask one of the pod's probes (``startupProbe``, ``readinessProbe``, ``livenessProbe``) as a kubelet does."""
        pod = pod or self.pods[process]
        container = pod.spec["containers"][0]
        probe = container[kind]
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        if "httpGet" in probe:
            port = ports.get(probe["httpGet"]["port"], probe["httpGet"]["port"])
            return self.http_get(f"http://{pod.address}:{port}{probe['httpGet']['path']}")
        if "grpc" in probe:
            return self.grpc_health(f"{pod.address}:{probe['grpc']['port']}", probe["grpc"].get("service", ""))
        if "exec" in probe:
            return self.exec_probe(pod, probe["exec"]["command"], float(probe.get("timeoutSeconds", 1)))
        raise AssertionError(f"{process}: probe {probe} is neither httpGet, grpc nor exec")

    def exec_probe(self, pod: Pod, command: Sequence[str], timeout_s: float) -> tuple[bool, str]:
        """An exec probe: the command in the pod's namespace; exit status 0 passes (a timeout fails, as a kubelet's)."""
        argv = [sys.executable if i == 0 and c == "python3" else pod.inside(c) if i == 0 else c for i, c in enumerate(command)]
        try:
            result = subprocess.run(self.lab.command(pod.namespace, argv), capture_output=True, text=True, timeout=timeout_s + 5, env=BASE_ENV)
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout_s} s"
        said = (result.stdout + result.stderr).strip().splitlines()
        return result.returncode == 0, f"exit {result.returncode}: {said[-1] if said else ''}"

    def http_get(self, url: str) -> tuple[bool, str]:
        """GET from the kubelet's namespace: (2xx or 3xx, body or reason)."""

        def get() -> tuple[bool, str]:
            try:
                with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT_S) as response:
                    return 200 <= response.status < 400, response.read().decode()
            except urllib.error.HTTPError as exc:
                return False, f"{exc.code} {exc.read().decode()}"
            except OSError as exc:
                return False, str(exc)

        return self.lab.call(KUBELET, get)

    def grpc_health(self, target: str, service: str) -> tuple[bool, str]:
        """The gRPC health check from the kubelet's namespace (a process there: gRPC opens its sockets in threads
        of its own, which a namespace joined by one thread would not cover)."""
        argv = [sys.executable, "-c", _GRPC_HEALTH, target, service, str(PROBE_TIMEOUT_S)]
        result = subprocess.run(self.lab.command(KUBELET, argv), capture_output=True, text=True, timeout=60, env=BASE_ENV)
        said = (result.stdout + result.stderr).strip()
        return result.returncode == 0 and said == "SERVING", said

    def wait_ready(self, process: str, timeout_s: float | None = None, pod: Pod | None = None) -> None:
        """Wait as the startup probe allows (its period x failure threshold), then the readiness probe must pass."""
        pod = pod or self.pods[process]
        startup = pod.spec["containers"][0]["startupProbe"]
        budget = timeout_s or startup["periodSeconds"] * startup["failureThreshold"]
        deadline = time.monotonic() + budget
        said = ""
        while time.monotonic() < deadline:
            assert pod.proc is not None and pod.proc.poll() is None, f"{process} exited ({pod.proc and pod.proc.returncode}):\n{pod.tail()}"
            ok, said = self.probe(process, "startupProbe", pod)
            if ok:
                ready, said = self.probe(process, "readinessProbe", pod)
                assert ready, f"{process}: the startup probe passed, the readiness probe did not: {said}"
                live, said = self.probe(process, "livenessProbe", pod)
                assert live, f"{process}: not live: {said}"
                return
            time.sleep(0.5)
        raise AssertionError(f"{process} was not ready within {budget:.0f} s (last probe: {said}):\n{pod.tail()}")


_GRPC_HEALTH = """
import sys, grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
target, service, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
with grpc.insecure_channel(target) as channel:
    try:
        r = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        print(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))
    except grpc.RpcError as exc:
        print(f"{exc.code().name}: {exc.details()}")
"""


def _with_hostname(pod: Pod, argv: list[str]) -> list[str]:
    """Run ``argv`` in a UTS namespace of its own whose hostname is the pod's (as in a container)."""
    return ["unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', pod.hostname, *argv]
