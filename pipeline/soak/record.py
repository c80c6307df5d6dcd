"""``pipeline record DIR --count N --out FILE``: write a replay file for a topology.

The inputs are random of the declared dtypes and shapes (the default),
images from a folder resized to the input shape (``--images``), rows of a
``.npy``/``.npz`` (``--npy``), or the inputs of another replay file
(``--replay``, e.g. traffic the ingress recorded, to give it reference
outputs from the whole model). The reference outputs are always computed by
``DIR/model.keras``, the unsplit model, compiled as the workers compile their
shards and with their thread count (both change the last bits), so ``pipeline soak`` checks the pipeline against the model itself. The
file also records the batching tolerance (``pipeline/oracle.py``), and the
command refuses to write it when the reference outputs of different inputs do
not differ by more than that (``--allow-input-independent`` to go on).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import oracle
from pipeline import topology as topo
from pipeline.errors import UsageError
from pipeline.soak import replay
from pipeline.wire.codec import dtype_name

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", type=Path, metavar="DIR", help="a topology directory (its model.keras computes the reference)")
    p.add_argument("--count", "-n", type=int, default=32, help="number of requests to record (default 32)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE", help="replay file to write (.npz)")
    p.add_argument("--batch", type=int, default=1, help="rows per request (default 1)")
    p.add_argument("--seed", type=int, default=0, help="seed of random inputs (default 0)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--images", type=Path, metavar="FOLDER", help="images resized to the input's height and width (pixel values 0..255)")
    source.add_argument("--npy", type=Path, metavar="FILE", help=".npy (one-input model) or .npz keyed by input name; rows taken in order")
    source.add_argument("--replay", type=Path, metavar="FILE", help="take the inputs of a replay file (e.g. recorded by the ingress)")
    p.add_argument("--unsafe", action="store_true", help="allow a model.keras that needs unsafe deserialization")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="TensorFlow intra-op threads for the reference (default: the workers' default: 1, or with co-located "
        "shards their process's pool, its CPUs divided among its shards unless the topology says). The last bits of "
        "a convolution depend on it, so a bitwise reference uses the workers' count",
    )
    p.add_argument(
        "--allow-input-independent",
        action="store_true",
        help="write the file (with a warning) even when the reference outputs do not depend on the input",
    )


def run(args: argparse.Namespace) -> int:
    if args.count < 1 or args.batch < 1:
        raise UsageError(f"--count and --batch must be >= 1, received {args.count} and {args.batch}")
    topology = topo.load(args.directory, check_files=False)
    if not topology.model_path.is_file():
        raise UsageError(f"{str(topology.model_path)!r} does not exist: the reference needs the whole model (written by `pipeline partition`)")
    inputs, source = _input_source(topology, args)

    from pipeline.partition.reference import call_compiled, compiled
    from pipeline.partition.source import load_keras_file, quiet_tensorflow

    quiet_tensorflow()
    from pipeline.serving.runtime import DEFAULT_INTER_OP_THREADS, DEFAULT_INTRA_OP_THREADS, configure_tensorflow

    from pipeline.colocation import worker_threads

    configure_tensorflow(args.threads or worker_threads(topology) or DEFAULT_INTRA_OP_THREADS, DEFAULT_INTER_OP_THREADS)
    model = load_keras_file(
        topology.model_path,
        unsafe=args.unsafe or bool(topology.extra.get("unsafe", False)),
        imports=topology.imports,
        needed_by="the whole model (model.keras)",
    )
    fn = compiled(model, topology.inputs)  # as the workers run the shards: compiled (eager differs in the last bits)
    started = time.monotonic()
    kept_in: list[dict[str, np.ndarray]] = []  # the first oracle.MAX_ROWS rows, for the oracle
    kept_out: list[dict[str, np.ndarray]] = []
    with replay.ReplayWriter(
        args.out,
        topology.name,
        [(t.name, t.dtype) for t in topology.inputs],
        [(t.name, t.dtype) for t in topology.outputs],
        reference=replay.REFERENCE_MODEL,
        source=source,
    ) as writer:
        for i, request in zip(range(args.count), inputs):
            computed = call_compiled(model, fn, request)
            outputs = {t.name: _as_dtype(computed[t.name], t) for t in topology.outputs}
            writer.add(request, outputs)
            if sum(len(next(iter(r.values()))) for r in kept_in) < oracle.MAX_ROWS:
                kept_in.append(request)
                kept_out.append(outputs)
            if sys.stderr.isatty():
                print(f"\rpipeline record: {i + 1}/{args.count}", end="", file=sys.stderr, flush=True)
        if sys.stderr.isatty():
            print(file=sys.stderr)
        verdict = record_oracle(lambda x: call_compiled(model, fn, x), topology, writer, kept_in, kept_out, allow=args.allow_input_independent)
    print(
        f"wrote {args.out}: {writer.count} requests of model {topology.name!r} ({source}), "
        f"{writer.nbytes / 2**20:.1f} MiB, reference outputs from {topology.model_path.name} "
        f"in {time.monotonic() - started:.1f} s"
    )
    print(verdict)
    return 0


def record_oracle(
    call: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]],
    topology: topo.Topology,
    writer: replay.ReplayWriter,
    inputs: list[dict[str, np.ndarray]],
    outputs: list[dict[str, np.ndarray]],
    *,
    allow: bool,
) -> str:
    """Measure the batching tolerance into ``writer`` and check the recorded answers can tell right from wrong.

    Raises :class:`pipeline.oracle.NotDiscriminating` (the file is not written) unless ``allow``.
    """
    rows = {name: np.concatenate([r[name] for r in inputs]) for name in topology.input_names}
    sample = {name: a[: max(oracle.TOLERANCE_BATCHES)] for name, a in rows.items()}
    if min(len(a) for a in sample.values()) < max(oracle.TOLERANCE_BATCHES):  # too few recorded rows: add random ones
        from pipeline.partition.reference import random_inputs

        extra = random_inputs(topology.inputs, max(oracle.TOLERANCE_BATCHES), np.random.default_rng(1), topology.extra.get("sample_input_shapes"))
        sample = {n: np.concatenate([sample[n], extra[n]])[: max(oracle.TOLERANCE_BATCHES)] for n in sample}
    tolerance, measured = oracle.batching_tolerance(call, sample)
    writer.tolerance, writer.tolerance_measured = tolerance, measured
    found = oracle.spread(inputs, outputs)
    warning = oracle.require_discriminating(found, tolerance, what=f"the {writer.count} recorded requests", allow=allow)
    if warning:
        return f"warning: {warning}"
    return (
        f"oracle: rows move by up to {measured:.3g} when batched, so answers are checked within {tolerance:.3g} "
        f"({oracle.SAFETY_FACTOR:g}x) under dynamic batching; the outputs of different inputs differ by at least "
        f"{found.smallest:.3g}, {found.margin(tolerance):.3g}x that"
    )


def _as_dtype(array: Any, spec: topo.TensorSpec) -> np.ndarray:
    array = np.asarray(array)
    if dtype_name(array.dtype) != spec.dtype:
        raise UsageError(f"model output {spec.name!r} is {array.dtype}; the topology declares {spec.dtype}")
    return array


def _input_source(topology: topo.Topology, args: argparse.Namespace) -> tuple[Iterator[dict[str, np.ndarray]], str]:
    if args.images is not None:
        return image_inputs(topology, args.images, args.batch), f"images from {args.images}"
    if args.npy is not None:
        return array_inputs(topology, args.npy, args.batch), f"rows of {args.npy}"
    if args.replay is not None:
        return replay_inputs(topology, args.replay), f"inputs of {args.replay}"
    return random_source(topology, args.batch, args.seed), f"random, seed {args.seed}"


def random_source(topology: topo.Topology, batch: int, seed: int) -> Iterator[dict[str, np.ndarray]]:
    from pipeline.partition.reference import random_inputs

    rng = np.random.default_rng(seed)
    while True:
        yield random_inputs(topology.inputs, batch, rng, topology.extra.get("sample_input_shapes"))


def image_inputs(topology: topo.Topology, folder: Path, batch: int) -> Iterator[dict[str, np.ndarray]]:
    """Images (cycled, in name order) resized to the one image input ``[-1, H, W, C]``, C in 1, 3 or 4."""
    if len(topology.inputs) != 1 or len(topology.inputs[0].shape) != 4 or topology.inputs[0].shape[3] not in (1, 3, 4):
        shapes = {t.name: list(t.shape) for t in topology.inputs}
        raise UsageError(f"--images needs a model with one input of shape [-1, H, W, 1|3|4]; this one takes {shapes}")
    spec = topology.inputs[0]
    _, height, width, channels = spec.shape
    if height < 1 or width < 1:
        raise UsageError(f"--images needs a fixed height and width; input {spec.name!r} has shape {list(spec.shape)}")
    if not folder.is_dir():
        raise UsageError(f"--images {str(folder)!r} is not a folder")
    files = sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UsageError(f"--images {str(folder)!r} holds no image ({', '.join(IMAGE_SUFFIXES)})")
    from PIL import Image

    mode = {1: "L", 3: "RGB", 4: "RGBA"}[channels]
    dtype = np.dtype(spec.dtype) if spec.dtype != "bfloat16" else np.dtype(np.float32)
    pixels = []
    for f in files:
        try:
            with Image.open(f) as image:
                resized = image.convert(mode).resize((width, height), Image.Resampling.BILINEAR)
        except OSError as exc:
            raise UsageError(f"cannot read image {str(f)!r}: {exc}") from None
        pixels.append(np.asarray(resized).reshape(height, width, channels))
    for rows in _cycle_batches(len(pixels), batch):
        yield {spec.name: np.stack([pixels[r] for r in rows]).astype(dtype)}


def array_inputs(topology: topo.Topology, path: Path, batch: int) -> Iterator[dict[str, np.ndarray]]:
    """Rows of a ``.npy`` (one-input model) or ``.npz`` keyed by input name, cycled, ``batch`` per request."""
    if not path.is_file():
        raise UsageError(f"--npy {str(path)!r} does not exist")
    loaded = np.load(path, allow_pickle=False)
    names = list(topology.input_names)
    if isinstance(loaded, np.ndarray):
        if len(names) != 1:
            raise UsageError(f"model {topology.name!r} takes inputs {names}; expected an .npz keyed by them, received a .npy")
        arrays = {names[0]: loaded}
    else:
        with loaded:
            missing = [n for n in names if n not in loaded.files]
            if missing:
                raise UsageError(f"--npy {str(path)!r} holds {sorted(loaded.files)}; expected {names} (missing {missing})")
            arrays = {n: loaded[n] for n in names}
    rows = {len(a) if a.ndim else 0 for a in arrays.values()}
    if len(rows) != 1 or 0 in rows:
        raise UsageError(f"--npy {str(path)!r}: expected arrays with the same number of rows (batch axis first), received {sorted(rows)}")
    for spec in topology.inputs:
        array = arrays[spec.name]
        if not spec.accepts((1, *array.shape[1:])):
            raise UsageError(f"--npy: input {spec.name!r} expects shape {list(spec.shape)}, received rows of {list(array.shape[1:])}")
        if array.dtype.name != spec.dtype:
            if not np.can_cast(array.dtype, spec.dtype, casting="same_kind"):
                raise UsageError(f"--npy: input {spec.name!r} expects {spec.dtype}, received {array.dtype}")
            arrays[spec.name] = array.astype(spec.dtype)
    for rows_ in _cycle_batches(rows.pop(), batch):
        yield {n: np.ascontiguousarray(a[rows_]) for n, a in arrays.items()}


def replay_inputs(topology: topo.Topology, path: Path) -> Iterator[dict[str, np.ndarray]]:
    source = replay.load(path)
    if source.model != topology.name or set(source.input_names) != set(topology.input_names):
        raise UsageError(
            f"--replay {str(path)!r} holds model {source.model!r} inputs {list(source.input_names)}; "
            f"expected model {topology.name!r} inputs {list(topology.input_names)}"
        )
    if not len(source):
        raise UsageError(f"--replay {str(path)!r} holds no request")
    while True:
        for request in source.requests:
            yield dict(request.inputs)


def _cycle_batches(n: int, batch: int) -> Iterator[Sequence[int]]:
    start = 0
    while True:
        yield [(start + k) % n for k in range(batch)]
        start = (start + batch) % n
