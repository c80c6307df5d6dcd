"""Test doubles for the ingress: hand-written topologies, fake shard workers, an ingress in a thread.

The fake workers speak the envelope protocol of docs/ARCHITECTURE.md with real
ZeroMQ sockets on ipc paths in a short temporary folder: they send HEARTBEATs
to the ingress's results endpoint and answer REQUESTs with RESULT (or ERROR)
messages, so the ingress is tested without the real shard worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import zmq

from pipeline import topology as topo
from pipeline.pb import envelope_pb2 as pb
from pipeline.pb import grpc_service_pb2 as kpb
from pipeline.pb import grpc_service_pb2_grpc as kpb_grpc
from pipeline.serving import kserve
from pipeline.serving.ingress import Ingress, IngressConfig, create_server
from pipeline.topology import Batching, IngressSpec, ShardOutput, ShardSpec, TensorSpec, Topology
from pipeline.wire import codec

HEARTBEAT_S = 0.2
WAIT_S = 10.0  # every wait in these tests has this deadline at most

Compute = Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]]


# ---------------------------------------------------------------- topologies
def _shard(name: str, inputs: tuple[str, ...], outputs: dict[str, tuple[str, ...]], sock_dir: str) -> ShardSpec:
    endpoint = f"ipc://{sock_dir}/{name}.ipc"
    return ShardSpec(
        name=name,
        file=f"{name}.keras",
        inputs=inputs,
        outputs=tuple(ShardOutput(n, c) for n, c in outputs.items()),
        endpoint=endpoint,
        host="127.0.0.1",
        bind=endpoint,
        batching=Batching(max_batch=8, max_delay_ms=2.0),
    )


def _write(t: Topology, directory: Path) -> Topology:
    directory.mkdir(parents=True, exist_ok=True)
    for shard in t.shards:
        (directory / shard.file).write_bytes(b"")  # dummy shard files: the ingress never reads them
    t.replace(directory=directory).write(directory)
    return topo.load(directory)


def single_topology(directory: Path, sock_dir: str) -> Topology:
    """Model ``toy``: inputs x float32[-1,4] and ids int64[-1,2]; output y float32[-1,3]; one shard ``s0``."""
    x = TensorSpec("x", "float32", (-1, 4))
    ids = TensorSpec("ids", "int64", (-1, 2))
    y = TensorSpec("y", "float32", (-1, 3))
    results = f"ipc://{sock_dir}/ingress.ipc"
    t = Topology(
        name="toy",
        inputs=(x, ids),
        outputs=(y,),
        tensors={s.name: s for s in (x, ids, y)},
        shards=(_shard("s0", ("x", "ids"), {"y": (topo.INGRESS,)}, sock_dir),),
        ingress=IngressSpec(grpc="127.0.0.1:0", results=results, host="127.0.0.1", bind=results),
        directory=directory,
        heartbeat_interval_s=HEARTBEAT_S,
    )
    return _write(t, directory)


def toy_compute(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    x, ids = inputs["x"], inputs["ids"]
    return {"y": (x[:, :3] * 2 + ids.sum(axis=1, keepdims=True)).astype(np.float32)}


def two_output_topology(directory: Path, sock_dir: str) -> Topology:
    """Model ``duo``: x float32[-1,4]; shard ``a`` makes out_a (to the ingress) and h (to ``b``); ``b`` makes out_b."""
    x = TensorSpec("x", "float32", (-1, 4))
    h = TensorSpec("h", "float32", (-1, 4))
    out_a = TensorSpec("out_a", "float32", (-1, 2))
    out_b = TensorSpec("out_b", "int32", (-1,))
    results = f"ipc://{sock_dir}/ingress.ipc"
    t = Topology(
        name="duo",
        inputs=(x,),
        outputs=(out_a, out_b),
        tensors={s.name: s for s in (x, h, out_a, out_b)},
        shards=(
            _shard("a", ("x",), {"out_a": (topo.INGRESS,), "h": ("b",)}, sock_dir),
            _shard("b", ("h",), {"out_b": (topo.INGRESS,)}, sock_dir),
        ),
        ingress=IngressSpec(grpc="127.0.0.1:0", results=results, host="127.0.0.1", bind=results),
        directory=directory,
        heartbeat_interval_s=HEARTBEAT_S,
    )
    return _write(t, directory)


def duo_compute_a(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    x = inputs["x"]
    return {"out_a": x[:, :2] + 1, "h": x * 10}


def duo_compute_b(inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"out_b": inputs["h"].sum(axis=1).astype(np.int32)}


@contextmanager
def sock_dir() -> Iterator[str]:
    """A short folder for ipc sockets (ipc paths are limited to about 100 characters)."""
    path = tempfile.mkdtemp(prefix="plt-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -------------------------------------------------------------- fake worker
class FakeWorker(threading.Thread):
    """A shard worker double: binds its endpoint, heartbeats, and answers each REQUEST.

    ``mode``: ``ok`` (compute and send), ``silent`` (swallow requests),
    ``error`` (send an ERROR with ``error_code``), ``twice`` (send every result
    twice), ``bad_shape`` (send outputs with a wrong shape). ``heartbeat``,
    ``ready`` and ``pid`` may be changed while it runs.
    """

    def __init__(
        self,
        t: Topology,
        shard: str,
        compute: Compute,
        *,
        mode: str = "ok",
        ready: bool = True,
        delay_s: float = 0.0,
        error_code: grpc.StatusCode = grpc.StatusCode.INTERNAL,
    ) -> None:
        super().__init__(name=f"fake-{shard}", daemon=True)
        self.topology = t
        self.shard = shard
        self.compute = compute
        self.mode = mode
        self.ready = ready
        self.heartbeat = True
        self.pid = 4242
        self.delay_s = delay_s
        self.error_code = error_code
        self.requests = 0  # REQUEST messages received
        self.request_ids: list[int] = []
        self._stop_event = threading.Event()
        self._bound = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:  # type: ignore[override]
        super().start()
        if not self._bound.wait(WAIT_S):
            raise RuntimeError(f"fake worker {self.shard} did not bind within {WAIT_S} s")
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        self._stop_event.set()
        self.join(WAIT_S)

    def run(self) -> None:
        ctx = zmq.Context.instance()
        spec = self.topology.shard(self.shard)
        socks: list[zmq.Socket] = []
        try:
            pull = ctx.socket(zmq.PULL)
            socks.append(pull)
            pull.setsockopt(zmq.LINGER, 0)
            pull.bind(spec.bind)
            pushes: dict[str, zmq.Socket] = {}
            for consumer in {c for o in spec.outputs for c in o.consumers} | {topo.INGRESS}:
                sock = ctx.socket(zmq.PUSH)
                socks.append(sock)
                sock.setsockopt(zmq.LINGER, 0)
                sock.connect(self.topology.endpoint_of(consumer))
                pushes[consumer] = sock
        except BaseException as exc:  # report bind failures to start()
            self._error = exc
            self._bound.set()
            for s in socks:
                s.close(linger=0)
            return
        self._bound.set()
        routes = self.topology.routes(self.shard)
        poller = zmq.Poller()
        poller.register(pull, zmq.POLLIN)
        next_beat = 0.0
        delayed: list[tuple[float, codec.Message]] = []  # delayed answers, so heartbeats keep flowing
        try:
            while not self._stop_event.is_set():
                while delayed and delayed[0][0] <= time.monotonic():
                    self._answer(delayed.pop(0)[1], routes, pushes)
                now = time.monotonic()
                if self.heartbeat and now >= next_beat:
                    env = pb.Envelope(kind=pb.HEARTBEAT, sender=self.shard)
                    env.heartbeat.process = self.shard
                    env.heartbeat.ready = self.ready
                    env.heartbeat.pid = self.pid
                    codec.send(pushes[topo.INGRESS], env)
                    next_beat = now + HEARTBEAT_S
                if not poller.poll(10):
                    continue
                message = codec.recv(pull)
                if message is None or message.envelope.kind != pb.REQUEST:
                    continue
                self.requests += 1
                self.request_ids.append(message.envelope.request_id)
                if self.delay_s:
                    delayed.append((time.monotonic() + self.delay_s, message))
                else:
                    self._answer(message, routes, pushes)
        finally:
            for s in socks:
                s.close(linger=0)

    def _answer(self, message: codec.Message, routes: dict[str, tuple[str, ...]], pushes: dict[str, zmq.Socket]) -> None:
        req = message.envelope
        received_ns = time.time_ns()
        if self.mode == "silent":
            return
        if self.mode == "error":
            env = codec.error_envelope(
                req.request_id, req.model, self.shard, self.error_code.value[0], f"{self.shard} cannot compute this"
            )
            codec.send(pushes[topo.INGRESS], env)
            return
        start = time.time_ns()
        outputs = self.compute(message.tensors)
        end = time.time_ns()
        if self.mode == "bad_shape":
            outputs = {k: np.zeros((7, 7), v.dtype) for k, v in outputs.items()}
        spans = list(req.spans) + [
            pb.Span(name=f"{self.shard}.queue", start_ns=received_ns, end_ns=start),
            pb.Span(name=f"{self.shard}.compute", start_ns=start, end_ns=end),
        ]
        for consumer, names in routes.items():
            kind = pb.RESULT if consumer == topo.INGRESS else pb.REQUEST
            env = pb.Envelope(
                kind=kind,
                request_id=req.request_id,
                model=req.model,
                budget_ns=req.budget_ns,  # passed on as received (this fake's compute takes no time to speak of)
                sender=self.shard,
                sent_ns=time.time_ns(),
            )
            env.spans.extend(spans)
            tensors = {n: outputs[n] for n in names}
            for _ in range(2 if self.mode == "twice" and consumer == topo.INGRESS else 1):
                codec.send(pushes[consumer], env, tensors)


@contextmanager
def fake_workers(*workers: FakeWorker) -> Iterator[tuple[FakeWorker, ...]]:
    started: list[FakeWorker] = []
    try:
        for w in workers:
            w.start()
            started.append(w)
        yield workers
    finally:
        for w in started:
            w.stop()


# ---------------------------------------------------------- ingress thread
class IngressThread:
    """The real ingress, in its own asyncio loop in a background thread."""

    def __init__(self, t: Topology, **overrides: Any) -> None:
        self.topology = t
        self.config = dataclasses.replace(IngressConfig.resolve(t, env={}), address="127.0.0.1:0", **overrides)
        self.loop = asyncio.new_event_loop()
        self.ingress: Ingress | None = None
        self.port = 0
        self._thread = threading.Thread(target=self.loop.run_forever, name="ingress-loop", daemon=True)

    def __enter__(self) -> IngressThread:
        self._thread.start()
        self.ingress, self.port = self.call(create_server(self.topology, self.config))
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if self.ingress is not None:
                self.call(self.ingress.stop(0.5))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(WAIT_S)
            self.loop.close()

    def call(self, coro: Any, timeout: float = WAIT_S) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def in_loop(self, fn: Callable[[], Any]) -> Any:
        async def _run() -> Any:
            return fn()

        return self.call(_run())

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @contextmanager
    def stub(self) -> Iterator[kpb_grpc.GRPCInferenceServiceStub]:
        channel = grpc.insecure_channel(self.target)
        try:
            yield kpb_grpc.GRPCInferenceServiceStub(channel)
        finally:
            channel.close()

    def pending(self) -> int:
        assert self.ingress is not None
        return self.in_loop(lambda: len(self.ingress.table))


# ----------------------------------------------------------------- requests
def raw_request(model: str, arrays: Mapping[str, np.ndarray], **parameters: Any) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=model)
    for name, array in arrays.items():
        array = np.ascontiguousarray(array)
        request.inputs.add(name=name, datatype=kserve.kserve_datatype(_dtype_name(array)), shape=list(array.shape))
        request.raw_input_contents.append(array.tobytes())
    _params(request, parameters)
    return request


def typed_request(model: str, arrays: Mapping[str, np.ndarray], **parameters: Any) -> kpb.ModelInferRequest:
    request = kpb.ModelInferRequest(model_name=model)
    for name, array in arrays.items():
        tensor = request.inputs.add(
            name=name, datatype=kserve.kserve_datatype(_dtype_name(array)), shape=list(array.shape)
        )
        tensor.contents.CopyFrom(kserve.array_to_contents(array))
    _params(request, parameters)
    return request


def _params(request: kpb.ModelInferRequest, parameters: Mapping[str, Any]) -> None:
    for key, value in parameters.items():
        if isinstance(value, bool):
            request.parameters[key].bool_param = value
        elif isinstance(value, int):
            request.parameters[key].int64_param = value
        else:
            request.parameters[key].string_param = str(value)


def outputs_of(response: kpb.ModelInferResponse) -> dict[str, np.ndarray]:
    return {t.name: kserve.output_array(response, i) for i, t in enumerate(response.outputs)}


def _dtype_name(array: np.ndarray) -> str:
    return codec.dtype_name(array.dtype)


def toy_inputs(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "x": rng.standard_normal((batch, 4)).astype(np.float32),
        "ids": rng.integers(-5, 5, (batch, 2)).astype(np.int64),
    }


def wait_until(predicate: Callable[[], bool], timeout: float = WAIT_S, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def wait_ready(stub: kpb_grpc.GRPCInferenceServiceStub, timeout: float = WAIT_S) -> None:
    if not wait_until(lambda: stub.ServerReady(kpb.ServerReadyRequest(), timeout=1).ready, timeout):
        raise AssertionError(f"the ingress was not ready within {timeout} s")


def env_without_pipeline_vars() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
