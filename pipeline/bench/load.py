"""A closed-loop gRPC load generator over the KServe v2 API (``grpc.aio``, our generated stubs)."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from pipeline.pb import grpc_service_pb2 as kpb

#: gRPC message bound for the load generator's channel (the ingress accepts 64 MiB by default).
MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def p50_ms(latencies_s: Sequence[float]) -> float:
    """The median of these latencies, in milliseconds (NaN for none)."""
    return float(np.percentile(np.asarray(latencies_s) * 1e3, 50)) if len(latencies_s) else float("nan")


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    wall_s: float = 0.0
    samples: int = 0

    @property
    def rate(self) -> float:
        """Samples per second over the run."""
        return self.samples / self.wall_s if self.wall_s else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q)) if self.latencies_s else float("nan")


async def run_load(
    target: str,
    requests: Sequence[kpb.ModelInferRequest],
    *,
    total: int,
    concurrency: int,
    timeout_s: float = 30.0,
    samples_per_request: int = 1,
    warmup: int = 0,
) -> LoadResult:
    """Send ``total`` requests (cycling through ``requests``) with ``concurrency`` in flight.

    ``warmup`` requests go first, one at a time on the same channel, and are not timed (their errors are
    counted): the connection is up and warm before the first timed request.
    """
    import grpc

    from pipeline.pb import grpc_service_pb2_grpc as kgrpc

    options = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES), ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    result = LoadResult()
    counter = iter(range(total))
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        stub = kgrpc.GRPCInferenceServiceStub(channel)
        for i in range(warmup):
            try:
                await stub.ModelInfer(requests[i % len(requests)], timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                result.errors[exc.code().name] += 1

        async def client() -> None:
            for i in counter:
                req = requests[i % len(requests)]
                t0 = time.perf_counter()
                try:
                    await stub.ModelInfer(req, timeout=timeout_s)
                except grpc.aio.AioRpcError as exc:
                    result.errors[exc.code().name] += 1
                    continue
                result.latencies_s.append(time.perf_counter() - t0)
                result.samples += samples_per_request

        start = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        result.wall_s = time.perf_counter() - start
    return result


def timing_of(response: kpb.ModelInferResponse) -> dict[str, float]:
    """Milliseconds per span name from a response that asked for ``timing``."""
    raw = response.parameters.get("timing")
    if raw is None:
        return {}
    spans = json.loads(raw.string_param).get("spans", [])
    out: dict[str, float] = {}
    for s in spans:
        out[s["name"]] = out.get(s["name"], 0.0) + s["duration_ns"] / 1e6
    return out
