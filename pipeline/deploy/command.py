"""``pipeline deploy kubernetes|systemd|containerfile DIR``: deployment recipes generated from a topology.

- ``kubernetes``: every object as one YAML stream on stdout, or one file per
  object in ``--out DIR`` (apply with ``kubectl apply -f DIR``);
- ``systemd --host H``: a unit per process placed on H, a target grouping
  them, and the environment file they read, into ``--out DIR``;
- ``containerfile``: the image recipe (project, shard files, non-root user),
  and the ignore files that keep secret keys out of the build context.

See docs/DEPLOY.md.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from pipeline import topology as topo
from pipeline.deploy import containerfile, kubernetes, systemd
from pipeline.errors import UsageError
from pipeline.log import get_logger
from pipeline.wire import security

log = get_logger("pipeline.deploy")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", metavar="TARGET", required=True)

    k = sub.add_parser("kubernetes", help="Deployments, Services, ConfigMap, Secrets and NetworkPolicies for a topology")
    k.add_argument("directory", type=Path, metavar="DIR", help="a topology directory")
    k.add_argument("--image", default="keras-pipeline:latest", help="the image built from `pipeline deploy containerfile`")
    k.add_argument("--namespace", default="default", help="Kubernetes namespace (a Namespace object is written unless 'default')")
    k.add_argument("--out", type=Path, help="write one file per object into this folder (default: one stream on stdout)")
    k.add_argument("--cluster-domain", default="cluster.local", help="the cluster's DNS domain (default cluster.local)")
    k.add_argument("--drain", type=float, default=10.0, help="seconds each process gets to drain on SIGTERM (default 10)")
    k.add_argument("--prestop", type=int, default=5, help="seconds a terminating pod waits before SIGTERM (default 5)")
    k.add_argument("--startup-timeout", type=int, default=600, help="seconds a shard may take to load and warm up (default 600)")
    k.add_argument("--cpus", type=float, help="CPUs the shards share by their planned compute share (default: 1 per shard)")
    k.add_argument("--keys-dir", type=Path, help=f"CURVE secret keys (default DIR/{security.KEYS_DIRNAME})")
    k.add_argument("--tls-cert", type=Path, metavar="PEM", help="the ingress's TLS certificate chain (stored in a Secret)")
    k.add_argument("--tls-key", type=Path, metavar="PEM", help="the ingress's TLS private key (stored in a Secret)")
    k.add_argument("--host-label", default=kubernetes.DEFAULT_HOST_LABEL, help="node label naming a topology host")
    k.add_argument(
        "--prometheus-label",
        default=f"{kubernetes.NAME_LABEL}=prometheus",
        metavar="KEY=VALUE",
        help="label of the Prometheus pods the NetworkPolicies let scrape (any namespace)",
    )

    s = sub.add_parser("systemd", help="systemd units for the processes a topology places on one host")
    s.add_argument("directory", type=Path, metavar="DIR", help="a topology directory")
    s.add_argument("--host", required=True, help="the host (name or address) whose processes get units")
    s.add_argument("--out", type=Path, required=True, help="folder for the unit files (then copy to /etc/systemd/system)")
    s.add_argument("--topology-dir", help="absolute path of the topology directory on that host (default: DIR's)")
    s.add_argument("--executable", help="absolute path of `pipeline` on that host (default: the one running now)")
    s.add_argument("--user", default=systemd.DEFAULT_USER, help=f"system user the processes run as (default {systemd.DEFAULT_USER})")
    s.add_argument("--drain", type=float, default=10.0, help="seconds each process gets to drain on SIGTERM (default 10)")
    s.add_argument("--keys-dir", help="where that host keeps its CURVE secret keys (written into the environment file)")

    c = sub.add_parser("containerfile", help="the image recipe: project, shard files, non-root user")
    c.add_argument("directory", type=Path, metavar="DIR", help="a topology directory inside the build context")
    c.add_argument("--context", type=Path, default=Path("."), help="the build context: the project's root (default .)")
    c.add_argument("--out", type=Path, help="where to write it (default CONTEXT/Containerfile); '-' prints it")
    c.add_argument("--base-image", default=containerfile.BASE_IMAGE, help=f"default {containerfile.BASE_IMAGE}")
    c.add_argument("--pip", action="append", default=[], metavar="REQ", help="extra package to install (custom layers), repeatable")


def run(args: argparse.Namespace) -> int:
    return {"kubernetes": _kubernetes, "systemd": _systemd, "containerfile": _containerfile}[args.target](args)


# ------------------------------------------------------------------ kubernetes
def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {what} {str(path)!r}: {exc.strerror}") from None


def _label(text: str) -> dict[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UsageError(f"--prometheus-label {text!r}: expected KEY=VALUE")
    return {key: value}


def _kubernetes(args: argparse.Namespace) -> int:
    topology = topo.load(args.directory)
    if (args.tls_cert is None) != (args.tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    options = kubernetes.KubeOptions(
        image=args.image,
        namespace=kubernetes.dns_label(args.namespace, "namespace") if args.namespace != "default" else "default",
        cluster_domain=args.cluster_domain,
        drain_s=args.drain,
        prestop_s=args.prestop,
        startup_timeout_s=args.startup_timeout,
        cpu_total=args.cpus,
        host_label=args.host_label,
        prometheus_labels=_label(args.prometheus_label),
        tls=args.tls_cert is not None,
    )
    if options.drain_s < 0 or options.prestop_s < 0 or options.startup_timeout_s <= 0:
        raise UsageError("--drain and --prestop must be >= 0 and --startup-timeout > 0")
    keys = None
    if topology.security == security.CURVE:
        keys_dir = args.keys_dir or args.directory / security.KEYS_DIRNAME
        keys = {}
        for process in topology.processes_on(None):
            path = security.secret_path(keys_dir, process)
            security.read_secret(keys_dir, process)  # refuses a missing, unreadable or malformed key now
            keys[process] = _read(path, "the secret key")
    tls_pair = (_read(args.tls_cert, "the TLS certificate"), _read(args.tls_key, "the TLS key")) if options.tls else None
    objects = kubernetes.manifests(topology, options, curve_keys=keys, tls_pair=tls_pair)
    if args.out is None:
        sys.stdout.write(kubernetes.dump(objects))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for old in args.out.glob("*.yaml"):  # a re-generation must not leave objects of a previous topology behind
        old.unlink()
    for i, obj in enumerate(objects):
        (args.out / f"{i:02d}-{kubernetes.file_name(obj)}").write_text(kubernetes.dump([obj]))
    print(f"wrote {len(objects)} objects for {topology.name!r} into {args.out} (kubectl apply -f {args.out})")
    return 0


# --------------------------------------------------------------------- systemd
def _systemd(args: argparse.Namespace) -> int:
    topology = topo.load(args.directory, check_files=False)
    executable = args.executable or shutil.which("pipeline") or str(Path(sys.executable).with_name("pipeline"))
    options = systemd.UnitOptions(
        executable=executable,
        directory=args.topology_dir or str(args.directory.resolve()),
        user=args.user,
        drain_s=args.drain,
    )
    files = systemd.units(topology, args.host, options)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (args.out / name).write_text(text)
    env_name = Path(systemd.environment_file(topology, options)).name
    keys_line = f"PIPELINE_KEYS_DIR={args.keys_dir}" if args.keys_dir else f"# PIPELINE_KEYS_DIR={systemd.ENV_DIR}/keys"
    (args.out / env_name).write_text(
        "# Read by every unit of this topology on this host (EnvironmentFile=); PIPELINE_* settings go here.\n"
        "# The keys folder holds only this host's secret keys, owned by the service user, mode 0600.\n"
        f"{keys_line}\n"
    )
    print(
        f"wrote {len(files) - 1} units and {systemd.target_name(topology)} into {args.out}; install with\n"
        f"  cp {args.out}/*.service {args.out}/*.target /etc/systemd/system/ && "
        f"cp {args.out}/{env_name} {systemd.environment_file(topology, options)}\n"
        f"  systemctl daemon-reload && systemctl enable --now {systemd.target_name(topology)}"
    )
    return 0


# --------------------------------------------------------------- containerfile
def _containerfile(args: argparse.Namespace) -> int:
    topology = topo.load(args.directory)
    text = containerfile.render(topology, args.context, base_image=args.base_image, pip=args.pip)
    if args.out is not None and str(args.out) == "-":
        sys.stdout.write(text)
        return 0
    out = args.out or args.context / "Containerfile"
    out.write_text(text)
    for ignore in (".containerignore", ".dockerignore"):
        path = args.context / ignore
        if not path.exists():
            path.write_text(containerfile.IGNORE)
    print(f"wrote {out}; build with: podman build -f {out} -t IMAGE {args.context}")
    return 0
