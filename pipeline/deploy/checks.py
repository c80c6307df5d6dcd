"""Checks of a generated manifest set that schemas cannot make: do the objects fit together?

Each function returns a list of problems (empty when all is well), phrased
as what was expected and what was found:

- every Service selects exactly one pod template, and its target ports are
  ports of that pod's container;
- every TCP address in the rewritten topology (the ConfigMap) names a
  generated Service, in the right namespace, on a port of it that leads to
  the right container port of the pod of the process serving that shard (with
  ``processes`` groups: the shard's own port in its group's pod); a shard fed
  only inside its process (``inproc://``) is reached by no Service port;
- the ingress's gRPC and metrics addresses lead to the pod that serves it (its
  own, or that of the worker process with ``ingress: true``), and its results
  address to that pod's results port when it binds one (a shard runs in
  another process), to no Service port otherwise;
- every Secret is mounted into the pod of the process it belongs to only, and
  a CURVE Secret holds the keys of that process's shards and of the ingress
  when it runs there, and no other;
- each process's NetworkPolicy admits on each PULL port exactly the processes
  that send to it over TCP (the shard's producers elsewhere; for the
  ingress's results port, every worker process in another pod);
- a shard whose replicas are found by DNS runs as many pods as its count,
  behind a headless Service that lists only ready pods, each pod reading its
  own address from the downward API; every other process runs one pod.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from pipeline import colocation
from pipeline import topology as topo
from pipeline.deploy import kubernetes as k8s

Obj = Mapping[str, Any]


def by_kind(objects: Sequence[Obj], kind: str) -> list[Obj]:
    return [o for o in objects if o.get("kind") == kind]


def _pod(deployment: Obj) -> Obj:
    return deployment["spec"]["template"]


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _container_ports(deployment: Obj) -> dict[str, int]:
    ports: dict[str, int] = {}
    for c in _pod(deployment)["spec"]["containers"]:
        for p in c.get("ports", []):
            ports[p.get("name", str(p["containerPort"]))] = p["containerPort"]
    return ports


def service_problems(objects: Sequence[Obj]) -> list[str]:
    problems = []
    deployments = by_kind(objects, "Deployment")
    for svc in by_kind(objects, "Service"):
        name = svc["metadata"]["name"]
        matched = [d for d in deployments if _selects(svc["spec"].get("selector", {}), _pod(d)["metadata"]["labels"])]
        if len(matched) != 1:
            problems.append(f"Service {name!r}: expected its selector to match one pod template, it matches {[d['metadata']['name'] for d in matched]}")
            continue
        ports = _container_ports(matched[0])
        for p in svc["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            if (isinstance(target, str) and target not in ports) or (isinstance(target, int) and target not in ports.values()):
                problems.append(f"Service {name!r} port {p['port']}: targetPort {target!r} is not a port of {matched[0]['metadata']['name']!r} {ports}")
    return problems


def pod_topology(objects: Sequence[Obj]) -> dict[str, Any]:
    """The topology the pods read (the ConfigMap's topology.yaml)."""
    (cm,) = [c for c in by_kind(objects, "ConfigMap") if k8s.TOPOLOGY_CONFIGMAP_KEY in c.get("data", {})]
    return yaml.safe_load(cm["data"][k8s.TOPOLOGY_CONFIGMAP_KEY])  # type: ignore[no-any-return]


def _resolve(objects: Sequence[Obj], host: str, port: int) -> tuple[str | None, int | None, str]:
    """(process whose pod serves it, container port, problem) for a host:port in the topology."""
    for svc in by_kind(objects, "Service"):
        meta = svc["metadata"]
        names = {meta["name"], f"{meta['name']}.{meta['namespace']}", f"{meta['name']}.{meta['namespace']}.svc"}
        if host not in names and not host.startswith(f"{meta['name']}.{meta['namespace']}.svc."):
            continue
        for p in svc["spec"]["ports"]:
            if p["port"] != port:
                continue
            deployments = [d for d in by_kind(objects, "Deployment") if _selects(svc["spec"]["selector"], _pod(d)["metadata"]["labels"])]
            if len(deployments) != 1:
                return None, None, f"Service {meta['name']!r} selects {len(deployments)} pod templates"
            target = p.get("targetPort", port)
            cport = _container_ports(deployments[0]).get(target) if isinstance(target, str) else target
            return _pod(deployments[0])["metadata"]["labels"][k8s.PROCESS_LABEL], cport, ""
        return None, None, f"Service {meta['name']!r} has no port {port} (ports {[p['port'] for p in svc['spec']['ports']]})"
    return None, None, f"no generated Service is named by {host!r}"


def address_problems(objects: Sequence[Obj]) -> list[str]:
    """Every endpoint, gRPC and metrics address of the pods' topology leads to the right process and port."""
    t = pod_topology(objects)
    parsed = topo.from_dict(t, directory=Path("."))
    wanted: list[tuple[str, str, str, int]] = []  # (what, address, process, container port)
    unreached: list[tuple[str, str]] = []  # (what, address): no Service port may lead there
    bind_ports: dict[str, int | None] = {}
    for s in t["shards"]:
        process = colocation.process_of(parsed, s["name"]).name
        (ports,) = [p for p in k8s.shard_ports(parsed, process) if p.shard == s["name"]]
        bind_ports[s["name"]] = ports.pull
        if ports.pull is not None:
            wanted.append((f"shard {s['name']} endpoint", s["endpoint"], process, ports.pull))
        else:
            unreached.append((f"shard {s['name']} endpoint (fed only inside process {process!r})", s["endpoint"]))
        wanted.append((f"shard {s['name']} metrics", s["metrics"], process, ports.metrics))
    ing = t["ingress"]
    serving = k8s.ingress_pod(parsed)  # its own process, or the worker process that serves it too
    if k8s.ingress_binds_tcp(parsed):
        wanted.append(("ingress results", ing["results"], serving, k8s.PULL_PORT))
    else:
        unreached.append((f"ingress results (every shard runs in process {serving!r})", ing["results"]))
    wanted += [
        ("ingress grpc", ing["grpc"], serving, k8s.GRPC_PORT),
        ("ingress metrics", ing["metrics"], serving, k8s.METRICS_PORT),
    ]
    problems = []
    for what, address, process, cport in wanted:
        parts = urlsplit(address if "://" in address else f"tcp://{address}")
        if parts.hostname is None or parts.port is None:
            problems.append(f"{what}: {address!r} is not HOST:PORT")
            continue
        got, got_port, problem = _resolve(objects, parts.hostname, parts.port)
        if problem:
            problems.append(f"{what} {address!r}: {problem}")
        elif (got, got_port) != (process, cport):
            problems.append(f"{what} {address!r}: expected to reach {process!r} port {cport}, it reaches {got!r} port {got_port}")
    for what, address in unreached:
        parts = urlsplit(address)
        if parts.hostname is not None and parts.port is not None:
            got, got_port, problem = _resolve(objects, parts.hostname, parts.port)
            if not problem:
                problems.append(f"{what} {address!r}: expected no Service port to lead there, it reaches {got!r} port {got_port}")
    for s in t["shards"]:
        want = bind_ports[s["name"]]
        if want is not None and urlsplit(s["bind"]).port != want:
            problems.append(f"shard {s['name']} binds {s['bind']!r}, not its container port {want}")
    return problems


def secret_problems(objects: Sequence[Obj]) -> list[str]:
    """Each Secret is mounted only into its own process's pod; a CURVE Secret holds the keys of that process's
    shards (and the ingress's, where it runs) and no other."""
    parsed = topo.from_dict(pod_topology(objects), directory=Path("."))
    problems = []
    secrets = {s["metadata"]["name"]: s for s in by_kind(objects, "Secret")}
    mounted: dict[str, list[str]] = {name: [] for name in secrets}
    for d in by_kind(objects, "Deployment"):
        process = _pod(d)["metadata"]["labels"][k8s.PROCESS_LABEL]
        for v in _pod(d)["spec"].get("volumes", []):
            if "secret" not in v:
                continue
            name = v["secret"]["secretName"]
            if name not in secrets:
                problems.append(f"Deployment {d['metadata']['name']!r} mounts Secret {name!r}, which is not generated")
                continue
            mounted[name].append(process)
            owner = secrets[name]["metadata"]["labels"].get(k8s.PROCESS_LABEL)
            if owner != process:
                problems.append(f"Secret {name!r} of process {owner!r} is mounted into the pod of {process!r}")
    for name, secret in secrets.items():
        owner = secret["metadata"]["labels"].get(k8s.PROCESS_LABEL)
        if mounted[name] != [owner]:
            problems.append(f"Secret {name!r}: expected mounted into the pod of {owner!r} only, it is mounted into {mounted[name]}")
        if secret["type"] == "Opaque":
            keys = sorted(secret.get("data", {}))
            want = sorted(f"{k}.key_secret" for k in k8s.key_owners(parsed, owner))
            if keys != want:
                problems.append(f"Secret {name!r} of process {owner!r}: expected exactly {want}, it holds {keys}")
    return problems


def policy_problems(objects: Sequence[Obj]) -> list[str]:
    """Each PULL port of a process's pod admits exactly the processes that send to it over TCP."""
    t = topo.from_dict(pod_topology(objects), directory=Path("."))
    problems = []
    policies = by_kind(objects, "NetworkPolicy")
    for process in colocation.process_names_on(t, None):
        want = k8s.port_feeders(t, process)
        mine = [p for p in policies if p["spec"]["podSelector"]["matchLabels"].get(k8s.PROCESS_LABEL) == process]
        if len(mine) != 1:
            problems.append(f"process {process!r}: expected one NetworkPolicy, found {len(mine)}")
            continue
        allowed: dict[int, list[str]] = {port: [] for port in want}
        for rule in mine[0]["spec"]["ingress"]:
            ports = [p["port"] for p in rule.get("ports", []) if p["port"] in want]
            senders = [] if "from" in rule else ["(anyone)"]
            for peer in rule.get("from", []):
                for expr in peer.get("podSelector", {}).get("matchExpressions", []):
                    senders += expr["values"]
                name = peer.get("podSelector", {}).get("matchLabels", {}).get(k8s.PROCESS_LABEL)
                if name:
                    senders.append(name)
            for port in ports:
                allowed[port] += senders
        for port, senders in want.items():
            if sorted(allowed[port]) != sorted(senders):
                problems.append(f"NetworkPolicy of {process!r}: expected its PULL port {port} open to {sorted(senders)}, it admits {sorted(allowed[port])}")
    return problems


def replica_problems(objects: Sequence[Obj]) -> list[str]:
    """Replicas found by DNS: Deployment replicas = count, a headless Service of ready pods, the pod IP in the env."""
    t = topo.from_dict(pod_topology(objects), directory=Path("."))
    problems = []
    want_env = {"name": k8s.REPLICA_ADDRESS_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    for process in colocation.process_names_on(t, None):
        shards = k8s.shards_of(t, process)
        count = t.shard(shards[0]).discovered if len(shards) == 1 else 0
        deployments = [d for d in by_kind(objects, "Deployment") if _pod(d)["metadata"]["labels"].get(k8s.PROCESS_LABEL) == process]
        if len(deployments) != 1:
            continue  # service_problems and address_problems say so
        d = deployments[0]
        if d["spec"].get("replicas", 1) != (count or 1):
            problems.append(f"Deployment of {process!r}: expected replicas {count or 1}, it has {d['spec'].get('replicas', 1)}")
        env = _pod(d)["spec"]["containers"][0].get("env", [])
        if bool(count) != (want_env in env):
            problems.append(
                f"Deployment of {process!r}: expected {k8s.REPLICA_ADDRESS_ENV} from status.podIP "
                f"{'in' if count else 'not in'} its env (replicas found by DNS: {count or 'none'})"
            )
        for svc in by_kind(objects, "Service"):
            if not _selects(svc["spec"].get("selector", {}), _pod(d)["metadata"]["labels"]) or svc["spec"].get("publishNotReadyAddresses"):
                continue
            headless = svc["spec"].get("clusterIP") == "None"
            if bool(count) != headless:
                problems.append(
                    f"Service {svc['metadata']['name']!r} of {process!r}: expected {'a headless' if count else 'a ClusterIP'} Service "
                    f"(replicas found by DNS: {count or 'none'}), it is {'headless' if headless else 'a ClusterIP'}"
                )
    return problems


def all_problems(objects: Sequence[Obj]) -> list[str]:
    return (
        service_problems(objects)
        + address_problems(objects)
        + secret_problems(objects)
        + policy_problems(objects)
        + replica_problems(objects)
    )
