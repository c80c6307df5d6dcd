"""Every named limit, reached on purpose: the error a client gets, and that nothing queues without end.

Limits tested elsewhere (see docs/SECURITY.md): ``max_inflight`` in
``test_ingress.py::test_max_inflight``, ``max_pending`` in
``test_worker.py::test_a_full_join_buffer_refuses_new_requests``, the codec's
frame limits with the request named in ``tests/unit/test_codec_fuzz.py`` and
``tests/unit/test_join_fuzz.py``, safe loading in the runtime in
``test_worker.py::test_runtime_refuses_unsafe_models_unless_asked_and_never_retraces``.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers_ingress import (  # noqa: E402
    HEARTBEAT_S,
    WAIT_S,
    IngressThread,
    raw_request,
    single_topology,
    sock_dir,
    toy_inputs,
    wait_ready,
    wait_until,
)

from pipeline import topology as topo  # noqa: E402
from pipeline.pb import envelope_pb2 as pb  # noqa: E402
from pipeline.topology import Topology  # noqa: E402
from pipeline.wire import codec  # noqa: E402

pytestmark = pytest.mark.timeout(90)

Answer = Callable[[codec.Message], list[Any] | None]


class ScriptedShard(threading.Thread):
    """A shard double that heartbeats and answers each REQUEST with whatever frames ``answer`` returns.

    With ``read=False`` it never reads its PULL socket: a shard too slow to keep up.
    """

    def __init__(self, t: Topology, shard: str, answer: Answer | None = None, *, read: bool = True, recv_hwm: int = 1000) -> None:
        super().__init__(name=f"scripted-{shard}", daemon=True)
        self.topology, self.shard, self.answer, self.read, self.recv_hwm = t, shard, answer, read, recv_hwm
        self.received = 0
        self._halt = threading.Event()
        self._bound = threading.Event()

    def __enter__(self) -> ScriptedShard:
        self.start()
        assert self._bound.wait(WAIT_S)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._halt.set()
        self.join(WAIT_S)

    def run(self) -> None:
        ctx = zmq.Context.instance()
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        pull.setsockopt(zmq.RCVHWM, self.recv_hwm)
        pull.setsockopt(zmq.RCVBUF, 64 << 10)  # small kernel buffers, so the high-water marks show soon
        pull.bind(self.topology.shard(self.shard).bind)
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.connect(self.topology.ingress.results)
        self._bound.set()
        next_beat = 0.0
        try:
            while not self._halt.is_set():
                if time.monotonic() >= next_beat:
                    env = pb.Envelope(kind=pb.HEARTBEAT, sender=self.shard)
                    env.heartbeat.process, env.heartbeat.ready, env.heartbeat.pid = self.shard, True, 777
                    codec.send(push, env)
                    next_beat = time.monotonic() + HEARTBEAT_S
                if not self.read or not pull.poll(20):
                    time.sleep(0.02 if not self.read else 0)
                    continue
                message = codec.recv(pull)
                if message is None or message.envelope.kind != pb.REQUEST:
                    continue
                self.received += 1
                frames = self.answer(message) if self.answer else None
                if frames is not None:
                    push.send_multipart(frames, copy=False)
        finally:
            pull.close(linger=0)
            push.close(linger=0)


@pytest.fixture
def toy(tmp_path: Path) -> Iterator[Topology]:
    with sock_dir() as sockets:
        yield single_topology(tmp_path / "toy", sockets)


def _result(message: codec.Message, tensors: dict[str, np.ndarray]) -> list[Any]:
    req = message.envelope
    env = pb.Envelope(kind=pb.RESULT, request_id=req.request_id, model=req.model, sender="s0")
    return codec.encode(env, tensors)


def _fails(stub: Any, request: Any, timeout: float = 10.0) -> tuple[grpc.StatusCode, str, float]:
    started = time.monotonic()
    with pytest.raises(grpc.RpcError) as excinfo:
        stub.ModelInfer(request, timeout=timeout)
    return excinfo.value.code(), excinfo.value.details(), time.monotonic() - started


# --------------------------------------------------------------- request size
def test_largest_request_in_bytes_and_in_batch_size(toy: Topology) -> None:
    with IngressThread(toy, max_message_bytes=1 << 20, max_batch_size=16) as ing, ing.stub() as stub:
        big = {"x": np.zeros((50_000, 4), np.float32), "ids": np.zeros((50_000, 2), np.int64)}  # 1.6 MB
        code, details, _ = _fails(stub, raw_request("toy", big))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert str(1 << 20) in details  # "... larger than max (N vs. 1048576)"
        code, details, _ = _fails(stub, raw_request("toy", toy_inputs(17)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "at most 16" in details and "max_batch_size" in details


# ----------------------------------------------------------- high-water marks
def test_a_shard_that_does_not_keep_up_pushes_back_on_the_ingress(toy: Topology) -> None:
    """Requests pile up to the high-water marks, then the next one is refused at once."""
    config = {"send_hwm": 2, "max_batch_size": 1 << 16, "max_message_bytes": 8 << 20, "send_wait_s": 0.05}
    with IngressThread(toy, **config) as ing, ScriptedShard(toy, "s0", read=False, recv_hwm=2), ing.stub() as stub:
        wait_ready(stub)
        request = raw_request("toy", toy_inputs(1 << 15))  # 0.5 MiB of x and 0.5 MiB of ids
        waiting: list[Any] = []
        refused = None
        try:
            for _ in range(64):  # 64 MiB: far more than the marks and the kernel's socket buffers hold
                future = stub.ModelInfer.future(request, timeout=30)
                try:
                    future.result(timeout=0.3)
                except grpc.FutureTimeoutError:
                    waiting.append(future)  # queued toward the shard: it waits
                    continue
                except grpc.RpcError as exc:
                    refused = exc
                    break
                pytest.fail("a shard that reads nothing answered a request")
            assert refused is not None, f"{len(waiting)} requests were queued and none refused"
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "saturated" in refused.details() and "2 messages" in refused.details()
            assert len(waiting) < 48, "the queue toward a stalled shard should be bounded well below 48 MiB"
            print(f"requests queued toward the stalled shard before the first refusal: {len(waiting)}")
            # and again, at once
            code, details, took = _fails(stub, request)
            assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and took < 1.0
        finally:
            for future in waiting:
                future.cancel()
        assert wait_until(lambda: ing.pending() == 0, 5), "cancelled requests left entries behind"


# ------------------------------------------------- bad messages back from shards
@pytest.mark.parametrize(
    "case, frames_of, code",
    [
        (
            "frame shorter than its header",
            lambda m: (lambda f: f[:-1] + [bytes(f[-1])[:-4]])(_result(m, {"y": np.zeros((1, 3), np.float32)})),
            grpc.StatusCode.INTERNAL,
        ),
        (
            "more frames than max_frames",
            lambda m: _result(m, {f"t{i}": np.zeros(1, np.int8) for i in range(codec.DEFAULT_LIMITS.max_frames)}),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
    ],
)
def test_a_result_the_ingress_drops_ends_its_request_at_once_with_a_status(
    toy: Topology, case: str, frames_of: Answer, code: grpc.StatusCode
) -> None:
    with IngressThread(toy) as ing, ScriptedShard(toy, "s0", frames_of), ing.stub() as stub:
        wait_ready(stub)
        got, details, took = _fails(stub, raw_request("toy", toy_inputs(1)), timeout=20)
        assert got == code, (case, details)
        assert took < 5.0, f"{case}: answered after {took:.1f} s, as at a deadline, not at once"
        assert "could not accept" in details
        assert sum(ing.ingress.drops.snapshot().values()) >= 1
        assert ing.pending() == 0


# ------------------------------------------------------------------ safe mode
def test_partition_refuses_a_model_that_needs_unsafe_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import keras

    from pipeline import cli

    x = keras.Input(shape=(4,), name="x")
    y = keras.layers.Dense(2, name="d")(keras.layers.Lambda(lambda t: t * 2, name="double")(x))
    keras.Model(x, y).save(tmp_path / "lambda.keras")
    code = cli.main(["partition", str(tmp_path / "lambda.keras"), "--shards", "2", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "--unsafe" in err and "Lambda" in err
    assert not (tmp_path / "out" / topo.TOPOLOGY_FILE).exists()
