"""`pipeline probe link` between two namespace hosts: a link shaped with `tc tbf` is measured at its rate.

The shaping dominates the figure (a 50 Mbit/s token bucket, far below what
the machine moves between namespaces), so the band asserted is about the
probe's arithmetic (acknowledged bytes over steady-state time), not about how
fast this machine is.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cluster import load_cluster, parse_bandwidth
from tests.helpers_probe import probe, report, start_peer
from tests.netns import Shaping

RATE = "50mbit"
RATE_BPS = 50e6
#: what the probe may read for a link shaped to RATE: tbf counts packet headers the payload does not
#: carry (about 5 % at 1500-byte frames), and the bucket lets a little more through at the start.
BAND = (0.6, 1.1)


def test_a_shaped_link_is_measured_at_its_rate(make_network, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    net = make_network(2)
    h1, h2 = net.host("h1"), net.host("h2")
    cluster = tmp_path / "cluster.yaml"
    cluster.write_text(
        f"version: 1\nhosts:\n- {{name: h1, address: {h1.address}}}\n- {{name: h2, address: {h2.address}}}\n"
        "ingress: h1\nlinks:\n  default: {bandwidth: 1Gbit, latency: 0.1ms}\n"
    )
    peer, bound, _ = start_peer(tmp_path / "logs", "tcp://0.0.0.0:0", netns=h2.netns)
    endpoint = f"tcp://{h2.address}:{bound.rsplit(':', 1)[1]}"
    args = ["link", endpoint, "--bytes", "256KiB", "--pings", "20", "--json", "--timeout", "20"]
    try:
        unshaped = report(probe(*args, "--seconds", "0.5", netns=h1.netns))
        net.shape("h1", Shaping(RATE))  # both ways: what h1 sends and what it receives
        shaped = report(probe(*args, "--seconds", "1.5", "--update", str(cluster), "--pair", "h1,h2", netns=h1.netns))
    finally:
        peer.stop()
    print(
        f"\nprobe over namespaces: unshaped up {unshaped['upload_bps'] / 1e6:.0f} / down {unshaped['download_bps'] / 1e6:.0f} Mbit/s; "
        f"shaped to {RATE}: up {shaped['upload_bps'] / 1e6:.1f} / down {shaped['download_bps'] / 1e6:.1f} Mbit/s, "
        f"round trip p50 {shaped['round_trip_ms']['p50']:.3f} ms; written {shaped['updated']}"
    )
    for direction in ("upload_bps", "download_bps"):
        ratio = shaped[direction] / RATE_BPS
        assert BAND[0] <= ratio <= BAND[1], f"{direction}: {shaped[direction] / 1e6:.1f} Mbit/s on a link shaped to {RATE}"
        assert unshaped[direction] > 3 * shaped[direction], f"{direction}: unshaped {unshaped[direction] / 1e6:.0f} Mbit/s"
    link = load_cluster(cluster).link("h1", "h2")
    assert link.bandwidth_bps == parse_bandwidth(shaped["bandwidth"])
    assert BAND[0] * RATE_BPS <= link.bandwidth_bps <= BAND[1] * RATE_BPS
