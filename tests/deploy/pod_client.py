"""A KServe v2 client run inside the client's network namespace: requests through the ingress's Service name.

``python pod_client.py TARGET MODEL INPUTS.npz OUT.npz [--count N | --until FILE]``: one request at a time
(concurrency 1, batch 1), request ``i`` sending input row ``i % rows``; writes per request the row sent,
the status code name and the output (NaN where the request failed).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import grpc
import numpy as np

from pipeline.pb import grpc_service_pb2 as kpb
from pipeline.pb import grpc_service_pb2_grpc as kgrpc
from pipeline.serving import kserve
from pipeline.wire import codec

REQUEST_TIMEOUT_S = 10.0
#: how soon the client may resolve the ingress's Service name again (gRPC's default: 30 s).
DNS_MIN_INTERVAL_MS = 500
#: a hard stop, so a client the test forgot can never run on.
MAX_RUN_S = 900.0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("target")
    p.add_argument("model")
    p.add_argument("inputs", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--until", type=Path)
    args = p.parse_args()
    data = np.load(args.inputs)
    name = data.files[0]
    rows = data[name]
    sent, codes, outputs, took = [], [], [], []
    started = time.monotonic()
    # Behind a ClusterIP the Service's address never changes; here a Service is its pod's address in a hosts
    # file, which changes when a pod is replaced, and gRPC re-resolves a name at most every 30 s by default.
    options = [("grpc.dns_min_time_between_resolutions_ms", DNS_MIN_INTERVAL_MS)]
    with grpc.insecure_channel(args.target, options=options) as channel:
        stub = kgrpc.GRPCInferenceServiceStub(channel)
        i = 0
        while time.monotonic() - started < MAX_RUN_S:
            if args.count and i >= args.count:
                break
            if args.until is not None and args.until.exists():
                break
            x = np.ascontiguousarray(rows[i % len(rows)][None])
            request = kpb.ModelInferRequest(model_name=args.model)
            request.inputs.add(name=name, datatype=kserve.kserve_datatype(codec.dtype_name(x.dtype)), shape=list(x.shape))
            request.raw_input_contents.append(x.tobytes())
            sent.append(i % len(rows))
            t0 = time.monotonic()
            try:
                response = stub.ModelInfer(request, timeout=REQUEST_TIMEOUT_S)
                codes.append("OK")
                outputs.append(kserve.output_array(response, 0)[0])
                took.append(time.monotonic() - t0)
            except grpc.RpcError as exc:
                codes.append(exc.code().name)
                outputs.append(None)
                took.append(time.monotonic() - t0)
                time.sleep(0.05)
            i += 1
            if i % 20 == 0:
                print(f"sent {i}, ok {codes.count('OK')}", flush=True)
    shape = next((o.shape for o in outputs if o is not None), (0,))
    stacked = np.stack([o if o is not None else np.full(shape, np.nan, np.float32) for o in outputs]) if outputs else np.zeros((0,))
    np.savez(args.out, sent=np.array(sent), codes=np.array(codes), outputs=stacked, took=np.array(took))
    print(f"done: {len(codes)} requests, {codes.count('OK')} OK", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
