"""``pipeline verify``: chain the shards and compare with the whole model, per output."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import oracle
from pipeline import topology as topo


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, metavar="DIR", help="a topology directory")
    p.add_argument("--batch-sizes", default="1,2,5", help="comma-separated batch sizes to check (default 1,2,5)")
    p.add_argument("--tolerance", type=float, default=0.0, help="largest absolute difference accepted (default 0: bitwise)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--unsafe", action="store_true", help="allow shard files that need unsafe deserialization")
    p.add_argument(
        "--allow-input-independent",
        action="store_true",
        help="go on (with a warning) when the whole model answers the same for every input, "
        "so that the comparison cannot tell a right answer from a wrong one",
    )


@dataclass
class Row:
    output: str
    batch: int
    max_abs_diff: float
    bitwise: bool


@dataclass
class Report:
    tolerance: float
    rows: list[Row] = field(default_factory=list)
    spread: oracle.Spread | None = None
    warning: str | None = None  # the comparison cannot tell right from wrong (allowed by the caller)

    @property
    def ok(self) -> bool:
        return all(r.bitwise or r.max_abs_diff <= self.tolerance for r in self.rows)

    def table(self) -> str:
        lines = [f"{'output':<32} {'batch':>5} {'max |diff|':>12}  bitwise  within tolerance ({self.tolerance:g})"]
        for r in self.rows:
            ok = r.bitwise or r.max_abs_diff <= self.tolerance
            lines.append(f"{r.output:<32} {r.batch:>5} {r.max_abs_diff:>12.3g}  {'yes' if r.bitwise else 'NO ':>7}  {'yes' if ok else 'NO'}")
        if self.spread is not None:
            lines.append(
                f"outputs of different inputs differ by at least {self.spread.smallest:.3g} "
                f"(median {self.spread.median:.3g}, {self.spread.rows} inputs): a wrong answer would show"
                if self.warning is None
                else f"WARNING: {self.warning}"
            )
        return "\n".join(lines)


def verify_directory(
    directory: Path,
    *,
    batch_sizes: tuple[int, ...] = (1, 2, 5),
    tolerance: float = 0.0,
    seed: int = 0,
    unsafe: bool = False,
    allow_input_independent: bool = False,
) -> Report:
    """Load ``model.keras`` and every shard fresh from disk and compare them on random inputs.

    Raises :class:`pipeline.oracle.NotDiscriminating` when the whole model's
    outputs for the different inputs do not differ by more than ``tolerance``
    (unless ``allow_input_independent``: then the report carries the warning).
    """
    from pipeline.partition.reference import call_chain, call_whole, random_inputs
    from pipeline.partition.source import load_keras_file, quiet_tensorflow

    quiet_tensorflow()
    topology = topo.load(directory)
    unsafe = unsafe or bool(topology.extra.get("unsafe", False))
    whole = load_keras_file(topology.model_path, unsafe=unsafe)
    shards = {s.name: load_keras_file(topology.shard_path(s.name), unsafe=unsafe) for s in topology.shards}
    rng = np.random.default_rng(seed)
    report = Report(tolerance=tolerance)
    seen_inputs, seen_outputs = [], []
    for batch in batch_sizes:
        inputs = random_inputs(topology.inputs, batch, rng, topology.extra.get("sample_input_shapes"))
        expected = call_whole(whole, inputs)
        received = call_chain(topology, shards, inputs)
        seen_inputs.append(inputs)
        seen_outputs.append(expected)
        for name in topology.output_names:
            a, b = expected[name], received[name]
            bitwise = a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()
            diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.shape == b.shape and a.size else (0.0 if a.shape == b.shape else float("inf"))
            report.rows.append(Row(output=name, batch=batch, max_abs_diff=diff, bitwise=bitwise))
    report.spread = oracle.spread(seen_inputs, seen_outputs)
    report.warning = oracle.require_discriminating(
        report.spread, tolerance, what=f"model {topology.name!r} on {sum(batch_sizes)} random inputs", allow=allow_input_independent
    )
    return report


def run(args: argparse.Namespace) -> int:
    batch_sizes = tuple(int(b) for b in args.batch_sizes.split(",") if b.strip())
    report = verify_directory(
        args.directory,
        batch_sizes=batch_sizes,
        tolerance=args.tolerance,
        seed=args.seed,
        unsafe=args.unsafe,
        allow_input_independent=args.allow_input_independent,
    )
    print(report.table())
    print("OK: the shards reproduce the whole model" if report.ok else "FAILED: the shards differ from the whole model")
    return 0 if report.ok else 1
