"""``pipeline top --target ADDR``: a live view of a running pipeline, refreshed every second.

It asks the ingress's admin RPC (``pipeline.admin.PipelineAdmin/Processes``)
once per interval: the ingress answers for itself and for every shard from
its latest heartbeat, so one address shows the whole pipeline, wherever the
shards run. The numbers are the ones the Prometheus endpoints export (the
workers' heartbeat stats and the ingress's counters); rates are the change
between two answers divided by the time between them.

Per shard: state (up, or why not), last heartbeat, requests per second,
requests per compute call, p50/p99 compute time (last 256 calls), busy (share
of the interval spent computing), requests queued for compute, requests in
the join buffer, errors per second, messages dropped, resident memory. The
busiest shard is marked ``<< slowest``: in a pipeline, it bounds the
throughput. The ingress line gives its rates, errors by status code and the
requests in flight.

``--once`` prints one frame (two answers ``--interval`` apart, so the rates
are real) and exits: for tests and scripts. On a terminal the frame is
redrawn in place (ANSI); otherwise frames are printed one after another.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import grpc

from pipeline import topology as topo
from pipeline.errors import Unavailable, UsageError

DEFAULT_INTERVAL_S = 1.0
#: an admin call slower than this counts as no answer.
RPC_TIMEOUT_S = 2.0
CLEAR = "\x1b[H\x1b[2J"  # cursor home, clear screen
MIB = 1 << 20
SLOWEST = "<< slowest"


@dataclass(frozen=True)
class Sample:
    """One admin answer and when it arrived (monotonic seconds)."""

    response: object  # admin_pb2.ProcessesResponse
    at: float


# --------------------------------------------------------------------- pure
def _stat(stats: Mapping[str, float], key: str) -> float:
    return float(stats.get(key, 0.0))


def _delta_rate(cur: Mapping[str, float], prev: Mapping[str, float] | None, key: str, dt: float) -> float | None:
    """Per-second change of a counter between two answers; ``None`` without a previous one (or a restart)."""
    if prev is None or dt <= 0:
        return None
    change = _stat(cur, key) - _stat(prev, key)
    return change / dt if change >= 0 else None


def _fmt(value: float | None, spec: str = ".1f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def _age(seconds: float) -> str:
    if seconds < 0:
        return "never"
    return f"{seconds:.1f}s"


def render(cur: Sample, prev: Sample | None, *, target: str) -> str:
    """One frame of the live view as text (no terminal codes)."""
    res = cur.response
    dt = cur.at - prev.at if prev is not None else 0.0
    before = {p.name: p for p in prev.response.processes} if prev is not None else {}
    lines = [
        f"pipeline top  {target}  model {res.model}  {time.strftime('%H:%M:%S', time.localtime(res.time_ns / 1e9))}"
        + (f"  over {dt:.1f} s" if prev is not None else "")
    ]
    shards = [p for p in res.processes if p.role == "shard"]
    for p in res.processes:
        if p.role != "ingress":
            continue
        s, old = p.stats, (before[p.name].stats if p.name in before else None)
        ok, err = _delta_rate(s, old, "success", dt), _delta_rate(s, old, "fail", dt)
        total = None if ok is None or err is None else ok + err
        lines.append(
            f"ingress  {p.state}  host {p.host}  pid {p.pid}  rss {p.rss_bytes / MIB:.1f} MiB  "
            f"in flight {int(_stat(s, 'pending'))}/{int(_stat(s, 'max_inflight'))}"
        )
        lines.append(
            f"         req/s {_fmt(total)}  ok/s {_fmt(ok)}  err/s {_fmt(err)}  "
            f"ok {int(_stat(s, 'success'))}  failed {int(_stat(s, 'fail'))}  "
            f"dropped {int(_stat(s, 'dropped'))}  retries {int(_stat(s, 'retries'))}"
        )
        codes = sorted((k.partition(".")[2], int(v)) for k, v in s.items() if k.startswith("codes.") and k != "codes.OK")
        if codes:
            lines.append("         errors " + "  ".join(f"{code} {n}" for code, n in codes))
    header = ("SHARD", "STATE", "HOST", "PID", "BEAT", "REQ/S", "BATCH", "P50 ms", "P99 ms", "BUSY", "QUEUE", "JOIN", "ERR/S", "DROP", "RSS MiB", "")
    rows = []
    busy_of: dict[str, float] = {}
    for p in shards:
        s = p.stats
        old_proc = before.get(p.name)
        old = old_proc.stats if old_proc is not None and old_proc.pid == p.pid else None  # a restart resets counters
        # a shard's stats are as of its heartbeat, not of the answer: time the rates by the heartbeats
        beat_dt = dt
        if old is not None and old_proc is not None and old_proc.heartbeats != p.heartbeats:
            beat_dt = dt - (p.heartbeat_age_s - old_proc.heartbeat_age_s)
        req = _delta_rate(s, old, "computed", beat_dt)
        batches = _delta_rate(s, old, "batches", beat_dt)
        if req is not None and batches:
            batch = req / batches
        else:
            batch = _stat(s, "last_batch_size") if p.heartbeats else None
        busy = _delta_rate(s, old, "compute_s", beat_dt)
        if busy is not None:
            busy_of[p.name] = busy
        rows.append(
            [
                p.name,
                "up" if p.up else p.state,
                p.host or "-",
                str(p.pid or "-"),
                _age(p.heartbeat_age_s),
                _fmt(req),
                _fmt(batch),
                _fmt(_stat(s, "compute_ms_p50") if p.heartbeats else None, ".2f"),
                _fmt(_stat(s, "compute_ms_p99") if p.heartbeats else None, ".2f"),
                "-" if busy is None else f"{min(busy, 9.99) * 100:.0f}%",
                str(int(_stat(s, "queued"))),
                str(int(_stat(s, "pending_joins"))),
                _fmt(_delta_rate(s, old, "errors", beat_dt)),
                str(int(_stat(s, "dropped"))),
                f"{p.rss_bytes / MIB:.1f}" if p.rss_bytes else "-",
                "",
            ]
        )
    slowest = _slowest(shards, busy_of)
    for row in rows:
        if row[0] == slowest:
            row[-1] = SLOWEST
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines.append("")
    for row in [header, *rows]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def _slowest(shards: list, busy_of: Mapping[str, float]) -> str | None:
    """The shard that bounds throughput: the busiest over the interval, else the slowest p50 compute."""
    if len(shards) < 2:
        return None
    if busy_of and max(busy_of.values()) > 0:
        return max(busy_of, key=lambda n: busy_of[n])
    p50 = {p.name: _stat(p.stats, "compute_ms_p50") for p in shards if p.heartbeats}
    if p50 and max(p50.values()) > 0:
        return max(p50, key=lambda n: p50[n])
    return None


# ---------------------------------------------------------------- network
class AdminClient:
    """The admin stub over one channel (plaintext, or TLS like ``pipeline infer``)."""

    def __init__(self, target: str, args: argparse.Namespace) -> None:
        from pipeline.pb import admin_pb2 as apb
        from pipeline.pb import admin_pb2_grpc as apb_grpc
        from pipeline.security import tls

        self.target = target
        self._request = apb.ProcessesRequest()
        self.channel = tls.open_channel(
            target,
            tls=getattr(args, "tls", False),
            ca=getattr(args, "tls_ca", None),
            cert=getattr(args, "tls_cert", None),
            key=getattr(args, "tls_key", None),
            server_name=getattr(args, "tls_server_name", None),
        )
        self.stub = apb_grpc.PipelineAdminStub(self.channel)

    def sample(self) -> Sample:
        try:
            response = self.stub.Processes(self._request, timeout=RPC_TIMEOUT_S)
        except grpc.RpcError as exc:
            code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
            hint = " (an ingress without the admin service?)" if code == grpc.StatusCode.UNIMPLEMENTED else ""
            raise Unavailable(f"no answer from the admin service at {self.target}{hint}: {code.name}: {exc.details()}") from None
        return Sample(response, time.monotonic())

    def close(self) -> None:
        self.channel.close()


def resolve_target(text: str) -> str:
    """``host:port``, or a topology directory (its ingress's gRPC address)."""
    if Path(text, topo.TOPOLOGY_FILE).is_file():
        return topo.load(text, check_files=False).ingress.grpc
    return text


# -------------------------------------------------------------------- cli
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--target",
        default=os.environ.get("PIPELINE_INFER_TARGET", topo.DEFAULT_GRPC_ADDRESS),
        help=f"ingress host:port, or a topology directory (default: $PIPELINE_INFER_TARGET or {topo.DEFAULT_GRPC_ADDRESS})",
    )
    parser.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, help="seconds between refreshes (default 1)")
    parser.add_argument("--once", action="store_true", help="print one frame (two answers --interval apart) and exit")
    parser.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's roots unless --tls-ca")
    parser.add_argument("--tls-ca", metavar="PEM", help="trust this CA (implies --tls)")
    parser.add_argument("--tls-cert", metavar="PEM", help="client certificate for mutual TLS (implies --tls)")
    parser.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    parser.add_argument("--tls-server-name", metavar="NAME", help="name to check the server certificate against")


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    if args.interval <= 0:
        raise UsageError(f"--interval must be > 0 seconds, received {args.interval}")
    target = resolve_target(args.target)
    client = AdminClient(target, args)
    try:
        if args.once:
            first = client.sample()
            time.sleep(args.interval)
            out.write(render(client.sample(), first, target=target) + "\n")
            return 0
        return _loop(client, target, args.interval, out)
    finally:
        client.close()


def _loop(client: AdminClient, target: str, interval: float, out: TextIO) -> int:
    """Redraw every ``interval`` until interrupted; an unreachable ingress is shown, and retried."""
    tty = out.isatty()
    prev: Sample | None = None
    next_at = time.monotonic()
    try:
        while True:
            try:
                cur = client.sample()
                frame = render(cur, prev, target=target)
                prev = cur
            except Unavailable as exc:
                frame = f"pipeline top  {target}\n\n{exc.message}\nretrying every {interval:g} s (Ctrl-C to quit)"
                prev = None
            out.write((CLEAR + frame + "\n") if tty else (frame + "\n\n"))
            out.flush()
            next_at += interval
            time.sleep(max(0.0, next_at - time.monotonic()))
    except KeyboardInterrupt:
        return 0
