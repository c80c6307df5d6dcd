"""A load client for the multi-host tests: replay requests, check every answer, log each request's fate.

Run it on a namespace host (``ip netns exec H python tests/multihost/load.py ...``):
``--concurrency C`` clients in a closed loop over the replay's requests for
``--duration`` seconds, each request with ``--timeout`` seconds of deadline.
Each request is written as one JSON line: wall-clock start and end (the
machine's one clock: every namespace shares it), the replay index, the gRPC
code (``OK``) and, for answers, the largest absolute difference from the
reference (``wrong`` when above ``--tolerance`` or an output is missing).
A request still unanswered ``--grace`` seconds after its deadline is
``LOST``. ``--wait-ready`` first waits for ``ServerReady``. SIGTERM stops it
sending; the requests in flight end (each by its deadline) and are written
before it exits. Lines are appended as requests end, so a test can read them
while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from pipeline.pb import grpc_service_pb2 as kpb
from pipeline.pb import grpc_service_pb2_grpc as kpb_grpc
from pipeline.serving import kserve
from pipeline.soak import replay as replay_mod


def difference(expected: dict[str, np.ndarray], response: kpb.ModelInferResponse) -> float:
    """Largest absolute difference over every output (inf when one is missing or has another shape)."""
    got = {t.name: kserve.output_array(response, i) for i, t in enumerate(response.outputs)}
    worst = 0.0
    for name, ref in expected.items():
        value = got.get(name)
        if value is None or value.shape != ref.shape:
            return float("inf")
        if value.tobytes() == ref.tobytes():
            continue
        worst = max(worst, float(np.max(np.abs(value.astype(np.float64) - ref.astype(np.float64)))))
    return worst


async def wait_ready(stub: kpb_grpc.GRPCInferenceServiceStub, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if (await stub.ServerReady(kpb.ServerReadyRequest(), timeout=1.0)).ready:
                return
        except grpc.RpcError:
            pass
        await asyncio.sleep(0.2)
    raise SystemExit(f"load: the pipeline was not ready within {timeout_s} s")


async def run(args: argparse.Namespace) -> list[dict[str, object]]:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    sink = open(args.out, "w")
    replay = replay_mod.load(args.replay)
    requests = [kserve.infer_request(replay.model, r.inputs) for r in replay.requests]
    records: list[dict[str, object]] = []
    order = iter(range(1 << 62))
    async with grpc.aio.insecure_channel(args.target) as channel:
        stub = kpb_grpc.GRPCInferenceServiceStub(channel)
        if args.wait_ready:
            await wait_ready(stub, args.wait_ready)
        end = time.monotonic() + args.duration

        async def one(index: int) -> None:
            i = index % len(requests)
            start = time.time()
            call = stub.ModelInfer(requests[i], timeout=args.timeout)
            record: dict[str, object] = {"i": i, "start": start}
            try:
                response = await asyncio.wait_for(call, args.timeout + args.grace)
                diff = difference(replay.requests[i].outputs, response)
                record.update(code="OK", diff=diff if np.isfinite(diff) else "inf", wrong=not diff <= args.tolerance)
            except asyncio.TimeoutError:
                call.cancel()
                record.update(code="LOST")
            except grpc.RpcError as exc:
                record.update(code=exc.code().name, detail=(exc.details() or "")[:200])
            record["end"] = time.time()
            records.append(record)
            sink.write(json.dumps(record) + "\n")
            sink.flush()

        async def client() -> None:
            while time.monotonic() < end and not stop.is_set():
                await one(next(order))
                if args.count and len(records) >= args.count:
                    return

        await asyncio.gather(*(client() for _ in range(args.concurrency)))
    sink.close()
    return records


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", required=True)
    p.add_argument("--replay", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True, help="JSON lines, one per request")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--count", type=int, default=0, help="stop after this many requests (0: run for --duration)")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--timeout", type=float, default=5.0)
    p.add_argument("--grace", type=float, default=5.0)
    p.add_argument("--tolerance", type=float, default=0.0)
    p.add_argument("--wait-ready", type=float, default=0.0)
    args = p.parse_args()
    records = asyncio.run(run(args))
    codes: dict[str, int] = {}
    for r in records:
        key = "WRONG" if r.get("wrong") else str(r["code"])
        codes[key] = codes.get(key, 0) + 1
    print(json.dumps(codes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
