"""``pipeline infer``: send one KServe v2 ``ModelInfer`` to an ingress and print a summary.

Reads the model's metadata first (``ModelMetadata``; without ``--model`` the
ingress answers for the model it serves) to know the inputs, fills them from
``--input`` (a ``.npy`` for a one-input model, a ``.npz`` keyed by input
name otherwise) or with random data (``--random``, ``--batch N``), sends them
as ``raw_input_contents`` with our own generated stubs, and prints each
output's name, shape and datatype, the top-5 classes of a classifier-like
output (``[batch, C]``), and the latency. A gRPC error prints its status code
and message and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TextIO

import grpc
import numpy as np

from pipeline.errors import UsageError
from pipeline.security import tls
from pipeline.pb import grpc_service_pb2 as kpb
from pipeline.pb import grpc_service_pb2_grpc as kpb_grpc
from pipeline.serving import kserve
from pipeline.topology import DEFAULT_GRPC_ADDRESS

TOP_K = 5
MAX_ROWS = 4  # rows of a batch whose top classes are printed
DEFAULT_MESSAGE_BYTES = 64 << 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default=os.environ.get("PIPELINE_INFER_TARGET", DEFAULT_GRPC_ADDRESS),
        help=f"ingress host:port (default: $PIPELINE_INFER_TARGET or {DEFAULT_GRPC_ADDRESS})",
    )
    parser.add_argument("--model", default="", help="model name (default: the model the ingress serves)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--input", type=Path, help=".npy (one-input model) or .npz keyed by input name")
    source.add_argument("--random", action="store_true", help="random inputs (the default when --input is absent)")
    parser.add_argument("--batch", type=int, default=1, help="batch size of random inputs (default 1)")
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline in seconds (default 30)")
    parser.add_argument(
        "--timing",
        action="store_true",
        help="ask for the pipeline's timing spans and print them (across hosts, only as good as their clocks)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of random inputs (default 0)")
    env = os.environ.get
    parser.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's roots unless --tls-ca")
    parser.add_argument(
        "--tls-ca", metavar="PEM", default=env("PIPELINE_INFER_TLS_CA"), help="trust this CA (implies --tls; env PIPELINE_INFER_TLS_CA)"
    )
    parser.add_argument(
        "--tls-cert",
        metavar="PEM",
        default=env("PIPELINE_INFER_TLS_CERT"),
        help="client certificate for mutual TLS (implies --tls; env PIPELINE_INFER_TLS_CERT)",
    )
    parser.add_argument(
        "--tls-key", metavar="PEM", default=env("PIPELINE_INFER_TLS_KEY"), help="private key of --tls-cert (env PIPELINE_INFER_TLS_KEY)"
    )
    parser.add_argument(
        "--tls-server-name", metavar="NAME", help="name to check the server certificate against (default: the target's host)"
    )


def run(args: argparse.Namespace) -> int:
    if args.batch < 1:
        raise UsageError(f"--batch must be >= 1, received {args.batch}")
    options = [
        ("grpc.max_send_message_length", DEFAULT_MESSAGE_BYTES),
        ("grpc.max_receive_message_length", DEFAULT_MESSAGE_BYTES),
    ]
    channel = tls.open_channel(
        args.target,
        options,
        tls=getattr(args, "tls", False),
        ca=getattr(args, "tls_ca", None),
        cert=getattr(args, "tls_cert", None),
        key=getattr(args, "tls_key", None),
        server_name=getattr(args, "tls_server_name", None),
    )
    with channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        try:
            return infer(stub, args, sys.stdout)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            details = exc.details() if hasattr(exc, "details") else str(exc)
            print(f"pipeline infer: {code.name}: {details}", file=sys.stderr)
            return 1


def infer(stub: kpb_grpc.GRPCInferenceServiceStub, args: argparse.Namespace, out: TextIO) -> int:
    meta = stub.ModelMetadata(kpb.ModelMetadataRequest(name=args.model), timeout=args.timeout)
    if args.input is not None:
        arrays = load_inputs(args.input, meta)
    else:
        arrays = random_inputs(meta, args.batch, args.seed)
    request = kserve.infer_request(
        meta.name,
        {spec.name: arrays[spec.name] for spec in meta.inputs},
        datatypes={spec.name: spec.datatype for spec in meta.inputs},
        timing=args.timing,
    )
    started = time.perf_counter()
    response = stub.ModelInfer(request, timeout=args.timeout)
    latency_ms = (time.perf_counter() - started) * 1e3
    print(f"model {response.model_name} (version {response.model_version or '-'})", file=out)
    for i, tensor in enumerate(response.outputs):
        array = kserve.output_array(response, i)
        print(f"output {tensor.name}: shape {list(array.shape)} datatype {tensor.datatype}", file=out)
        if array.ndim == 2 and array.shape[1] > 1 and array.dtype.kind == "f":
            for row in range(min(array.shape[0], MAX_ROWS)):
                scores = array[row].astype(np.float64)
                top = np.argsort(-scores, kind="stable")[:TOP_K]
                classes = ", ".join(f"{int(c)}: {scores[c]:.4f}" for c in top)
                print(f"  [{row}] top-{len(top)}: {classes}", file=out)
    print(f"latency {latency_ms:.2f} ms", file=out)
    if args.timing and "timing" in response.parameters:
        timing = json.loads(response.parameters["timing"].string_param)
        for span in timing["spans"]:
            print(f"  span {span['name']}: {span['duration_ns'] / 1e6:.3f} ms", file=out)
        print(f"  total in the ingress: {timing['total_ns'] / 1e6:.3f} ms", file=out)
        print(
            "  (spans use each process's wall clock: a hop between two hosts includes the skew of their clocks)",
            file=out,
        )
    return 0


def load_inputs(path: Path, meta: kpb.ModelMetadataResponse) -> dict[str, np.ndarray]:
    """Inputs from a .npy (a one-input model) or a .npz keyed by input name, cast-checked against the metadata."""
    names = [t.name for t in meta.inputs]
    if not path.is_file():
        raise UsageError(f"--input {str(path)!r} does not exist")
    loaded = np.load(path, allow_pickle=False)
    if isinstance(loaded, np.ndarray):
        if len(names) != 1:
            raise UsageError(f"model {meta.name!r} takes inputs {names}; expected a .npz keyed by those names, received a .npy")
        arrays: Mapping[str, np.ndarray] = {names[0]: loaded}
    else:
        with loaded:
            arrays = {k: loaded[k] for k in loaded.files}
        missing = [n for n in names if n not in arrays]
        if missing:
            raise UsageError(f"--input {str(path)!r} holds {sorted(arrays)}; expected {names} (missing {missing})")
    result = {}
    for spec in meta.inputs:
        dtype = kserve.numpy_dtype(spec.datatype)
        array = np.asarray(arrays[spec.name])
        if array.dtype != dtype:
            if not np.can_cast(array.dtype, dtype, casting="same_kind"):
                raise UsageError(f"input {spec.name!r}: expected {dtype}, received {array.dtype} in {str(path)!r}")
            array = array.astype(dtype)
        result[spec.name] = array
    return result


def random_inputs(meta: kpb.ModelMetadataResponse, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs of ``batch`` rows; a variable non-batch axis needs --input."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for spec in meta.inputs:
        shape = [batch if i == 0 and d == -1 else d for i, d in enumerate(spec.shape)]
        if any(d < 0 for d in shape):
            raise UsageError(
                f"input {spec.name!r} has shape {list(spec.shape)} with a variable non-batch axis; use --input"
            )
        dtype = kserve.numpy_dtype(spec.datatype)
        if dtype.kind == "b":
            array = rng.integers(0, 2, shape).astype(dtype)
        elif dtype.kind in "iu":
            array = rng.integers(0, 10, shape).astype(dtype)
        else:
            array = rng.random(shape, dtype=np.float32).astype(dtype)
        arrays[spec.name] = array
    return arrays
