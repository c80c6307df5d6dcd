"""The check every end-to-end test makes of a served pipeline's answers.

It sends requests concurrently (so that dynamic batching regroups them) and
compares every answer with the reference of its own request. Before that it
checks that the check can fail: the references of the different inputs must
differ by far more than the tolerance (pipeline/oracle.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np

from pipeline import oracle
from pipeline.pb import grpc_service_pb2_grpc as kpb_grpc
from pipeline.serving import kserve

#: the references of different inputs must differ by at least this many times the tolerance.
MIN_MARGIN = 100.0


def require_discriminating(
    inputs: Sequence[Mapping[str, np.ndarray]], references: Sequence[Mapping[str, np.ndarray]], tolerance: float
) -> oracle.Spread:
    """Fail the test when the references cannot tell a right answer from a wrong one."""
    found = oracle.spread(inputs, references)
    oracle.require_discriminating(found, tolerance * MIN_MARGIN, what="the test's reference outputs")
    return found


def mismatches(
    target: str,
    model: str,
    inputs: Sequence[Mapping[str, np.ndarray]],
    references: Sequence[Mapping[str, np.ndarray]],
    *,
    tolerance: float = 0.0,
    concurrency: int = 8,
    timeout_s: float = 60.0,
) -> list[str]:
    """Send every request (``concurrency`` at a time) and return what did not match its own reference."""
    require_discriminating(inputs, references, tolerance)
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)])
    stub = kpb_grpc.GRPCInferenceServiceStub(channel)

    def one(i: int) -> str | None:
        try:
            response = stub.ModelInfer(kserve.infer_request(model, inputs[i]), timeout=timeout_s)
        except grpc.RpcError as exc:
            return f"request {i}: {exc.code().name} {exc.details()}"
        index = {t.name: k for k, t in enumerate(response.outputs)}
        for name, want in references[i].items():
            if name not in index:
                return f"request {i}: output {name!r} missing, received {sorted(index)}"
            got = kserve.output_array(response, index[name])
            if got.shape != want.shape or got.dtype != want.dtype:
                return f"request {i}: output {name!r} is {got.dtype}{list(got.shape)}, expected {want.dtype}{list(want.shape)}"
            if tolerance == 0:
                if got.tobytes() != np.ascontiguousarray(want).tobytes():
                    return f"request {i}: output {name!r} not bitwise equal (max diff {float(np.abs(got.astype(np.float64) - want).max()):.3g})"
            else:
                diff = float(np.abs(got.astype(np.float64) - want.astype(np.float64)).max()) if want.size else 0.0
                if not diff <= tolerance:
                    return f"request {i}: output {name!r} differs by {diff:.3g} > tolerance {tolerance:.3g}"
        return None

    try:
        with ThreadPoolExecutor(concurrency) as pool:
            return [m for m in pool.map(one, range(len(inputs))) if m is not None]
    finally:
        channel.close()
