"""A closed-loop load for a fixed time, meant to run on another (namespace) host: ``python -m pipeline.bench.netload``.

The multi-host benchmark starts it with ``ip netns exec INGRESS_HOST`` (the
bench's own process cannot reach the namespaces). It optionally waits for
``ServerReady``, warms the path, then keeps ``--concurrency`` requests in
flight for ``--seconds`` and prints one JSON line: samples per second, p50/p95
latency in ms, requests answered and errors by gRPC code.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import topology as topo
from pipeline.bench.load import MAX_MESSAGE_BYTES
from pipeline.serving import kserve


async def measure(
    target: str,
    directory: Path,
    concurrency: int,
    seconds: float,
    warmup_s: float,
    wait_ready_s: float,
    timeout_s: float,
    latency_s: float = 0.0,
) -> dict[str, Any]:
    """Requests of one random sample each (8 different inputs), ``concurrency`` in flight for ``seconds``;
    then, with ``latency_s``, one request at a time for that long (the latency of an idle pipeline)."""
    import grpc

    from pipeline.bench.local import sample_inputs
    from pipeline.pb import grpc_service_pb2 as kpb
    from pipeline.pb import grpc_service_pb2_grpc as kgrpc

    t = topo.load(directory)
    requests = [kserve.infer_request(t.name, sample_inputs(t, 1, seed=i)) for i in range(8)]
    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = kgrpc.GRPCInferenceServiceStub(channel)
        deadline = time.monotonic() + wait_ready_s
        while True:
            try:
                if (await stub.ServerReady(kpb.ServerReadyRequest(), timeout=2.0)).ready:
                    break
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                return {"error": f"the pipeline at {target} was not ready within {wait_ready_s:.0f} s"}
            await asyncio.sleep(0.3)

        async def phase(length_s: float, concurrency: int = concurrency) -> tuple[list[float], Counter[str], float]:
            latencies: list[float] = []
            errors: Counter[str] = Counter()
            end = time.monotonic() + length_s
            order = iter(range(1 << 62))

            async def client() -> None:
                while time.monotonic() < end:
                    req = requests[next(order) % len(requests)]
                    t0 = time.perf_counter()
                    try:
                        await stub.ModelInfer(req, timeout=timeout_s)
                    except grpc.aio.AioRpcError as exc:
                        errors[exc.code().name] += 1
                        continue
                    latencies.append(time.perf_counter() - t0)

            start = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(concurrency)))
            return latencies, errors, time.perf_counter() - start

        await phase(warmup_s)
        latencies, errors, wall = await phase(seconds)
        alone: list[float] = []
        if latency_s > 0:
            alone, alone_errors, _ = await phase(latency_s, 1)
            errors.update(alone_errors)
    ms = np.asarray(latencies) * 1e3 if latencies else np.asarray([float("nan")])
    extra = {"p50_alone_ms": float(np.percentile(np.asarray(alone) * 1e3, 50))} if alone else {}
    return {
        **extra,
        "rate": len(latencies) / wall if wall else 0.0,
        "p50_ms": float(np.percentile(ms, 50)),
        "p95_ms": float(np.percentile(ms, 95)),
        "requests": len(latencies),
        "errors": dict(errors),
        "seconds": wall,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("directory", type=Path, help="the topology directory (for the model's inputs)")
    p.add_argument("--target", required=True, help="the ingress's gRPC address")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    p.add_argument("--wait-ready", type=float, default=300.0, help="seconds to wait for ServerReady")
    p.add_argument("--timeout", type=float, default=30.0, help="deadline of each request, seconds")
    p.add_argument("--latency-seconds", type=float, default=0.0, help="then one request at a time for this long (p50_alone_ms)")
    args = p.parse_args(argv)
    out = asyncio.run(measure(args.target, args.directory, args.concurrency, args.seconds, args.warmup, args.wait_ready, args.timeout, args.latency_seconds))
    sys.stdout.write(json.dumps(out) + "\n")
    return 0 if "error" not in out else 1


if __name__ == "__main__":
    sys.exit(main())
