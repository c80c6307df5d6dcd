"""pipeline: split a Keras model into shards and serve them as a ZeroMQ pipeline behind a KServe v2 gRPC ingress.

Each sub-command lives in its own module, which exposes ``add_arguments(parser)``
and ``run(args) -> int``. Command modules import TensorFlow and Keras inside
``run`` only, so ``pipeline --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from pipeline.errors import PipelineError

#: sub-command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "partition": ("pipeline.partition.command", "split a Keras model into shards and write a topology directory"),
    "verify": ("pipeline.partition.verify", "check that the shards chained reproduce the whole model"),
    "show": ("pipeline.partition.show", "print the plan table and the shard graph (DOT or Mermaid)"),
    "place": ("pipeline.partition.place", "place an existing topology's shards on the hosts of a cluster file, without re-cutting"),
    "colocate": ("pipeline.colocate_command", "group the shards of each host into one process (or --per-shard), without re-cutting"),
    "replicas": ("pipeline.replicas", "set the number of replicas of shards in an existing topology (e.g. shard2=3)"),
    "procfile": ("pipeline.procfile", "write the Procfile lines for a topology (or one host of it)"),
    "worker": ("pipeline.serving.worker", "run one shard worker"),
    "ingress": ("pipeline.serving.ingress", "run the KServe v2 gRPC ingress"),
    "infer": ("pipeline.serving.client", "send one inference request and print a summary"),
    "bench": ("pipeline.bench.command", "the pipeline beside the whole model run locally: latency, throughput, hops"),
    "keys": ("pipeline.security.keys", "make a CurveZMQ key pair per process and record the public keys in the topology"),
    "record": ("pipeline.soak.record", "write a replay file: inputs and the whole model's reference outputs"),
    "soak": ("pipeline.soak.soak", "replay a file through the ingress for a duration, check every answer, report"),
    "top": ("pipeline.top", "a live view of a running pipeline: each shard's state, rates, batches, compute times"),
    "probe": ("pipeline.probe.command", "measure this host's speed or a link's bandwidth and latency, and write them into a cluster file"),
    "deploy": ("pipeline.deploy.command", "generate Kubernetes manifests, systemd units or the container recipe from a topology"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser; only the chosen sub-command's module is imported (the others just list their help)."""
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_module=module)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # before any command imports TensorFlow
    if argv[:1] in (["worker"], ["ingress"]):  # serving processes: before any import starts a thread
        from pipeline import gil
        from pipeline.malloc import limit_arenas

        try:
            limit_arenas()
            gil.configure()
        except ValueError as exc:
            print(f"pipeline {argv[0]}: error: {exc}", file=sys.stderr)
            return 2
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        return int(args._module.run(args) or 0)
    except PipelineError as exc:
        print(f"pipeline {args.command}: error: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
