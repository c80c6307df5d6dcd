"""``pipeline probe speed|serve|link``: measure hosts and links, and write them into a cluster file.

- ``speed``: a short compiled run of a reference model on this host (or a
  ``serve`` peer's, ``--peer``); prints samples/s and the speed in the
  planner's units (the cost model's estimate over the measured time; with
  ``--baseline`` relative to another host's samples/s instead);
  ``--update FILE --host NAME`` writes it as that host's ``speed``.
- ``serve --bind tcp://ADDR:PORT``: the peer that ``link`` measures against
  (run it on the other host; it exits after ``--idle-timeout`` without traffic).
- ``link tcp://ADDR:PORT``: round trips, then the rate each way; prints the
  bandwidth in the cluster file's units and the latency in ms;
  ``--update FILE --pair A,B`` (or ``--default``) writes the link.

See docs/MULTIHOST.md, "Measuring your hosts and links".
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pipeline.errors import ClusterError, UsageError
from pipeline.probe import link as probe_link
from pipeline.probe.measure import parse_size, relative_speed, round_significant
from pipeline.probe.update import ClusterFile, parse_pair

#: how to write a CURVE key on the command line (a Z85 key may begin with '-', which argparse takes for an option).
KEY_FORM = "(write --curve-server-key=KEY: a key may begin with '-')"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from pipeline.probe import speed as probe_speed  # constants only: TensorFlow is imported when a run starts

    sub = parser.add_subparsers(dest="probe", metavar="WHAT", required=True)

    s = sub.add_parser("speed", help="this host's compute speed: a short compiled run of a reference model")
    s.add_argument("--model", default=probe_speed.REFERENCE_MODEL, help=f"a keras.applications name or a .keras file (default {probe_speed.REFERENCE_MODEL})")
    s.add_argument("--batch", type=int, default=probe_speed.DEFAULT_BATCH, help=f"samples per call (default {probe_speed.DEFAULT_BATCH}, the batch plans are made for)")
    s.add_argument("--seconds", type=float, default=probe_speed.DEFAULT_SECONDS, help=f"how long to time calls after warm-up (default {probe_speed.DEFAULT_SECONDS:g})")
    s.add_argument("--threads", type=int, default=None, help="TensorFlow threads (default: TensorFlow's, all CPUs; use what the workers will use)")
    s.add_argument("--baseline", type=float, default=None, metavar="SAMPLES_PER_S", help="a speed relative to this many samples/s (another host's run of the same probe); without it the speed is in the planner's units (1.0: the cost model's reference host)")
    s.add_argument("--peer", default=None, metavar="tcp://ADDR:PORT", help="run it on the host of this `probe serve` peer instead")
    s.add_argument(
        "--curve-server-key", default=None, metavar="KEY", help=f"with --peer: the public key `probe serve --curve` printed {KEY_FORM}"
    )
    wait = probe_speed.REMOTE_TIMEOUT_S + 60  # the peer gives up on a run after REMOTE_TIMEOUT_S and says so: wait for that answer
    s.add_argument("--peer-timeout", type=float, default=wait, metavar="S", help=f"with --peer: how long to wait for the peer's run (default {wait:g} s)")
    _update_arguments(s)
    s.add_argument("--host", default=None, help="with --update: the host (name or address) whose speed to set")

    v = sub.add_parser("serve", help="the peer `probe link` measures against (run it on the other host)")
    v.add_argument("--bind", required=True, metavar="tcp://ADDR:PORT", help="where to listen, e.g. tcp://0.0.0.0:5600 (port 0: any free port, printed)")
    v.add_argument("--curve", action="store_true", help="encrypt with CurveZMQ: makes a key pair and prints the public key for `link --curve-server-key`")
    v.add_argument("--idle-timeout", type=float, default=probe_link.IDLE_TIMEOUT_S, metavar="S", help=f"exit after this long without a message (default {probe_link.IDLE_TIMEOUT_S:g} s)")

    k = sub.add_parser("link", help="bandwidth and latency to a `probe serve` peer over ZeroMQ")
    k.add_argument("endpoint", metavar="tcp://ADDR:PORT", help="the peer's address and port")
    k.add_argument("--bytes", default="1MiB", metavar="SIZE", help="size of the bulk messages (default 1MiB; e.g. 256KiB, 4MiB)")
    k.add_argument("--window", type=int, default=probe_link.DEFAULT_WINDOW, metavar="N", help=f"bulk messages in flight before an acknowledgement (default {probe_link.DEFAULT_WINDOW})")
    k.add_argument("--seconds", type=float, default=probe_link.DEFAULT_SECONDS, metavar="S", help=f"duration of each direction's bulk transfer (default {probe_link.DEFAULT_SECONDS:g})")
    k.add_argument("--pings", type=int, default=probe_link.DEFAULT_PINGS, metavar="N", help=f"round trips of small messages (default {probe_link.DEFAULT_PINGS})")
    direction = k.add_mutually_exclusive_group()
    direction.add_argument("--upload-only", action="store_true", help="only this host -> peer")
    direction.add_argument("--download-only", action="store_true", help="only peer -> this host")
    k.add_argument("--connect-timeout", type=float, default=probe_link.CONNECT_TIMEOUT_S, metavar="S", help=f"how long to wait for the peer's first answer (default {probe_link.CONNECT_TIMEOUT_S:g})")
    k.add_argument("--timeout", type=float, default=probe_link.REPLY_TIMEOUT_S, metavar="S", help=f"how long to wait for any later answer (default {probe_link.REPLY_TIMEOUT_S:g})")
    k.add_argument(
        "--curve-server-key", default=None, metavar="KEY", help=f"the public key `probe serve --curve` printed {KEY_FORM}"
    )
    _update_arguments(k)
    which = k.add_mutually_exclusive_group()
    which.add_argument("--pair", default=None, metavar="A,B", help="with --update: the two hosts this link joins (names or addresses)")
    which.add_argument("--default", action="store_true", help="with --update: write the measurement as links.default")


def _update_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--update", type=Path, default=None, metavar="CLUSTER_YAML", help="write the measurement into this cluster file (the rest is kept)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the text report")


def run(args: argparse.Namespace) -> int:
    from pipeline.log import configure

    configure()
    return {"speed": _speed, "serve": _serve, "link": _link}[args.probe](args)


# ------------------------------------------------------------------ speed
def _speed(args: argparse.Namespace) -> int:
    from pipeline.probe.speed import DEFAULT_BATCH, REFERENCE_MODEL, SpeedConfig, checked_remote_config, measure_speed

    target = None
    if args.update is not None or args.host is not None:
        if args.update is None or args.host is None:
            raise UsageError("probe speed: --update CLUSTER_YAML and --host NAME go together (the file to write, and whose speed)")
        target = ClusterFile.load(args.update)
        target.host_index(args.host)  # an unknown host fails now, not after the run
    if args.baseline is not None:
        relative_speed(1.0, args.baseline)  # checks the value before the run
    config = SpeedConfig(model=args.model, batch=args.batch, seconds=args.seconds, threads=args.threads)
    lines: list[str] = []
    if args.peer is None:
        result = measure_speed(config)
        run = result.to_dict()
        where = "this host"
    else:
        if target is not None:
            _check_peer_is_host(target, args.peer, args.host)
        params = {"model": config.model, "batch": config.batch, "seconds": config.seconds, "threads": config.threads}
        checked_remote_config(params)  # the peer's bounds, checked before anything runs
        link_config = probe_link.LinkConfig(endpoint=args.peer, server_key=args.curve_server_key)
        peer_host, run = probe_link.remote_speed(link_config, params, args.peer_timeout)
        where = f"the peer {peer_host or '?'} at {args.peer}"
    sps = float(run["samples_per_s"])  # type: ignore[arg-type]
    if args.baseline is not None:
        speed = round_significant(relative_speed(sps, args.baseline))
    else:  # in the planner's units: the cost model's estimate over the measured time
        speed = round_significant(float(run.get("reference_speed") or 0.0))  # type: ignore[arg-type]
        if not speed > 0:
            raise UsageError(f"probe speed: the cost model has no estimate for {run['model']!r}; pass --baseline SAMPLES_PER_S of another host's run")
    same_run = [f"--model {args.model}"] if args.model != REFERENCE_MODEL else []
    same_run += [f"--batch {args.batch}"] if args.batch != DEFAULT_BATCH else []
    same_run += [f"--threads {args.threads}"] if args.threads is not None else []
    report: dict[str, Any] = {**run, "where": where, "baseline_samples_per_s": args.baseline, "speed": speed}
    lines = [
        f"speed: {run['model']}, batch {run['batch']}, compiled (tf.function), threads: {run['threads'] or 'TensorFlow default'}",
        *lines,
        _speed_line(where, run),
    ]
    if args.baseline is None:
        lines += [
            f"  speed {speed:g}: the cost model estimates {float(run['estimate_ms_per_sample']):.2f} ms a sample for this run on its "
            f"reference host (speed 1.0), this host took {1e3 / sps:.2f} ms",
            "  run the same probe on each host (or from here against a `pipeline probe serve` peer there):",
            f"    pipeline probe speed {' '.join(same_run + ['[--peer tcp://ADDR:PORT]'])} --update CLUSTER_YAML --host NAME",
            f"  (or relative to this host, which keeps proportions but not compute against links: --baseline {sps:.4g})",
        ]
    else:
        lines.append(f"  relative speed {speed:g} (the baseline's {args.baseline:.4g} samples/s is speed 1.0)")
    if target is not None:
        change = target.set_speed(args.host, speed)
        target.write()
        report["updated"] = change.describe()
        lines.append(f"  {args.update}: {change.describe()}")
    _emit(args, report, lines)
    return 0


def _speed_line(where: str, run: dict[str, Any]) -> str:
    return (
        f"  {where}, {run['cpus']} CPU{'s' if run['cpus'] != 1 else ''}: {run['samples_per_s']:.4g} samples/s over {run['calls']} calls "
        f"(median call {run['median_call_ms']:.1f} ms, p10-p90 {run['p10_call_ms']:.1f}-{run['p90_call_ms']:.1f} ms; "
        f"mean {run['mean_samples_per_s']:.4g} samples/s)"
    )


def _check_peer_is_host(target: ClusterFile, endpoint: str, host: str) -> None:
    """``--peer`` at a cluster host other than ``--host`` would write one host's speed as another's."""
    address, _ = probe_link.parse_endpoint(endpoint, bind=False, what="--peer")
    named = target.host_name(host)
    for h in target.cluster.hosts:
        if address in (h.name, h.address) and h.name != named:
            raise ClusterError(f"--host {host!r}: but --peer {endpoint} is host {h.name!r} ({h.address}) in {target.path}; expected the same host")


# ------------------------------------------------------------------ serve
def _serve(args: argparse.Namespace) -> int:
    if not args.idle_timeout > 0:
        raise UsageError(f"--idle-timeout: expected a positive number of seconds, received {args.idle_timeout}")
    peer = probe_link.Peer(probe_link.ServeConfig(bind=args.bind, curve=args.curve, idle_timeout_s=args.idle_timeout))
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        endpoint = peer.start()
        print(f"probe peer listening on {endpoint} (exits after {args.idle_timeout:g} s without traffic; Ctrl-C to stop)", flush=True)
        if peer.public_key is not None:
            key = peer.public_key.decode()
            print(f"CURVE public key: {key}", flush=True)
            print(f"on the other host: pipeline probe link tcp://THIS_HOST:{endpoint.rsplit(':', 1)[1]} --curve-server-key='{key}'", flush=True)
        why = peer.serve(stop)
        print(f"probe peer {why}: {peer.messages} messages, {peer.received_bytes} bytes in, {peer.sent_bytes} bytes out", flush=True)
    finally:
        peer.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


# ------------------------------------------------------------------ link
def _link(args: argparse.Namespace) -> int:
    target, pair = None, None
    host, _port = probe_link.parse_endpoint(args.endpoint, bind=False, what="ENDPOINT")
    if args.update is not None:
        target = ClusterFile.load(args.update)
        if args.pair is None and not args.default:
            raise UsageError("probe link --update: say which link to write: --pair A,B (the two hosts) or --default (links.default)")
        if args.pair is not None:
            pair = target.check_pair(parse_pair(args.pair))
            _check_peer_in_pair(target, host, pair, args.endpoint)
    elif args.pair is not None or args.default:
        raise UsageError("probe link: --pair and --default say where --update CLUSTER_YAML writes; pass --update too")
    config = probe_link.LinkConfig(
        endpoint=args.endpoint,
        message_bytes=parse_size(args.bytes),
        window=args.window,
        seconds=args.seconds,
        pings=args.pings,
        upload=not args.download_only,
        download=not args.upload_only,
        connect_timeout_s=args.connect_timeout,
        reply_timeout_s=args.timeout,
        server_key=args.curve_server_key,
    )
    if not (args.connect_timeout > 0 and args.timeout > 0):
        raise UsageError(f"--connect-timeout and --timeout: expected positive seconds, received {args.connect_timeout} and {args.timeout}")
    result = probe_link.measure_link(config)
    link = result.link()
    from pipeline.cluster import HOP_FLOOR_S, format_bandwidth, format_latency

    trips = result.round_trips
    report: dict[str, Any] = {
        "endpoint": result.endpoint,
        "peer_host": result.peer_host,
        "curve": result.curve,
        "message_bytes": result.message_bytes,
        "window": result.window,
        "round_trip_ms": {"p50": trips.median_s * 1e3, "min": trips.min_s * 1e3, "p90": trips.p90_s * 1e3, "count": len(trips.samples)},
        "upload_bps": result.upload.bits_per_s if result.upload else None,
        "download_bps": result.download.bits_per_s if result.download else None,
        "bandwidth": format_bandwidth(link.bandwidth_bps),
        "latency": format_latency(link.latency_s),
        "latency_ms": link.latency_s * 1e3,
    }
    lines = [
        f"link to {result.endpoint} (peer host {result.peer_host or '?'}, CURVE {'on' if result.curve else 'off'}): "
        f"{result.message_bytes:,}-byte messages, {result.window} in flight, {args.seconds:g} s each way",
        f"  round trip   p50 {trips.median_s * 1e3:.3f} ms, min {trips.min_s * 1e3:.3f} ms, p90 {trips.p90_s * 1e3:.3f} ms ({len(trips.samples)} pings)",
    ]
    for label, rate, arrow in (("upload", result.upload, "this host -> peer"), ("download", result.download, "peer -> this host")):
        if rate is not None:
            lines.append(
                f"  {label:<12} {rate.bits_per_s / 1e6:.1f} Mbit/s ({arrow}; {rate.nbytes:,} bytes in {rate.seconds:.2f} s after the warm-up)"
            )
    lines.append(
        f"  for the cluster file: bandwidth {format_bandwidth(link.bandwidth_bps)}"
        f"{' (the slower direction)' if result.upload and result.download else ''}, latency {link.latency_s * 1e3:.3g} ms "
        f"(one way: half the median round trip less the {HOP_FLOOR_S * 1e3:g} ms hop floor the planner adds to every hop)"
    )
    if target is not None:
        change = target.set_link(pair, link)
        target.write()
        report["updated"] = change.describe()
        lines.append(f"  {args.update}: {change.describe()}")
    _emit(args, report, lines)
    return 0


def _check_peer_in_pair(target: ClusterFile, host: str, pair: tuple[str, str], endpoint: str) -> None:
    """A peer address that is a cluster host outside the pair is almost surely a typo in one or the other."""
    for h in target.cluster.hosts:
        if host in (h.name, h.address) and h.name not in pair:
            raise ClusterError(
                f"--pair {pair[0]},{pair[1]}: but {endpoint} is host {h.name!r} ({h.address}) in {target.path}; "
                f"expected the peer to be one of the pair"
            )


def _emit(args: argparse.Namespace, report: dict[str, Any], lines: list[str]) -> None:
    if args.json:
        print(json.dumps(report), flush=True)
    else:
        print("\n".join(lines), flush=True)
    sys.stdout.flush()
