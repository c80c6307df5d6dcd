"""`pipeline probe` as a user runs it: a real peer process, real sockets on 127.0.0.1, a real cluster file."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import keras
import yaml
import zmq

from pipeline import process
from pipeline.cluster import load_cluster, parse_bandwidth
from pipeline.launch import free_ports
from pipeline.probe.measure import round_significant
from tests.helpers_probe import ENV, probe, report, start_peer

CLUSTER = """\
version: 1
hosts:                         # two machines
- {name: edge, address: 127.0.0.1}
- {name: cloud, address: 198.18.0.2, speed: 4.0}
ingress: edge
links:
  default: {bandwidth: 1Gbit, latency: 0.1ms}   # a guess, until measured
"""


def test_link_measures_both_ways_and_writes_the_pair(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    peer, endpoint, _ = start_peer(tmp_path / "logs")
    try:
        r = report(probe("link", endpoint, "--seconds", "0.5", "--pings", "20", "--bytes", "256KiB", "--json", "--update", str(cluster), "--pair", "edge,cloud"))
        text = probe("link", endpoint, "--seconds", "0.3", "--pings", "5")
    finally:
        peer.stop()
    assert r["upload_bps"] > 0 and r["download_bps"] > 0 and r["round_trip_ms"]["count"] == 20
    assert parse_bandwidth(r["bandwidth"]) <= min(r["upload_bps"], r["download_bps"]) * 1.01
    link = load_cluster(cluster).link("edge", "cloud")
    assert link.bandwidth_bps == parse_bandwidth(r["bandwidth"])
    assert r["updated"].startswith("links.pairs[0] (edge-cloud): (absent) -> ")
    written = cluster.read_text()
    assert "# two machines" in written and "# a guess, until measured" in written  # the user's comments stay
    assert text.returncode == 0, text.stderr
    assert "round trip   p50" in text.stdout and "for the cluster file: bandwidth" in text.stdout


def test_curve_peer_needs_its_key(tmp_path: Path) -> None:
    peer, endpoint, key = start_peer(tmp_path / "logs", extra=["--curve"])
    try:
        assert len(key) == 40
        r = report(probe("link", endpoint, "--seconds", "0.3", "--pings", "5", "--json", f"--curve-server-key={key}"))
        plain = probe("link", endpoint, "--seconds", "0.3", "--connect-timeout", "1")
    finally:
        peer.stop()
    assert r["curve"] is True and r["upload_bps"] > 0
    assert plain.returncode != 0
    assert f"no probe peer answered at {endpoint} within 1 s" in plain.stderr and "--curve-server-key" in plain.stderr


def test_a_key_that_begins_with_a_dash_is_taken(tmp_path: Path) -> None:
    # Z85 keys may begin with "-" (1 in 85): written --curve-server-key=KEY, as the peer prints it, argparse takes it
    key = next(k for k in (zmq.curve_keypair()[0].decode() for _ in range(100_000)) if k.startswith("-"))
    r = probe("link", "tcp://127.0.0.1:9", f"--curve-server-key={key}", "--seconds", "0.2", "--connect-timeout", "0.5")
    assert r.returncode != 0 and "expected one argument" not in r.stderr, r.stderr
    assert "no probe peer answered at tcp://127.0.0.1:9 within 0.5 s" in r.stderr, r.stderr
    peer, _, printed = start_peer(tmp_path / "logs", extra=["--curve"])
    peer.stop()
    assert f"--curve-server-key='{printed}'" in peer.text(), peer.text()  # the line to copy works for any key


def test_unreachable_peer_and_bad_input_fail_with_a_clear_error(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    t0 = time.monotonic()
    r = probe("link", f"tcp://127.0.0.1:{port}", "--connect-timeout", "1")
    assert r.returncode != 0 and time.monotonic() - t0 < 30
    assert f"no probe peer answered at tcp://127.0.0.1:{port} within 1 s" in r.stderr, r.stderr
    bad = probe("link", f"127.0.0.1:{port}")  # no tcp:// scheme
    assert bad.returncode == 2 and "expected tcp://ADDRESS:PORT" in bad.stderr, bad.stderr
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    unknown = probe("link", f"tcp://127.0.0.1:{port}", "--update", str(cluster), "--pair", "edge,clod")
    assert unknown.returncode == 2 and "--pair 'clod': no such host" in unknown.stderr, unknown.stderr
    wrong_peer = probe("link", "tcp://198.18.0.2:5600", "--update", str(cluster), "--pair", "edge,edge")
    assert wrong_peer.returncode == 2 and "names host 'edge' twice" in wrong_peer.stderr
    missing = probe("link", f"tcp://127.0.0.1:{port}", "--update", str(cluster))
    assert missing.returncode == 2 and "--pair A,B" in missing.stderr and "--default" in missing.stderr
    assert cluster.read_text() == CLUSTER


def test_a_peer_that_dies_mid_run_ends_the_run_within_its_deadline(tmp_path: Path) -> None:
    peer, endpoint, _ = start_peer(tmp_path / "logs")
    try:
        client = subprocess.Popen(
            process.pipeline_command("probe", "link", endpoint, "--seconds", "30", "--timeout", "2", "--pings", "5"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
        )  # fmt: skip
        try:
            time.sleep(3.0)  # python started, round trips done, the upload running
            peer.kill()
            out, err = client.communicate(timeout=60)
        finally:
            client.kill()
            client.wait(10)
    finally:
        peer.stop()
    assert client.returncode == 1, out + err
    assert f"the probe peer at {endpoint} stopped answering: no reply for 2 s" in err, err


def test_speed_without_a_baseline_is_in_the_planners_units(tmp_path: Path) -> None:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((32, 32, 3), name="image")
    x = keras.layers.Conv2D(8, 3, activation="relu")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4)(x))
    path = tmp_path / "small.keras"
    model.save(path)
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER)
    r = report(probe("speed", "--model", str(path), "--seconds", "0.5", "--threads", "1", "--json", "--update", str(cluster), "--host", "edge"))
    assert r["samples_per_s"] > 0 and r["calls"] >= 5 and r["where"] == "this host" and r["baseline_samples_per_s"] is None
    # the cost model's seconds per sample over the measured ones: what the planner divides its estimates by
    assert r["estimate_ms_per_sample"] > 0
    assert r["speed"] == round_significant(r["estimate_ms_per_sample"] / 1e3 * r["samples_per_s"]), r
    assert r["updated"] == f"hosts[0].speed (edge): (absent) -> {r['speed']:g}"
    assert load_cluster(cluster).host("edge").speed == r["speed"]
    assert yaml.safe_load(cluster.read_text())["hosts"][1] == {"name": "cloud", "address": "198.18.0.2", "speed": 4.0}
    unknown = probe("speed", "--model", str(path), "--update", str(cluster), "--host", "nowhere")
    assert unknown.returncode == 2 and "--host 'nowhere': no such host" in unknown.stderr, unknown.stderr


def test_speed_on_a_peer_host_is_written_for_that_host(tmp_path: Path) -> None:
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(CLUSTER.replace("127.0.0.1", "198.18.0.1").replace("198.18.0.2", "127.0.0.1"))  # cloud is here
    peer, endpoint, key = start_peer(tmp_path / "logs", extra=["--curve"])
    try:
        r = report(probe("speed", "--peer", endpoint, f"--curve-server-key={key}", "--model", "mobilenet_v3_small", "--seconds", "0.5",
                         "--threads", "1", "--baseline", "1000", "--json", "--update", str(cluster), "--host", "cloud"))  # fmt: skip
        refused = probe("speed", "--peer", endpoint, f"--curve-server-key={key}", "--update", str(cluster), "--host", "edge")
    finally:
        peer.stop()
    assert r["where"].startswith("the peer ") and r["model"] == "mobilenet_v3_small" and r["calls"] >= 5
    assert r["speed"] == round_significant(r["samples_per_s"] / 1000)
    assert load_cluster(cluster).host("cloud").speed == r["speed"]
    assert refused.returncode == 2 and "--peer" in refused.stderr and "is host 'cloud'" in refused.stderr, refused.stderr
