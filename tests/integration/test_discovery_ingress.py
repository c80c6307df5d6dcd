"""The real ingress with an entry shard whose replicas are found by DNS (``replicas: {count: 2, discover: dns}``).

Fake replicas (threads speaking the envelope protocol over real sockets) bind
the shard's port on loopback addresses of their own (127.0.0.2, 127.0.0.3: a
pod IP each) and heartbeat as ``s0@<address>``. The ingress learns them from
the heartbeats alone, connects to each, is ready once one is up, spreads
requests over both, writes its choice into every REQUEST's ``routes``, and
stops routing to one that goes away; a heartbeat naming no IP address is
ignored.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from helpers_ingress import HEARTBEAT_S, WAIT_S, IngressThread, raw_request, sock_dir, wait_until  # noqa: E402

from pipeline import topology as topo  # noqa: E402
from pipeline.launch import free_ports  # noqa: E402
from pipeline.pb import envelope_pb2 as pb  # noqa: E402
from pipeline.serving import kserve  # noqa: E402
from pipeline.topology import Batching, IngressSpec, ShardOutput, ShardSpec, TensorSpec, Topology  # noqa: E402
from pipeline.wire import codec  # noqa: E402


def discovered_topology(directory: Path, sockets: str, port: int) -> Topology:
    """Model ``dns``: x float32[-1,4] -> shard ``s0`` (replicas found by resolving ``localhost``) -> y = 2x."""
    x, y = TensorSpec("x", "float32", (-1, 4)), TensorSpec("y", "float32", (-1, 4))
    results = f"ipc://{sockets}/ingress.ipc"
    endpoint = f"tcp://localhost:{port}"
    t = Topology(
        name="dns",
        inputs=(x,),
        outputs=(y,),
        tensors={"x": x, "y": y},
        shards=(
            ShardSpec(
                name="s0", file="s0.keras", inputs=("x",), outputs=(ShardOutput("y", (topo.INGRESS,)),), endpoint=endpoint,
                host="localhost", bind=f"tcp://0.0.0.0:{port}", batching=Batching(), discovered=2,
            ),
        ),
        ingress=IngressSpec(grpc="127.0.0.1:0", results=results, host="127.0.0.1", bind=results),
        directory=directory,
        heartbeat_interval_s=HEARTBEAT_S,
    )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "s0.keras").write_bytes(b"")
    t.write(directory)
    return topo.load(directory)


class FakeReplica(threading.Thread):
    """One replica: binds ``address:port``, heartbeats as ``s0@address``, answers y = 2x, records the routes."""

    def __init__(self, t: Topology, address: str, port: int, name: str = "") -> None:
        super().__init__(name=f"replica-{address}", daemon=True)
        self.t, self.address, self.port = t, address, port
        self.process = name or f"s0@{address}"
        self.routes: list[Mapping[str, str]] = []
        self.stop_event = threading.Event()
        self.bound = threading.Event()

    def run(self) -> None:
        ctx = zmq.Context.instance()
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        try:
            pull.bind(f"tcp://{self.address}:{self.port}")
            push.connect(self.t.ingress.results)
            self.bound.set()
            next_beat = 0.0
            while not self.stop_event.is_set():
                if time.monotonic() >= next_beat:
                    env = pb.Envelope(kind=pb.HEARTBEAT, sender="s0")
                    env.heartbeat.process, env.heartbeat.ready, env.heartbeat.pid = self.process, True, 7
                    codec.send(push, env)
                    next_beat = time.monotonic() + HEARTBEAT_S
                if not pull.poll(10):
                    continue
                message = codec.recv(pull)
                if message is None:
                    continue
                self.routes.append(dict(message.envelope.routes))
                out = pb.Envelope(kind=pb.RESULT, request_id=message.envelope.request_id, model="dns", sender="s0")
                codec.send(push, out, {"y": (message.tensors["x"] * 2).astype(np.float32)})
        finally:
            pull.close(linger=0)
            push.close(linger=0)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(WAIT_S)


def infer(stub: object, x: np.ndarray) -> np.ndarray:
    response = stub.ModelInfer(raw_request("dns", {"x": x}), timeout=WAIT_S)  # type: ignore[attr-defined]
    return kserve.output_array(response, 0)


def test_the_ingress_learns_replicas_from_heartbeats_and_routes_each_request(tmp_path: Path) -> None:
    (port,) = free_ports(1, "127.0.0.1")
    with sock_dir() as sockets:
        t = discovered_topology(tmp_path / "dns", sockets, port)
        a, b = FakeReplica(t, "127.0.0.2", port), FakeReplica(t, "127.0.0.3", port)
        bogus = FakeReplica(t, "127.0.0.1", port, name="s0@not-an-address")
        with IngressThread(t) as ing:
            assert ing.in_loop(lambda: ing.ingress.liveness.not_up()) == {"s0": "no replica has sent a heartbeat yet"}
            started = []
            try:
                for r in (a, b, bogus):
                    r.start()
                    assert r.bound.wait(WAIT_S)
                    started.append(r)
                assert wait_until(lambda: ing.in_loop(lambda: ing.ingress.ready()))
                assert wait_until(lambda: ing.in_loop(lambda: all(ing.ingress.liveness.is_up(f"s0@{r.address}") for r in (a, b))))
                known = ing.in_loop(lambda: sorted(ing.ingress.liveness.groups["s0"]))
                assert known == ["s0@127.0.0.2", "s0@127.0.0.3"]  # the bogus name is not followed
                with ing.stub() as stub:
                    x = np.arange(8, dtype=np.float32).reshape(2, 4)
                    for _ in range(40):
                        np.testing.assert_array_equal(infer(stub, x), x * 2)
                    # each request went to one replica, and its envelope named that replica
                    assert len(a.routes) + len(b.routes) == 40 and a.routes and b.routes, (len(a.routes), len(b.routes))
                    assert all(r == {"s0": "127.0.0.2"} for r in a.routes) and all(r == {"s0": "127.0.0.3"} for r in b.routes)
                    assert not bogus.routes
                    # one replica goes: once the ingress sees it gone, every request goes to the other
                    a.stop()
                    assert wait_until(lambda: ing.in_loop(lambda: not ing.ingress.liveness.is_up("s0@127.0.0.2")))
                    before = len(a.routes), len(b.routes)
                    for _ in range(20):
                        np.testing.assert_array_equal(infer(stub, x), x * 2)
                    assert len(a.routes) == before[0] and len(b.routes) == before[1] + 20
                dropped = ing.in_loop(lambda: ing.ingress.drops.snapshot())
                assert dropped.get("bad_replica", 0) >= 1, dropped
            finally:
                for r in started:
                    r.stop()
