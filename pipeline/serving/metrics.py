"""Prometheus metrics of the ingress and of each shard worker (``prometheus_client``).

Every process owns one :class:`~prometheus_client.CollectorRegistry` (never the
global one, so a test that runs an ingress in a thread sees only that
ingress) and serves it over HTTP at the address the topology records for it
(``ingress.metrics``, ``shards[].metrics``), or the one given with
``--metrics``; ``--metrics ''`` (or ``none``) turns the endpoint off.

Two kinds of series:

- histograms and counters fed by a few hook calls where the event happens
  (a request ends, a batch is computed, a message arrives after a hop);
- counters and gauges read at scrape time from the state the process
  already keeps for its heartbeats and the admin RPC (the worker's
  ``stats_snapshot()``, the ingress's pending table, liveness and process
  table, the drop counters), so the metrics, the heartbeats and ``pipeline
  top`` show the same numbers.

Each hop is measured once, by its receiver (``sent_ns`` of the envelope to the
arrival), and each compute call once, by its worker. Names, types and labels
are listed in docs/METRICS.md.

The same HTTP server answers the probes of a supervisor (Kubernetes'
``httpGet`` probes, a load balancer): ``/ready`` (also ``/readyz``) says 200
only while the process can take traffic (a worker: shard loaded and warm, not
stopping), ``/live`` (also ``/livez``, ``/healthz``) says 200 while its loop
turns; otherwise 503 with the reason as text. A process that passes no probes
answers 404 there.

Metrics never take a process down: when the recorded port is taken, the
endpoint moves to a free port with a warning, and heartbeats report the
address actually bound; any other bind failure is logged and the process
runs without the endpoint. Only an address that does not parse is refused
at start.
"""

from __future__ import annotations

import errno
import socket
import socketserver
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pipeline import replicas
from pipeline import topology as topo
from pipeline.errors import UsageError
from pipeline.log import get_logger

if TYPE_CHECKING:
    from pipeline.pb import envelope_pb2 as pb
    from pipeline.serving.ingress import Ingress
    from pipeline.serving.worker import Worker

log = get_logger("pipeline.metrics")

#: values of ``--metrics`` that turn the endpoint off.
DISABLED = frozenset({"", "none", "off"})
#: latency buckets in seconds: from half a millisecond (a hop) to 30 s (the default deadline).
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
#: batch buckets: powers of two up to the ingress's default max_batch_size.
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: label value for requests that name a model this ingress does not serve (bounded cardinality).
OTHER_MODEL = "(other)"
#: a collector reads dicts that the serving thread may grow meanwhile; it retries this often.
COLLECT_ATTEMPTS = 3


# ------------------------------------------------------------------ address
def parse_address(text: str | None) -> tuple[str, int] | None:
    """``host:port`` -> ``(bind host, port)``; ``None`` when the endpoint is off.

    A loopback host is bound as given; any other host is bound on every
    interface (as the ZeroMQ endpoints are), so a scraper on another machine
    reaches it. ``:PORT`` binds every interface; port 0 picks a free port.
    """
    text = (text or "").strip()
    if text.lower() in DISABLED:
        return None
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        port = -1
    if not sep or not 0 <= port <= 65535:
        raise UsageError(f"metrics address {text!r} is not valid; expected HOST:PORT (port 0: any), or '' / none to turn it off")
    if not host:
        return "0.0.0.0", port
    return (host if topo.is_loopback(host) else "0.0.0.0"), port


#: a probe's answer: (passing, reason shown in the response body).
ProbeResult = tuple[bool, str]
#: paths of the readiness and liveness probes (aliases as Kubernetes' own components name them).
READY_PATHS = frozenset({"/ready", "/readyz"})
LIVE_PATHS = frozenset({"/live", "/livez", "/healthz"})


@dataclass(frozen=True)
class Probes:
    """What ``/ready`` and ``/live`` ask the process (each call returns ``(passing, reason)``)."""

    ready: Callable[[], ProbeResult]
    live: Callable[[], ProbeResult]


def probe_app(metrics_app: Callable[..., Any], probes: Probes | None) -> Callable[..., Any]:
    """A WSGI app: the probe paths answered by ``probes``, everything else by the metrics app."""

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path not in READY_PATHS and path not in LIVE_PATHS:
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if probes is None:
            passing, reason = False, "this process serves no probes"
            status = "404 Not Found"
        else:
            try:
                passing, reason = (probes.ready if path in READY_PATHS else probes.live)()
            except Exception as exc:  # a probe that raises says "not passing", never kills the server thread
                passing, reason = False, f"probe failed: {type(exc).__name__}: {exc}"
            status = "200 OK" if passing else "503 Service Unavailable"
        body = (reason + "\n").encode()
        start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))])
        return [body]

    return app


class _Server(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - scrapes and probes every few seconds
        pass


def _serve(host: str, port: int, app: Callable[..., Any]) -> WSGIServer:
    """Bind ``host:port`` (IPv4 or IPv6) and serve ``app`` from a daemon thread."""
    family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    server_class = type("_FamilyServer", (_Server,), {"address_family": family})
    httpd = make_server(host, port, app, server_class, handler_class=_QuietHandler)
    threading.Thread(target=httpd.serve_forever, name="metrics-http", daemon=True).start()
    return httpd


class MetricsServer:
    """One registry and the process's probes served over HTTP (a daemon thread)."""

    def __init__(self, registry: CollectorRegistry, process: str, probes: Probes | None = None) -> None:
        self.registry = registry
        self.process = process
        self.probes = probes
        self.address = ""  # host:port actually bound ("" when off)
        self._httpd: Any = None

    def start(self, address: str | None) -> str:
        """Serve at ``address`` (moved to a free port with a warning when taken); return the bound address."""
        parsed = parse_address(address)
        if parsed is None:
            log.info("metrics_disabled", process=self.process)
            return ""
        host, port = parsed
        app = probe_app(make_wsgi_app(self.registry), self.probes)
        try:
            self._httpd = _serve(host, port, app)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE or port == 0:
                log.error("metrics_unavailable", process=self.process, address=address, detail=str(exc))
                return ""
            self._httpd = _serve(host, 0, app)
            log.warning(
                "metrics_port_taken", process=self.process, wanted=address, bound=self._httpd.server_port,
                detail="the metrics endpoint moved to a free port; heartbeats and the admin RPC report it",
            )  # fmt: skip
        given_host = (address or "").strip().rpartition(":")[0].strip("[]")
        self.address = f"{given_host or host}:{self._httpd.server_port}"  # as given: the name a scraper uses
        log.info("metrics_serving", process=self.process, address=self.address)
        return self.address

    @property
    def port(self) -> int:
        return int(self._httpd.server_port) if self._httpd is not None else 0

    def close(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


class _Scrape(Collector):
    """Series read at scrape time by ``read`` (retried when the state changed under it)."""

    def __init__(self, read: Callable[[], Iterable[Metric]]) -> None:
        self._read = read

    def collect(self) -> Iterable[Metric]:
        for attempt in range(COLLECT_ATTEMPTS):
            try:
                return list(self._read())
            except RuntimeError:  # "dictionary changed size during iteration": read again
                if attempt == COLLECT_ATTEMPTS - 1:
                    raise
        return []


def _counter(name: str, doc: str, labels: list[str], values: Mapping[tuple[str, ...], float]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in values.items():
        family.add_metric(list(key), float(value))
    return family


def _gauge(name: str, doc: str, labels: list[str], values: Mapping[tuple[str, ...], float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for key, value in values.items():
        family.add_metric(list(key), float(value))
    return family


def _new_registry() -> CollectorRegistry:
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)  # process_resident_memory_bytes, process_cpu_seconds_total, ...
    return registry


# ------------------------------------------------------------------ ingress
class IngressMetrics:
    """The ingress's registry: requests, latency, in flight, result hops, shard liveness, drops."""

    def __init__(self, ingress: Ingress) -> None:
        self.ingress = ingress
        self.model = ingress.topology.name
        self.registry = _new_registry()
        r = self.registry
        self.requests = Counter(
            "pipeline_requests", "ModelInfer calls that ended, by model and gRPC status code", ["model", "code"], registry=r
        )
        self.duration = Histogram(
            "pipeline_request_duration_seconds",
            "end-to-end latency of successful ModelInfer calls, measured by the ingress",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("pipeline_requests_in_flight", "ModelInfer calls being served now", ["model"], registry=r)
        self.hop = Histogram(
            "pipeline_hop_duration_seconds",
            "time from a sender handing a message to ZeroMQ to its receiver decoding it",
            ["src", "dst"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        for code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE):
            self.requests.labels(self.model, code.name)  # present at 0 from the start, so rate() sees the first one
        self.in_flight.labels(self.model)
        self.duration.labels(self.model)
        r.register(_Scrape(self._read))
        self.server = MetricsServer(r, topo.INGRESS, Probes(ready=ingress.probe_ready, live=ingress.probe_live))

    # hooks ------------------------------------------------------------------
    def request_started(self, model: str) -> None:
        self.in_flight.labels(self._label(model)).inc()

    def request_ended(self, model: str, code: grpc.StatusCode, duration_ns: int) -> None:
        label = self._label(model)
        self.in_flight.labels(label).dec()
        self.requests.labels(label, code.name).inc()
        if code == grpc.StatusCode.OK:
            self.duration.labels(label).observe(duration_ns / 1e9)

    def received(self, env: pb.Envelope, now_ns: int | None = None) -> None:
        """A message read from the results socket: a RESULT's hop from its shard."""
        from pipeline.pb import envelope_pb2 as pb

        if env.kind == pb.RESULT and env.sent_ns:
            now_ns = time.time_ns() if now_ns is None else now_ns
            self.hop.labels(env.sender or "?", topo.INGRESS).observe(max(0, now_ns - env.sent_ns) / 1e9)

    # lifecycle --------------------------------------------------------------
    def start(self, address: str | None) -> str:
        return self.server.start(address)

    def close(self) -> None:
        self.server.close()

    # scrape -----------------------------------------------------------------
    def _label(self, model: str) -> str:
        return model if model == self.model else OTHER_MODEL

    def _read(self) -> Iterable[Metric]:
        ing = self.ingress
        now = time.monotonic()
        not_up = getattr(ing.liveness, "replicas_not_up", ing.liveness.not_up)(now)  # per replica (pipeline.replicas)
        ages, restarts, beats = {}, {}, {}
        for shard in ing.processes.shards:
            seen = ing.processes.get(shard)
            if seen is not None:
                ages[(shard,)] = max(0.0, now - seen.at)
                restarts[(shard,)] = seen.restarts
                beats[(shard,)] = seen.count
        yield _gauge("pipeline_heartbeat_age_seconds", "seconds since the ingress last heard from each shard", ["shard"], ages)
        yield _gauge(
            "pipeline_shard_up",
            "1 when the ingress counts the shard as up (ready, recent heartbeat, connected)",
            ["shard"],
            {(s,): float(s not in not_up) for s in ing.liveness.shards},
        )
        yield _counter("pipeline_heartbeats", "heartbeats the ingress accepted, by shard", ["shard"], beats)
        yield _counter("pipeline_shard_restarts", "times a shard came back with a new pid", ["shard"], restarts)
        yield _gauge("pipeline_pending_requests", "requests waiting for their outputs in the ingress's table", [], {(): len(ing.table)})
        yield _counter(
            "pipeline_inferences", "batch rows of successful requests (Triton's inference_count)", ["model"], {(self.model,): ing.stats.inference_count}
        )
        yield _counter("pipeline_retries", "requests resent after a shard was lost", [], {(): getattr(ing, "retried", 0)})
        yield _counter(
            "pipeline_messages_dropped",
            "messages a process dropped, by reason (bad frames, unexpected kind, unknown sender, ...)",
            ["process", "reason"],
            {(topo.INGRESS, reason): n for reason, n in ing.drops.snapshot().items()},
        )
        yield _counter(
            "pipeline_results_ignored",
            "result parts that matched no pending request (late, after a deadline or retry), by reason",
            ["reason"],
            {(reason,): n for reason, n in dict(ing.table.ignored).items()},
        )


# ------------------------------------------------------------------- worker
class WorkerMetrics:
    """A shard worker's registry: compute, queue, batch sizes, inbound hops, join and queue gauges, drops."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.shard = getattr(worker, "process_name", worker.name)  # a replica's own name (shard2@1), pipeline.replicas
        self.registry = _new_registry()
        r = self.registry
        self.compute = Histogram(
            "pipeline_shard_compute_duration_seconds",
            "time of one compute call (a batch) of a shard's sub-model",
            ["shard"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        ).labels(self.shard)
        self.queue = Histogram(
            "pipeline_shard_queue_duration_seconds",
            "per request, time from its first part reaching the shard to its compute call starting (join + batching wait)",
            ["shard"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        ).labels(self.shard)
        self.batch = Histogram(
            "pipeline_batch_size", "requests per compute call", ["shard"], buckets=BATCH_BUCKETS, registry=r
        ).labels(self.shard)
        self.rows = Histogram(
            "pipeline_batch_rows", "rows (first-axis size) per compute call", ["shard"], buckets=BATCH_BUCKETS, registry=r
        ).labels(self.shard)
        self.hop = Histogram(
            "pipeline_hop_duration_seconds",
            "time from a sender handing a message to ZeroMQ to its receiver decoding it",
            ["src", "dst"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.compute_seconds = 0.0  # cumulative, for the heartbeat (the live view's busy %)
        r.register(_Scrape(self._read))
        self.server = MetricsServer(r, self.shard, Probes(ready=worker.probe_ready, live=worker.probe_live))

    # hooks ------------------------------------------------------------------
    def hopped(self, sender: str, ns: int) -> None:
        self.hop.labels(sender or "?", self.shard).observe(max(0, ns) / 1e9)

    def computed(self, done: Any) -> None:
        """A finished compute call (the worker's ``_Done``): its time, size and each request's queue wait."""
        seconds = max(0, done.end_ns - done.start_ns) / 1e9
        self.compute_seconds += seconds
        self.compute.observe(seconds)
        self.batch.observe(len(done.requests))
        self.rows.observe(done.rows)
        for r in done.requests:
            self.queue.observe(max(0, done.start_ns - r.first_ns) / 1e9)

    def heartbeat_stats(self) -> dict[str, float]:
        """Extra keys of the heartbeat's stats map (docs/METRICS.md)."""
        return {"compute_s": self.compute_seconds}

    # lifecycle --------------------------------------------------------------
    def start(self, address: str | None) -> str:
        return self.server.start(address)

    def close(self) -> None:
        self.server.close()

    # scrape -----------------------------------------------------------------
    def _read(self) -> Iterable[Metric]:
        w = self.worker
        s = w.stats_snapshot()
        key = (self.shard,)
        codes = {(self.shard, "OK"): s.get("computed", 0)}
        codes.update({(self.shard, k.partition(".")[2]): v for k, v in s.items() if k.startswith("errors.")})
        yield _counter(
            "pipeline_shard_requests",
            "requests a shard computed (code OK) or answered with an error (its gRPC code)",
            ["shard", "code"],
            codes,
        )
        yield _counter("pipeline_shard_messages_received", "messages read from the shard's PULL socket", ["shard"], {key: s["messages_in"]})
        yield _counter("pipeline_shard_messages_sent", "messages the shard sent (parts, results, errors)", ["shard"], {key: s["messages_out"]})
        yield _gauge("pipeline_join_pending", "requests waiting in the join buffer for their other parts", ["shard"], {key: s["pending_joins"]})
        yield _gauge("pipeline_shard_queued", "ready requests waiting for the compute thread", ["shard"], {key: s["queued"]})
        yield _gauge("pipeline_shard_computing", "requests in the compute call running now", ["shard"], {key: s["in_flight"]})
        yield _gauge("pipeline_shard_ready", "1 once the shard's model is loaded and warm", ["shard"], {key: float(w.compute.ready.is_set())})
        yield _counter("pipeline_join_expired", "requests dropped from the join buffer at their deadline", ["shard"], {key: s["join_expired"]})
        yield _counter("pipeline_join_refused", "requests refused because the join buffer was full", ["shard"], {key: s["join_refused"]})
        yield _counter(
            "pipeline_heartbeats_undelivered", "heartbeats the ingress could not be sent (not connected)", ["shard"], {key: s["heartbeats_undelivered"]}
        )
        yield _counter(
            "pipeline_messages_dropped",
            "messages a process dropped, by reason (bad frames, unexpected kind, unknown sender, ...)",
            ["process", "reason"],
            {(self.shard, reason): n for reason, n in w.drops.snapshot().items()},
        )


# ------------------------------------------------------------ scrape config
def scrape_config(topology: topo.Topology, interval_s: float = 5.0) -> str:
    """A Prometheus ``scrape_configs`` entry for every endpoint the topology records (YAML)."""
    targets = [(topo.INGRESS, "ingress", topology.ingress.metrics)] + [
        (name, "shard", r.metrics) for s in topology.shards for name, r in zip(replicas.process_names(s), s.replicas)
    ]
    data = {
        "scrape_configs": [
            {
                "job_name": f"keras-pipeline-{topology.name}",
                "scrape_interval": f"{interval_s:g}s",
                "static_configs": [
                    # target labels that no series uses, so none is renamed exported_*
                    {"targets": [address], "labels": {"pipeline": topology.name, "pipeline_process": name, "role": role}}
                    for name, role, address in targets
                    if parse_address(address) is not None
                ],
            }
        ]
    }
    return topo.dump_yaml(data)


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.serving.metrics DIR``: print the Prometheus scrape config of a topology."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m pipeline.serving.metrics", description=main.__doc__)
    parser.add_argument("directory", metavar="DIR", help="topology directory (holds topology.yaml)")
    parser.add_argument("--interval", type=float, default=5.0, help="scrape interval in seconds (default 5)")
    args = parser.parse_args(argv)
    sys.stdout.write(scrape_config(topo.load(args.directory, check_files=False), args.interval))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
