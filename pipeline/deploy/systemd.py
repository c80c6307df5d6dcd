"""systemd units for the processes a topology places on one host, and a target that groups them.

Each process is a ``Type=exec`` service that systemd restarts when it fails
(``Restart=on-failure``; a clean stop, exit 0 after SIGTERM, is not a
failure), stops with SIGTERM and kills only after the process's drain plus a
margin (``TimeoutStopSec``), runs as a dedicated user with the usual
hardening (``NoNewPrivileges``, ``ProtectSystem=strict`` with write access
only where its ipc:// sockets live, private /tmp and devices, no
capabilities), and reads ``PIPELINE_KEYS_DIR`` and any other ``PIPELINE_*``
setting from an environment file. Unlike ``honcho start``, one process dying
does not stop the others: the target only groups them for start and stop.

Replicas of a shard (:mod:`pipeline.replicas`, a static ``replicas:`` list) are
processes of their own: replica *k* of ``shard2`` gets a unit on the host its
entry names, ``...-shard2-rk.service``, running ``pipeline worker DIR --shard
shard2 --replica k`` (process ``shard2@k`` in heartbeats and metrics, on its
own endpoint and metrics address).

A worker process that serves the ingress too (``ingress: true`` in its
``processes`` entry) is one unit and there is no ingress unit: it runs
``pipeline worker DIR --process NAME``, gives the ingress its drain through
``PIPELINE_INGRESS_DRAIN`` (the ingress's other settings, TLS files and
``PIPELINE_KEYS_DIR`` come from the environment file, as for an ingress unit),
and stops within the ingress's drain plus its shards'.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from pipeline import colocation, replicas
from pipeline.deploy.kubernetes import EXIT_MARGIN_S, GROUP_JOIN_MARGIN_S, INGRESS_ENV_PREFIX, dns_label, hosts_ingress, ingress_binds_tcp, shards_of
from pipeline.errors import UsageError
from pipeline.topology import INGRESS, Topology

DEFAULT_USER = "keras-pipeline"
ENV_DIR = "/etc/keras-pipeline"


@dataclass(frozen=True)
class UnitOptions:
    """What ``pipeline deploy systemd`` is told besides the topology and the host."""

    executable: str  # absolute path of the `pipeline` command on the host
    directory: str  # absolute path of the topology directory on the host
    user: str = DEFAULT_USER
    drain_s: float = 10.0
    environment_file: str = ""  # default: /etc/keras-pipeline/<app>.env
    restart_s: float = 2.0

    @property
    def stop_timeout_s(self) -> int:
        return int(math.ceil(self.drain_s) + EXIT_MARGIN_S)

    def stop_timeout_for(self, shards: int, ingress: bool = False) -> int:
        """TimeoutStopSec of a process serving ``shards`` shards: they drain at once, then it joins their threads;
        with the ``ingress`` there too, it drains first (a budget of its own, then its thread is joined)."""
        if ingress:
            return self.stop_timeout_s + math.ceil(self.drain_s) + 2 * GROUP_JOIN_MARGIN_S
        return self.stop_timeout_s + (GROUP_JOIN_MARGIN_S if shards > 1 else 0)


def unit_name(topology: Topology, process: str) -> str:
    """``keras-pipeline-<topology>-<process>.service``; replica k of a shard (``shard2@k``) is ``...-shard2-rk``."""
    label = process.replace(replicas.SEPARATOR, "-r")
    return f"keras-pipeline-{dns_label(topology.name, 'topology name')}-{dns_label(label, 'process')}.service"


def _replica(topology: Topology, process: str) -> tuple[str, int] | None:
    """(shard, replica) of a replica's process name (``shard2@1``); ``None`` for any other process."""
    return replicas.shard_of(topology, process) if replicas.SEPARATOR in process else None


def _shards(topology: Topology, process: str) -> tuple[str, ...]:
    replica = _replica(topology, process)
    return (replica[0],) if replica is not None else shards_of(topology, process)


def target_name(topology: Topology) -> str:
    return f"keras-pipeline-{dns_label(topology.name, 'topology name')}.target"


def environment_file(topology: Topology, options: UnitOptions) -> str:
    return options.environment_file or f"{ENV_DIR}/{dns_label(topology.name, 'topology name')}.env"


def _ipc_dirs(topology: Topology, process: str) -> list[str]:
    """Folders of the ipc:// endpoints a process binds or connects to: the only places it writes."""
    replica = _replica(topology, process)
    if replica is not None:
        endpoints = [topology.shard(replica[0]).replicas[replica[1]].bind]
    elif process == INGRESS:
        endpoints = [topology.ingress.bind]
    else:
        endpoints = [topology.shard(s).bind for s in shards_of(topology, process)]
        if hosts_ingress(topology, process) and ingress_binds_tcp(topology):
            endpoints.append(topology.ingress.bind)  # the ingress in it binds its results for shards elsewhere
    endpoints += [topology.ingress.results] + [s.endpoint for s in topology.shards]
    dirs = sorted({str(Path(urlsplit(e).path or e[len("ipc://"):]).parent) for e in endpoints if e.startswith("ipc://")})
    return dirs


def _command(topology: Topology, process: str, options: UnitOptions) -> list[str]:
    drain = f"{options.drain_s:g}"
    if process == INGRESS:
        return [options.executable, "ingress", options.directory, "--drain", drain]
    replica = _replica(topology, process)
    if replica is not None:
        which = ["--shard", replica[0], "--replica", str(replica[1])]
    else:
        which = colocation.worker_selector(topology, process)
    return [options.executable, "worker", options.directory, *which, "--drain-timeout", drain]


def unit(topology: Topology, process: str, host: str, options: UnitOptions) -> str:
    """One service unit's text."""
    shards = _shards(topology, process)
    replica = _replica(topology, process)
    if process == INGRESS:
        role = "ingress (KServe v2 gRPC)"
    elif replica is not None:
        role = f"replica {replica[1]} of {len(topology.shard(replica[0]).replicas)} of shard {replica[0]}"
    elif hosts_ingress(topology, process):
        role = f"worker process serving the ingress (KServe v2 gRPC) and shard{'s' if len(shards) > 1 else ''} {', '.join(shards)}"
    else:
        role = "shard worker" if len(shards) == 1 else f"worker process of shards {', '.join(shards)}"
    rw = _ipc_dirs(topology, process)
    ingress = hosts_ingress(topology, process)
    # the ingress in a worker process takes its drain from the environment (`pipeline worker` has no ingress flags)
    ingress_env = f" {INGRESS_ENV_PREFIX}DRAIN={options.drain_s:g}" if ingress else ""
    exec_start = " ".join(shlex.quote(a) for a in _command(topology, process, options))
    lines = [
        "# Written by `pipeline deploy systemd`; see docs/DEPLOY.md.",
        "[Unit]",
        f"Description=keras-pipeline {topology.name}: {process} ({role}) on {host}",
        "Documentation=https://github.com/keras-pipeline/keras-pipeline/blob/main/docs/DEPLOY.md",
        "Wants=network-online.target",
        "After=network-online.target",
        f"PartOf={target_name(topology)}",
        "",
        "[Service]",
        "Type=exec",
        f"User={options.user}",
        f"Group={options.user}",
        f"EnvironmentFile=-{environment_file(topology, options)}",
        f"Environment=PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2 HOME=/tmp KERAS_HOME=/tmp/.keras{ingress_env}",
        f"ExecStart={exec_start}",
        "KillSignal=SIGTERM",
        "KillMode=mixed",
        f"TimeoutStopSec={options.stop_timeout_for(len(shards), ingress)}",
        "Restart=on-failure",
        f"RestartSec={options.restart_s:g}",
        # hardening
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "RestrictNamespaces=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "LockPersonality=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK",
        "CapabilityBoundingSet=",
        "AmbientCapabilities=",
        "SystemCallArchitectures=native",
        "UMask=0077",
        *([f"ReadWritePaths={' '.join(rw)}"] if rw else []),
        "",
        "[Install]",
        f"WantedBy={target_name(topology)}",
        "",
    ]
    return "\n".join(lines)


def target(topology: Topology, host: str, units: list[str]) -> str:
    return "\n".join(
        [
            "# Written by `pipeline deploy systemd`; `systemctl enable --now " + target_name(topology) + "`",
            "[Unit]",
            f"Description=keras-pipeline {topology.name}: the processes placed on {host}",
            f"Wants={' '.join(units)}",
            f"After={' '.join(units)}",
            "",
            "[Install]",
            "WantedBy=multi-user.target",
            "",
        ]
    )


def units(topology: Topology, host: str, options: UnitOptions) -> dict[str, str]:
    """File name -> text: one service per process on ``host`` (a host name or address; a ``processes`` group
    is one process, one unit; each replica of a shard is a process on its own replica's host) and the target."""
    if not Path(options.executable).is_absolute() or not Path(options.directory).is_absolute():
        raise UsageError(
            f"systemd needs absolute paths; received executable {options.executable!r} and topology {options.directory!r}"
        )
    from pipeline.cluster import address_of

    processes = replicas.processes_on(topology, address_of(topology, host))  # a cluster host's name works too
    if not processes:
        hosts = replicas.hosts_of(topology)
        raise UsageError(f"no process of topology {topology.name!r} is placed on host {host!r}; its hosts are {hosts}")
    out = {unit_name(topology, p): unit(topology, p, host, options) for p in processes}
    out[target_name(topology)] = target(topology, host, list(out))
    return out
