"""``pipeline keys DIR``: a CurveZMQ key pair per process of a topology.

Writes each process's secret certificate to ``DIR/keys/<process>.key_secret``
(or ``--keys-dir``), mode 0600, and records every public key in
``topology.yaml`` (``curve_public_key`` of each shard and of the ingress).
Unless ``--no-enable`` is given it also sets ``security: curve``, which turns
CURVE on for every ZeroMQ link the next time the processes start.

Existing keys are kept (so running it twice is harmless) unless ``--force``
makes new ones for every process, which is how keys are rotated: restart every
process afterwards. On several hosts, copy each secret file only to the host
that runs its process (see docs/SECURITY.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import topology as topo
from pipeline.errors import UsageError
from pipeline.wire import security


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", type=Path, help="topology directory (holds topology.yaml)")
    parser.add_argument(
        "--keys-dir",
        metavar="PATH",
        type=Path,
        help=f"where to write the secret keys (default DIR/{security.KEYS_DIRNAME})",
    )
    parser.add_argument("--force", action="store_true", help="make new key pairs even where keys exist (rotation)")
    parser.add_argument(
        "--no-enable",
        dest="enable",
        action="store_false",
        help="record the public keys but leave the topology's `security` setting as it is",
    )


def run(args: argparse.Namespace) -> int:
    topology = topo.load(args.directory, check_files=False)
    keys_dir = Path(args.keys_dir) if args.keys_dir else Path(args.directory) / security.KEYS_DIRNAME
    made, kept = generate_keys(topology, keys_dir, force=args.force, enable=args.enable)
    for process in made:
        print(f"wrote {security.secret_path(keys_dir, process)} (mode 600)")
    for process in kept:
        print(f"kept {security.secret_path(keys_dir, process)}")
    state = "curve" if args.enable else topology.security
    print(f"recorded {len(made) + len(kept)} public keys in {Path(args.directory) / topo.TOPOLOGY_FILE} (security: {state})")
    return 0


def generate_keys(
    topology: topo.Topology, keys_dir: Path, *, force: bool = False, enable: bool = True
) -> tuple[list[str], list[str]]:
    """Make or reuse a key pair per process, record the public keys; return (made, kept) process names."""
    processes = topology.processes_on(None)
    for process in processes:
        security.check_process_name(process)
    made: list[str] = []
    kept: list[str] = []
    publics: dict[str, str] = {}
    for process in processes:
        path = security.secret_path(keys_dir, process)
        if path.exists() and not force:
            pair = security.read_secret(keys_dir, process)
            kept.append(process)
        else:
            pair = security.generate()
            security.write_secret(keys_dir, process, pair)
            made.append(process)
        publics[process] = pair.public.decode()
    updated = security.with_public_keys(topology, publics, security.CURVE if enable else None)
    security.check_topology(updated)
    updated.write(topology.directory)
    return made, kept


def main() -> int:  # pragma: no cover - `python -m pipeline.security.keys`
    parser = argparse.ArgumentParser(prog="pipeline keys")
    add_arguments(parser)
    try:
        return run(parser.parse_args())
    except UsageError as exc:
        print(f"pipeline keys: error: {exc.message}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
