"""Kubernetes objects for a topology: one Deployment and Service per process, its ConfigMap, Secrets, policies.

Pure logic (no cluster, no sockets): :func:`manifests` turns a loaded
topology and :class:`KubeOptions` into a list of plain dicts, which
:func:`dump` writes as one YAML stream. What each object is for, and why the
shard files live in the image, is in docs/DEPLOY.md; the short version:

- a **ConfigMap** holds ``topology.yaml`` with every endpoint rewritten to a
  Service's DNS name (it is small; the shard files are not, and a ConfigMap
  holds at most 1 MiB, so they are a layer of the image, see
  :mod:`pipeline.deploy.containerfile`); it is mounted over the image's copy;
- per process a **Deployment** (one replica, rolled with ``maxSurge 1,
  maxUnavailable 0`` so a stage never has zero ready pods) running the
  ``pipeline`` command with that process's arguments, probes (startup,
  readiness, liveness), a preStop pause and a grace period that holds the
  SIGTERM drain, resource requests, Prometheus annotations and, when the
  topology places processes on named hosts, a nodeSelector;
- per process a **Service** for what others connect to (a shard's PULL
  endpoint and metrics port; the ingress's gRPC and metrics ports, and its
  results endpoint in a Service of its own that also lists not-ready pods,
  so heartbeats reach an ingress whatever its state);
- per process a **NetworkPolicy** admitting only the processes that feed it
  (the topology's producers), Prometheus on the metrics port, and anyone on
  the ingress's gRPC port;
- with ``security: curve``, per process a **Secret** holding only its own
  CURVE secret keys (those of the process's shards, and the ingress's where it runs), mounted read-only into that pod's init container alone,
  which installs it with mode 0600 into a memory volume the process reads
  (a Secret volume cannot give a non-root process a file of mode 0600: with
  ``fsGroup`` Kubernetes adds the group read bit, which the key loader
  refuses); and the ingress's TLS certificate and key as a ``kubernetes.io/tls``
  Secret when given.

A shard with replicas (a static ``replicas:`` list, or ``replicas: {count: N,
discover: dns}``) is **one Deployment with N replicas behind a headless
Service** (``clusterIP: None``; only ready pods are in its DNS answer): in the
ConfigMap it becomes ``replicas: {count: N, discover: dns}`` at the Service's
name, each pod learns its own address from the downward API
(``PIPELINE_REPLICA_ADDRESS`` = ``status.podIP``; process name ``shard@<pod
IP>``), and producers follow the name (:mod:`pipeline.discovery`).

A process is what the topology's ``processes`` section says
(:mod:`pipeline.colocation`): a group of shards is one pod running
``pipeline worker DIR --process NAME``, its i-th shard on PULL port
``PULL_PORT + i`` and metrics port ``METRICS_PORT + i`` (the shards share the
pod's address), only the shards fed over TCP on its Service's PULL ports, and
an exec probe that passes only when every shard's ``/ready`` does.

A worker process that serves the ingress too (``ingress: true`` in its
``processes`` entry) is one pod and no ingress Deployment is written: the
ingress keeps its ports in that pod (gRPC ``GRPC_PORT``, metrics
``METRICS_PORT``, results ``PULL_PORT`` only when a shard runs in another pod),
its shards take the next ones (the i-th on ``PULL_PORT + 1 + i`` and
``METRICS_PORT + 1 + i``), and the ingress's Services (gRPC and metrics; the
results Service when it binds one) select that pod. The pod runs ``pipeline
worker DIR --process NAME`` with the ingress's options in its environment
(``PIPELINE_INGRESS_ADDRESS``, ``_DRAIN``, ``_TLS_CERT``/``_KEY``), is ready when
the ingress serves and every shard is, holds the ingress's CURVE key beside its
shards', and gets the ingress's drain on top of its shards' in its grace period.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

from pipeline import colocation
from pipeline import topology as topo
from pipeline.errors import UsageError
from pipeline.topology import INGRESS, Topology
from pipeline.wire import security

# ----------------------------------------------------------------- constants
#: where the image holds the topology directory (shard files); the ConfigMap's topology.yaml is mounted over it.
MODEL_DIR = "/opt/keras-pipeline/model"
#: the memory volume holding the process's own CURVE secret key (mode 0600), read by the process.
KEYS_DIR = "/var/run/keras-pipeline/keys"
#: where the init container sees the process's Secret.
CURVE_SECRET_DIR = "/var/run/secrets/keras-pipeline/curve"
#: where the ingress sees its TLS Secret.
TLS_DIR = "/var/run/secrets/keras-pipeline/tls"
#: container ports: every pod has its own address, so the same ports serve every process.
PULL_PORT = 5555
GRPC_PORT = 8001
METRICS_PORT = 9100
#: the image's non-root user and group (pipeline/deploy/containerfile.py creates them).
RUN_AS = 10001
#: the health service the ingress keeps SERVING while its process serves (pipeline.serving.ingress.PROCESS_SERVICE).
INGRESS_HEALTH_SERVICE = "pipeline.ingress"
#: the label every pod carries, and the one a host's nodes carry under cluster placement.
NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
PROCESS_LABEL = "keras-pipeline/process"
DEFAULT_HOST_LABEL = "keras-pipeline/host"
APP_NAME = "keras-pipeline"
TOPOLOGY_CONFIGMAP_KEY = topo.TOPOLOGY_FILE
TOPOLOGY_HASH_ANNOTATION = "keras-pipeline/topology-sha256"
#: measured resident memory of a warm MobileNetV3Large quarter-shard worker (docs/SOAK.md: 585-633 MiB; TensorFlow
#: itself is most of it) and of the ingress (docs/SOAK.md: about 80 MiB); the shard's weights come on top.
WORKER_BASE_MIB = 600
WEIGHTS_FACTOR = 4  # weights in memory, the traced function's constants, batch buffers: a few times the file
INGRESS_MEMORY_MIB = 128
MEMORY_LIMIT_FACTOR = 1.5
INGRESS_CPU_MILLI = 250
MIN_WORKER_CPU_MILLI = 100
#: seconds between the preStop pause's end and SIGKILL beyond the drain: closing sockets, the compute thread.
EXIT_MARGIN_S = 5
#: a process serving several shards drains them at once, then waits this long for their threads
#: (pipeline.serving.group.JOIN_MARGIN_S, not imported: that module loads the serving stack).
GROUP_JOIN_MARGIN_S = 2
#: resident memory each further shard of a process adds to the first: it shares the process's TensorFlow
#: runtime. Measured: about 0.9 GB for MobileNetV3Large's four shards in one process against 585-633 MiB for
#: each single-shard worker; 600 + 3 x 60 + the weights (4 x 22 MiB) = 868 MiB.
GROUP_SHARD_MIB = 60
#: the readiness and liveness of a process serving several shards: every shard's metrics endpoint must answer
#: 2xx on the path (argv: path, then the ports). Run as an exec probe with the image's python3 (no extra tool).
#: how a process that serves the ingress too gives it its options (``pipeline.serving.ingress.IngressConfig.resolve``).
INGRESS_ENV_PREFIX = "PIPELINE_INGRESS_"
ALL_SHARDS_PROBE = (
    "import sys, urllib.request\n"
    "for port in sys.argv[2:]:\n"
    "    urllib.request.urlopen(f'http://127.0.0.1:{port}{sys.argv[1]}', timeout=1).read()\n"
)
_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


@dataclass(frozen=True)
class KubeOptions:
    """What ``pipeline deploy kubernetes`` is told besides the topology."""

    image: str = "keras-pipeline:latest"
    namespace: str = "default"
    cluster_domain: str = "cluster.local"
    pull_policy: str = "IfNotPresent"
    drain_s: float = 10.0  # SIGTERM drain of every process (worker --drain-timeout, ingress --drain)
    prestop_s: int = 5  # pause before SIGTERM while the pod leaves the Services' endpoints
    startup_timeout_s: int = 600  # loading and warming a large shard
    cpu_total: float | None = None  # CPUs shared by the shards by their planned compute share (default: 1 per shard)
    worker_base_mib: int = WORKER_BASE_MIB
    host_label: str = DEFAULT_HOST_LABEL
    prometheus_labels: Mapping[str, str] = field(default_factory=lambda: {NAME_LABEL: "prometheus"})
    tls: bool = False  # the ingress serves TLS (its certificate and key come as a Secret)

    @property
    def grace_s(self) -> int:
        """terminationGracePeriodSeconds of a one-shard process: the preStop pause, the drain, and the exit."""
        return int(self.prestop_s + math.ceil(self.drain_s) + EXIT_MARGIN_S)

    def grace_for(self, shards: int, ingress: bool = False) -> int:
        """terminationGracePeriodSeconds of a process serving ``shards`` shards: its shards drain at the same
        time (one drain budget), then the process waits for every shard's threads before it exits. With the
        ``ingress`` in it too, the ingress drains first (a budget of its own, then its thread is joined)."""
        if ingress:
            return self.grace_s + math.ceil(self.drain_s) + 2 * GROUP_JOIN_MARGIN_S
        return self.grace_s + (GROUP_JOIN_MARGIN_S if shards > 1 else 0)


# --------------------------------------------------------------------- names
def dns_label(text: str, what: str) -> str:
    """``text`` as a DNS-1035 label (lowercase, '-' for anything else); a clear error when that is impossible."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    if not label or not label[0].isalpha():
        label = f"p-{label}".rstrip("-")
    if len(label) > 63 or not _DNS_LABEL.match(label):
        raise UsageError(f"{what} {text!r} cannot name a Kubernetes object ({label!r}); expected at most 63 letters, digits or '-'")
    return label


@dataclass(frozen=True)
class Names:
    """Object names of one topology's processes (DNS-1035 labels, unique)."""

    app: str
    process: Mapping[str, str]  # process -> Deployment, Service, NetworkPolicy name; ``ingress`` -> its gRPC Service
    results: str  # the ingress's results Service
    configmap: str

    def secret(self, process: str) -> str:
        return f"{self.process[process]}-curve-key"

    @property
    def tls_secret(self) -> str:
        return f"{self.process[INGRESS]}-tls"


def names_of(topology: Topology) -> Names:
    app = dns_label(topology.name, "topology name")
    process = {}
    for name in [INGRESS, *colocation.process_names_on(topology, None)]:  # the ingress's Service, wherever it runs
        process[name] = dns_label(f"{app}-{name}", f"process {name!r} of topology")
    clash = sorted({n for n in process.values() if list(process.values()).count(n) > 1})
    results = dns_label(f"{app}-{INGRESS}-results", "the ingress's results Service")
    if clash or results in process.values():
        raise UsageError(f"processes of {topology.name!r} map to the same Kubernetes name {clash or [results]}; rename the shards")
    return Names(app=app, process=process, results=results, configmap=dns_label(f"{app}-topology", "the topology ConfigMap"))


def fqdn(service: str, options: KubeOptions) -> str:
    return f"{service}.{options.namespace}.svc.{options.cluster_domain}"


# ------------------------------------------------------------- processes
def shards_of(topology: Topology, process: str) -> tuple[str, ...]:
    """The shards a worker process serves (one for a process of its own); none for the ingress."""
    return () if process == INGRESS else colocation.group(topology, process).shards


def is_group(topology: Topology, process: str) -> bool:
    return len(shards_of(topology, process)) > 1


def ingress_pod(topology: Topology) -> str:
    """The process whose pod serves the ingress: ``ingress``, or the worker process with ``ingress: true``."""
    host = colocation.ingress_process(topology)
    return INGRESS if host is None else host.name


def serves_ingress(topology: Topology, process: str) -> bool:
    """True for the pod of the ingress: its own process, or a worker process that serves it too."""
    return process == ingress_pod(topology)


def hosts_ingress(topology: Topology, process: str) -> bool:
    """True for a worker process that serves the ingress beside its shards (``ingress: true``)."""
    return process != INGRESS and serves_ingress(topology, process)


def ingress_binds_tcp(topology: Topology) -> bool:
    """True when the ingress binds its TCP results endpoint: some shard runs in another process."""
    return colocation.ingress_binds(topology, "tcp://").tcp is not None


@dataclass(frozen=True)
class ShardPorts:
    """Where one shard listens inside its pod: the shards of one pod share its address, so each has its own ports."""

    shard: str
    index: int  # its place among the pod's ports: its place in its process, one more where the ingress has 0
    pull: int | None  # None: fed only from inside its process (inproc), no TCP socket
    metrics: int

    @property
    def pull_name(self) -> str:
        return "pull" if self.index == 0 else f"pull-{self.index}"

    @property
    def metrics_name(self) -> str:
        return "metrics" if self.index == 0 else f"metrics-{self.index}"


def shard_ports(topology: Topology, process: str) -> list[ShardPorts]:
    """The ports of every shard of ``process``: PULL_PORT + i and METRICS_PORT + i for its i-th shard (i + 1 in
    a process that serves the ingress: the ingress keeps the first ports there, as in a pod of its own)."""
    out = []
    first = 1 if hosts_ingress(topology, process) else 0
    for i, shard in enumerate(shards_of(topology, process), start=first):
        tcp = colocation.binds(topology, shard).tcp is not None
        out.append(ShardPorts(shard, i, PULL_PORT + i if tcp else None, METRICS_PORT + i))
    return out


def _ports_of_shard(topology: Topology, shard: str) -> ShardPorts:
    process = colocation.process_of(topology, shard).name
    return next(p for p in shard_ports(topology, process) if p.shard == shard)


# ---------------------------------------------------------------- replicas
#: the environment variable a replicated shard's pod reads its own address from (the downward API's pod IP).
REPLICA_ADDRESS_ENV = "PIPELINE_REPLICA_ADDRESS"


def replica_count(topology: Topology, process: str) -> int:
    """How many pods a process runs: a replicated shard's replica count (listed or found by DNS), else 1."""
    shards = shards_of(topology, process)
    if len(shards) != 1:
        return 1
    spec = topology.shard(shards[0])
    return spec.discovered or len(spec.replicas)


def is_replicated(topology: Topology, process: str) -> bool:
    """A process whose pods are replicas of one shard (a headless Service, addresses found by DNS)."""
    shards = shards_of(topology, process)
    return len(shards) == 1 and bool(topology.shard(shards[0]).discovered or topology.shard(shards[0]).extra_replicas)


# -------------------------------------------------------------- placement
#: the topology section where ``pipeline partition --cluster`` records the cluster file (hosts with name and address).
CLUSTER_KEY = "cluster"


def placed_host(topology: Topology, process: str) -> str | None:
    """The name of the host a process is placed on, or ``None`` when the topology has no placement.

    A topology placed with a cluster file records the cluster (``cluster.hosts``: name and address) and
    gives every process its host's address: the address is looked up there. A host that is a name rather
    than an address (a hand-placed topology) is taken as it is. Addresses alone (one machine, or a topology
    edited by hand with addresses) mean no placement.
    """
    host = topology.ingress.host if process == INGRESS else topology.shard(shards_of(topology, process)[0]).host
    cluster = topology.extra.get(CLUSTER_KEY)
    entries = (cluster.get("hosts") or []) if isinstance(cluster, Mapping) else []
    for entry in entries:
        if isinstance(entry, Mapping) and host in (entry.get("name"), entry.get("address")) and entry.get("name"):
            return str(entry["name"])
    if not host or host == "localhost":
        return None
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return host
    return None


# ------------------------------------------------------- rewritten topology
def rewrite(topology: Topology, options: KubeOptions, names: Names | None = None) -> Topology:
    """The topology as the pods see it: endpoints and metrics at the Services' DNS names, binds on every interface."""
    names = names or names_of(topology)
    shards = []
    for s in topology.shards:
        # the shard's process's Service; a shard fed only inside its process keeps a TCP address no Service port
        # leads to (the topology needs one; nobody connects to it: its producers use inproc://)
        host = fqdn(names.process[colocation.process_of(topology, s.name).name], options)
        ports = _ports_of_shard(topology, s.name)
        pull = ports.pull or PULL_PORT + ports.index
        # a replicated shard: its replicas are the pods behind a headless Service, found by resolving its name
        count = s.discovered or (len(s.replicas) if s.extra_replicas else 0)
        shards.append(
            replace(
                s,
                endpoint=f"tcp://{host}:{pull}",
                bind=f"tcp://0.0.0.0:{pull}",
                metrics=f"{host}:{ports.metrics}",
                extra_replicas=(),
                discovered=count,
            )
        )
    # the ingress's Services, wherever it runs; with every shard in its process it binds no results socket, and its
    # results address leads nowhere (nobody connects to it: the shards there use inproc://)
    ingress_host = fqdn(names.process[INGRESS], options)
    ingress = replace(
        topology.ingress,
        grpc=f"{ingress_host}:{GRPC_PORT}",
        results=f"tcp://{fqdn(names.results, options)}:{PULL_PORT}",
        bind=f"tcp://0.0.0.0:{PULL_PORT}",
        metrics=f"{ingress_host}:{METRICS_PORT}",
    )
    return topology.replace(shards=tuple(shards), ingress=ingress)


def topology_text(topology: Topology) -> str:
    return topo.dump_yaml(topology.to_dict())


# ----------------------------------------------------------------- helpers
def labels(topology: Topology, process: str) -> dict[str, str]:
    return {
        NAME_LABEL: APP_NAME,
        INSTANCE_LABEL: topology.name,
        COMPONENT_LABEL: "ingress" if process == INGRESS else "shard",
        PROCESS_LABEL: process,
    }


def selector(topology: Topology, process: str) -> dict[str, str]:
    return {INSTANCE_LABEL: topology.name, PROCESS_LABEL: process}


def _meta(name: str, topology: Topology, process: str | None, options: KubeOptions) -> dict[str, Any]:
    lab = labels(topology, process) if process else {NAME_LABEL: APP_NAME, INSTANCE_LABEL: topology.name}
    return {"name": name, "namespace": options.namespace, "labels": lab}


def _mib(n: float) -> str:
    return f"{int(math.ceil(n / 16.0) * 16)}Mi"


def resources(topology: Topology, process: str, options: KubeOptions) -> dict[str, Any]:
    """Requests from what the process needs: measured memory (one TensorFlow runtime per process, a little more
    per further shard) plus its shards' weights; CPU by the compute share of its shards. A process that serves
    the ingress too asks for the ingress's requests on top of its shards'."""
    if process == INGRESS:
        memory = float(INGRESS_MEMORY_MIB)
        cpu_milli = INGRESS_CPU_MILLI
    else:
        shards = shards_of(topology, process)
        paths = [topology.shard_path(s) for s in shards]
        weights_mib = sum(p.stat().st_size for p in paths if p.is_file()) / 2**20
        memory = options.worker_base_mib + GROUP_SHARD_MIB * (len(shards) - 1) + WEIGHTS_FACTOR * weights_mib
        shares = {r.get("shard"): float(r.get("share", 0.0)) for r in (topology.extra.get("plan") or {}).get("shards", [])}
        n = len(topology.shards)
        share = sum(shares.get(s) or 1.0 / n for s in shards)
        total = options.cpu_total if options.cpu_total is not None else float(n)
        cpu_milli = max(MIN_WORKER_CPU_MILLI, round(share * total * 1000))
        if hosts_ingress(topology, process):
            memory += INGRESS_MEMORY_MIB
            cpu_milli += INGRESS_CPU_MILLI
    return {
        "requests": {"cpu": f"{cpu_milli}m", "memory": _mib(memory)},
        "limits": {"memory": _mib(memory * MEMORY_LIMIT_FACTOR)},  # no CPU limit: throttling adds latency
    }


def _all_shards(path: str, ports: Sequence[int]) -> dict[str, Any]:
    return {"exec": {"command": ["python3", "-c", ALL_SHARDS_PROBE, path, *map(str, ports)]}}


def _probes(topology: Topology, process: str, options: KubeOptions) -> dict[str, Any]:
    startup_period = 5
    ready_action: dict[str, Any]
    live_action: dict[str, Any]
    if process == INGRESS and not options.tls:
        action: dict[str, Any] = {"grpc": {"port": GRPC_PORT, "service": INGRESS_HEALTH_SERVICE}}
        ready_action, live_action = action, action
    elif is_group(topology, process) or hosts_ingress(topology, process):
        # a pod is ready when every shard of its process is (each loads, warms and drains on its own), and the
        # ingress serves when it runs there too (its /ready and /live on its metrics port, as with TLS alone)
        ports = [METRICS_PORT] if hosts_ingress(topology, process) else []
        ports += [p.metrics for p in shard_ports(topology, process)]
        ready_action, live_action = _all_shards("/ready", ports), _all_shards("/live", ports)
    else:
        # workers: /ready says so only once loaded and warm; the ingress with TLS: the probe cannot do TLS everywhere
        ready_action = {"httpGet": {"path": "/ready", "port": "metrics"}}
        live_action = {"httpGet": {"path": "/live", "port": "metrics"}}
    return {
        "startupProbe": {
            **ready_action,
            "periodSeconds": startup_period,
            "timeoutSeconds": 2,
            "failureThreshold": max(3, math.ceil(options.startup_timeout_s / startup_period)),
        },
        "readinessProbe": {**ready_action, "periodSeconds": 2, "timeoutSeconds": 2, "failureThreshold": 1, "successThreshold": 1},
        "livenessProbe": {**live_action, "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3},
    }


def container_args(topology: Topology, process: str, options: KubeOptions) -> list[str]:
    """The ``pipeline`` command's arguments for one process (binds, drain, TLS files)."""
    drain = f"{options.drain_s:g}"
    if process == INGRESS:
        args = ["ingress", MODEL_DIR, "--address", f"0.0.0.0:{GRPC_PORT}", "--drain", drain]
        if options.tls:
            args += ["--tls-cert", f"{TLS_DIR}/tls.crt", "--tls-key", f"{TLS_DIR}/tls.key"]
        return args
    return ["worker", MODEL_DIR, *colocation.worker_selector(topology, process), "--drain-timeout", drain]


def ingress_env(topology: Topology, process: str, options: KubeOptions) -> list[dict[str, str]]:
    """The ingress's options in a worker process that serves it (``pipeline worker`` has no ingress flags; the
    ingress reads ``PIPELINE_INGRESS_*``): what ``pipeline ingress`` gets on its command line in a pod of its own."""
    if not hosts_ingress(topology, process):
        return []
    env = {"ADDRESS": f"0.0.0.0:{GRPC_PORT}", "DRAIN": f"{options.drain_s:g}"}
    if options.tls:
        env |= {"TLS_CERT": f"{TLS_DIR}/tls.crt", "TLS_KEY": f"{TLS_DIR}/tls.key"}
    return [{"name": INGRESS_ENV_PREFIX + k, "value": v} for k, v in env.items()]


_SECURITY_CONTEXT = {
    "runAsNonRoot": True,
    "runAsUser": RUN_AS,
    "runAsGroup": RUN_AS,
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def deployment(topology: Topology, process: str, options: KubeOptions, names: Names, topology_sha: str) -> dict[str, Any]:
    curve = topology.security == security.CURVE
    ports: list[dict[str, Any]] = []
    if serves_ingress(topology, process):
        if ingress_binds_tcp(topology):  # results and heartbeats from shards in other pods
            ports.append({"name": "pull", "containerPort": PULL_PORT, "protocol": "TCP"})
        ports += [
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ]
    if process != INGRESS:
        for sp in shard_ports(topology, process):
            if sp.pull is not None:
                ports.append({"name": sp.pull_name, "containerPort": sp.pull, "protocol": "TCP"})
            ports.append({"name": sp.metrics_name, "containerPort": sp.metrics, "protocol": "TCP"})
    env = [
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "TF_CPP_MIN_LOG_LEVEL", "value": "2"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "KERAS_HOME", "value": "/tmp/.keras"},
        *ingress_env(topology, process, options),
    ]
    if is_replicated(topology, process):  # its own address: its process name is shard@<pod IP> (pipeline.discovery)
        env.append({"name": REPLICA_ADDRESS_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    mounts: list[dict[str, Any]] = [
        {"name": "topology", "mountPath": f"{MODEL_DIR}/{topo.TOPOLOGY_FILE}", "subPath": TOPOLOGY_CONFIGMAP_KEY, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    volumes: list[dict[str, Any]] = [
        {"name": "topology", "configMap": {"name": names.configmap, "items": [{"key": TOPOLOGY_CONFIGMAP_KEY, "path": TOPOLOGY_CONFIGMAP_KEY}]}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "256Mi"}},
    ]
    init: list[dict[str, Any]] = []
    if curve:
        key_files = [security.secret_path(KEYS_DIR, p).name for p in key_owners(topology, process)]
        env.append({"name": security.ENV_KEYS_DIR, "value": KEYS_DIR})
        mounts.append({"name": "curve-key", "mountPath": KEYS_DIR, "readOnly": True})
        items = [{"key": f, "path": f} for f in key_files]
        volumes += [
            {"name": "curve-secret", "secret": {"secretName": names.secret(process), "defaultMode": 0o440, "items": items}},
            {"name": "curve-key", "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        ]
        init.append(
            {
                "name": "install-curve-key",
                "image": options.image,
                "imagePullPolicy": options.pull_policy,
                # the key loader refuses a file others or the group can read; a Secret volume cannot be 0600 for a non-root user
                "command": ["install", "-m", "0600", "-t", KEYS_DIR, *(f"{CURVE_SECRET_DIR}/{f}" for f in key_files)],
                "volumeMounts": [
                    {"name": "curve-secret", "mountPath": CURVE_SECRET_DIR, "readOnly": True},
                    {"name": "curve-key", "mountPath": KEYS_DIR},
                ],
                "securityContext": _SECURITY_CONTEXT,
                "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "32Mi"}},
            }
        )
    if serves_ingress(topology, process) and options.tls:
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
        volumes.append({"name": "tls", "secret": {"secretName": names.tls_secret, "defaultMode": 0o440}})
    container: dict[str, Any] = {
        "name": "ingress" if process == INGRESS else "worker",
        "image": options.image,
        "imagePullPolicy": options.pull_policy,
        "command": ["pipeline"],
        "args": container_args(topology, process, options),
        "ports": ports,
        "env": env,
        "volumeMounts": mounts,
        "resources": resources(topology, process, options),
        **_probes(topology, process, options),
        # leave the Services' endpoints (a terminating pod is removed from them), then SIGTERM starts the drain
        "lifecycle": {"preStop": {"sleep": {"seconds": options.prestop_s}}},
        "securityContext": _SECURITY_CONTEXT,
    }
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": options.grace_for(len(shards_of(topology, process)), hosts_ingress(topology, process)),
        "securityContext": {"runAsNonRoot": True, "fsGroup": RUN_AS, "seccompProfile": {"type": "RuntimeDefault"}},
        **({"initContainers": init} if init else {}),
        "containers": [container],
        "volumes": volumes,
    }
    host = placed_host(topology, process)
    if host is not None:
        pod_spec["nodeSelector"] = {options.host_label: host}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(names.process[process], topology, process, options),
        "spec": {
            "replicas": replica_count(topology, process),
            "revisionHistoryLimit": 3,
            "selector": {"matchLabels": selector(topology, process)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "template": {
                "metadata": {
                    "labels": labels(topology, process),
                    "annotations": {
                        "prometheus.io/scrape": "true",
                        "prometheus.io/port": str(METRICS_PORT),
                        "prometheus.io/path": "/metrics",
                        TOPOLOGY_HASH_ANNOTATION: topology_sha,  # a new topology rolls the pods (subPath mounts never update)
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def services(topology: Topology, process: str, options: KubeOptions, names: Names) -> list[dict[str, Any]]:
    """The Services selecting ``process``'s pod: the ingress's (gRPC and metrics, and its results) where it runs,
    and a worker process's own (its shards' ports)."""
    out = []
    if serves_ingress(topology, process):
        metrics_port = {"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics", "protocol": "TCP"}
        grpc_port = {"name": "grpc", "port": GRPC_PORT, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"}
        out.append(_service(names.process[INGRESS], topology, process, options, [grpc_port, metrics_port]))
        if ingress_binds_tcp(topology):
            # every shard elsewhere sends results, errors and heartbeats here: reachable whatever the ingress's readiness
            pull_port = {"name": "pull", "port": PULL_PORT, "targetPort": "pull", "protocol": "TCP"}
            out.append(_service(names.results, topology, process, options, [pull_port], publish_not_ready=True))
    if process != INGRESS:
        # one Service per worker process: the PULL port of each shard fed over TCP, every shard's metrics port
        ports = []
        for sp in shard_ports(topology, process):
            if sp.pull is not None:
                ports.append({"name": sp.pull_name, "port": sp.pull, "targetPort": sp.pull_name, "protocol": "TCP"})
            ports.append({"name": sp.metrics_name, "port": sp.metrics, "targetPort": sp.metrics_name, "protocol": "TCP"})
        # a replicated shard: a headless Service, whose name resolves to the address of every ready pod
        out.append(_service(names.process[process], topology, process, options, ports, headless=is_replicated(topology, process)))
    return out


def _service(
    name: str,
    topology: Topology,
    process: str,
    options: KubeOptions,
    ports: list[dict[str, Any]],
    publish_not_ready: bool = False,
    headless: bool = False,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"type": "ClusterIP", "selector": selector(topology, process), "ports": ports}
    if publish_not_ready:
        spec["publishNotReadyAddresses"] = True
    if headless:  # DNS answers with every ready pod's address (not-ready pods left out until their probe passes)
        spec["clusterIP"] = "None"
        spec["publishNotReadyAddresses"] = False
    return {"apiVersion": "v1", "kind": "Service", "metadata": _meta(name, topology, process, options), "spec": spec}


def port_feeders(topology: Topology, process: str) -> dict[int, list[str]]:
    """Each TCP PULL port of ``process``'s pod -> the processes that send to it: for the ingress's results port,
    every worker process in another pod (results, heartbeats); for a shard's, its producers' processes outside
    ``process`` (the ingress's is the one that serves it)."""
    out: dict[int, list[str]] = {}
    if serves_ingress(topology, process) and ingress_binds_tcp(topology):
        out[PULL_PORT] = [p.name for p in colocation.groups(topology) if p.name != process]
    for sp in shard_ports(topology, process):
        if sp.pull is None:
            continue
        owners = {ingress_pod(topology) if p == INGRESS else colocation.process_of(topology, p).name for p in topology.producers(sp.shard)}
        out[sp.pull] = sorted(owners - {process})
    return out


def feeders(topology: Topology, process: str) -> list[str]:
    """The processes that send to ``process``'s pod over TCP (:func:`port_feeders`, every port)."""
    return sorted({f for names in port_feeders(topology, process).values() for f in names})


def pull_ports(topology: Topology, process: str) -> list[int]:
    """The TCP PULL ports of ``process``'s pod (the ingress's results; its shards fed from outside it)."""
    return list(port_feeders(topology, process))


def metrics_ports(topology: Topology, process: str) -> list[int]:
    ingress = [METRICS_PORT] if serves_ingress(topology, process) else []
    return ingress + [sp.metrics for sp in shard_ports(topology, process)]


def key_owners(topology: Topology, process: str) -> list[str]:
    """Whose CURVE secret keys a process's pod holds: the ingress's where it runs, and every shard's of the process."""
    return ([INGRESS] if serves_ingress(topology, process) else []) + list(shards_of(topology, process))


def network_policy(topology: Topology, process: str, options: KubeOptions, names: Names) -> dict[str, Any]:
    """Admit on each PULL port only the processes that send to it (ports with the same senders share a rule),
    Prometheus on the metrics ports, anyone on the ingress's gRPC port."""
    by_senders: dict[tuple[str, ...], list[int]] = {}
    for port, senders in port_feeders(topology, process).items():
        if senders:  # nobody feeds it over TCP: no rule (an "In" with no values is invalid)
            by_senders.setdefault(tuple(senders), []).append(port)
    rules: list[dict[str, Any]] = [
        {
            "from": [
                {
                    "podSelector": {
                        "matchLabels": {INSTANCE_LABEL: topology.name},
                        "matchExpressions": [{"key": PROCESS_LABEL, "operator": "In", "values": list(senders)}],
                    }
                }
            ],
            "ports": [{"protocol": "TCP", "port": port} for port in ports],
        }
        for senders, ports in by_senders.items()
    ]
    rules.append(
        {
            "from": [{"namespaceSelector": {}, "podSelector": {"matchLabels": dict(options.prometheus_labels)}}],
            "ports": [{"protocol": "TCP", "port": port} for port in metrics_ports(topology, process)],
        }
    )
    if serves_ingress(topology, process):
        rules.append({"ports": [{"protocol": "TCP", "port": GRPC_PORT}]})  # clients, from anywhere
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": _meta(names.process[process], topology, process, options),
        "spec": {"podSelector": {"matchLabels": selector(topology, process)}, "policyTypes": ["Ingress"], "ingress": rules},
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ------------------------------------------------------------------ whole set
def manifests(
    topology: Topology,
    options: KubeOptions,
    *,
    curve_keys: Mapping[str, bytes] | None = None,
    tls_pair: tuple[bytes, bytes] | None = None,
) -> list[dict[str, Any]]:
    """Every object for ``topology``: Namespace (unless ``default``), ConfigMap, then per process its objects."""
    names = names_of(topology)
    if options.tls != (tls_pair is not None):
        raise UsageError("TLS for the ingress needs both its certificate and its key (--tls-cert and --tls-key)")
    processes = colocation.process_names_on(topology, None)
    host = colocation.ingress_process(topology)
    replicated = [s for s in host.shards if topology.shard(s).discovered or topology.shard(s).extra_replicas] if host else []
    if host is not None and replicated:
        raise UsageError(
            f"shard {replicated[0]!r} has replicas but runs in process {host.name!r}, which serves the ingress (one pod); "
            "give its replicas a process of their own (leave the shard out of that process's 'shards')"
        )
    curve = topology.security == security.CURVE
    if curve:
        missing = [k for p in processes for k in key_owners(topology, p) if not curve_keys or k not in curve_keys]
        if missing:
            raise UsageError(f"security is curve but there is no secret key for {missing}; run `pipeline keys DIR` first")
    pod_topology = rewrite(topology, options, names)
    text = topology_text(pod_topology)
    sha = hashlib.sha256(text.encode()).hexdigest()
    objects: list[dict[str, Any]] = []
    if options.namespace != "default":
        objects.append({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": options.namespace, "labels": {NAME_LABEL: APP_NAME}}})
    objects.append(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": _meta(names.configmap, topology, None, options),
            "data": {TOPOLOGY_CONFIGMAP_KEY: text},
        }
    )
    for process in processes:
        if curve:
            assert curve_keys is not None
            objects.append(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "type": "Opaque",
                    "metadata": _meta(names.secret(process), topology, process, options),
                    "data": {security.secret_path(KEYS_DIR, k).name: _b64(curve_keys[k]) for k in key_owners(topology, process)},
                }
            )
        if serves_ingress(topology, process) and tls_pair is not None:
            objects.append(
                {
                    "apiVersion": "v1",
                    "kind": "Secret",
                    "type": "kubernetes.io/tls",
                    "metadata": _meta(names.tls_secret, topology, process, options),
                    "data": {"tls.crt": _b64(tls_pair[0]), "tls.key": _b64(tls_pair[1])},
                }
            )
        objects += services(topology, process, options, names)
        objects.append(deployment(pod_topology, process, options, names, sha))
        objects.append(network_policy(topology, process, options, names))
    return objects


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:  # no &id001 anchors: each object reads on its own
        return True


def dump(objects: Sequence[Mapping[str, Any]]) -> str:
    """One YAML stream (``---`` between objects), block style, keys in their given order."""
    return "".join("---\n" + yaml.dump(dict(o), Dumper=_Dumper, sort_keys=False, width=120) for o in objects)


def file_name(obj: Mapping[str, Any]) -> str:
    """``<kind>-<name>.yaml`` (lowercase), for ``--out DIR``."""
    return f"{str(obj['kind']).lower()}-{obj['metadata']['name']}.yaml"
