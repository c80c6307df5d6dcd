"""`pipeline probe`'s pure parts: the rate and latency arithmetic, sizes, endpoints, and writing a cluster file."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.cluster import HOP_FLOOR_S, Link, load_cluster
from pipeline.errors import ClusterError, UsageError
from pipeline.probe.link import LinkResult, parse_endpoint
from pipeline.probe.measure import (
    Delivery,
    Rate,
    RoundTrips,
    parse_size,
    percentile,
    relative_speed,
    round_significant,
    steady_rate,
)
from pipeline.probe.update import ClusterFile, parse_pair

CLUSTER = """\
version: 1
hosts:                       # the machines, in any order
- name: edge                 # where the cluster file is made
  address: 198.18.0.1
  speed: 1.0                 # the baseline
- {name: mid, address: 198.18.0.2}
- {name: cloud, address: 198.18.0.3, speed: 4.0}
ingress: edge                # clients connect here
links:                       # bits per second
  default: {bandwidth: 1Gbit, latency: 0.1ms}
  pairs:                     # overrides
  - {between: [cloud, edge], bandwidth: 100Mbit, latency: 5ms}
"""


# ------------------------------------------------------------------ arithmetic
def test_steady_rate_leaves_out_the_warm_up() -> None:
    # a slow start (one message in the first 0.5 s), then 1 MB every 0.1 s: 80 Mbit/s
    deliveries = [Delivery(0.5, 1_000_000)] + [Delivery(1.0 + 0.1 * i, 1_000_000) for i in range(20)]
    rate = steady_rate(deliveries, duration_s=3.0, warmup_fraction=0.2)
    assert rate.deliveries == 19
    assert rate.seconds == pytest.approx(1.9)
    assert rate.bits_per_s == pytest.approx(80e6)
    whole = steady_rate(deliveries, duration_s=3.0, warmup_fraction=0.0)
    assert whole.bits_per_s < rate.bits_per_s  # counting the ramp-up would understate the link


def test_steady_rate_counts_bytes_after_the_first_delivery_only() -> None:
    # the first delivery past the warm-up marks the start: its bytes were sent before it
    rate = steady_rate([Delivery(1.0, 500), Delivery(2.0, 1000), Delivery(3.0, 1000)], duration_s=1.0, warmup_fraction=0.5)
    assert (rate.nbytes, rate.seconds) == (2000, 2.0)


def test_steady_rate_with_too_few_deliveries_uses_the_whole_run() -> None:
    rate = steady_rate([Delivery(0.2, 1000), Delivery(2.0, 1000)], duration_s=3.0, warmup_fraction=0.2)
    assert (rate.nbytes, rate.seconds, rate.deliveries) == (2000, 2.0, 2)
    assert steady_rate([Delivery(0.5, 100)], 1.0).bits_per_s == pytest.approx(1600)
    with pytest.raises(ValueError, match="at least one delivery"):
        steady_rate([], 1.0)
    with pytest.raises(ValueError, match="warm-up fraction"):
        steady_rate([Delivery(1, 1)], 1.0, warmup_fraction=1.0)


def test_round_trips_and_one_way_latency() -> None:
    trips = RoundTrips((0.010, 0.011, 0.012, 0.030, 0.0105))
    assert trips.median_s == pytest.approx(0.011)
    assert trips.min_s == pytest.approx(0.010)
    assert trips.one_way_s(HOP_FLOOR_S) == pytest.approx(0.0055 - HOP_FLOOR_S)
    assert RoundTrips((0.0002, 0.0003)).one_way_s(HOP_FLOOR_S) == 0.0  # loopback: nothing beyond the hop floor
    assert percentile([1, 2, 3, 4], 50) == pytest.approx(2.5)
    assert percentile([5], 90) == 5


def test_link_result_takes_the_slower_direction_and_rounds() -> None:
    result = LinkResult(
        endpoint="tcp://198.18.0.2:5600",
        peer_host="h2",
        round_trips=RoundTrips((0.0104, 0.0106, 0.0105)),
        upload=Rate(nbytes=6_000_000, seconds=1.0, deliveries=6),  # 48 Mbit/s
        download=Rate(nbytes=6_123_456, seconds=1.0, deliveries=6),  # 48.99 Mbit/s
        message_bytes=1 << 20,
        window=4,
        curve=False,
    )
    assert result.bandwidth_bps == pytest.approx(48e6)
    link = result.link()
    assert link.bandwidth_bps == 48e6
    assert link.latency_s == pytest.approx(0.0051)  # 10.5 ms / 2 - 0.2 ms, two figures
    assert Link(48e6, 0.0051).to_dict() == {"bandwidth": "48Mbit", "latency": "5.1ms"}


def test_rounding_sizes_and_relative_speed() -> None:
    assert round_significant(47_634_221.0) == 47_600_000.0
    assert round_significant(2.1349) == 2.13
    assert round_significant(0.0) == 0.0
    assert parse_size("1MiB") == 1 << 20
    assert parse_size("256KiB") == 256 << 10
    assert parse_size("4MB") == 4_000_000
    assert parse_size("65536") == 65536
    for bad in ("1 parsec", "-1MiB", "0", "MiB"):
        with pytest.raises(UsageError, match="--bytes"):
            parse_size(bad)
    assert relative_speed(82.0, 41.0) == 2.0
    with pytest.raises(UsageError, match="--baseline"):
        relative_speed(82.0, 0.0)


@pytest.mark.parametrize(
    ("text", "bind", "expected"),
    [
        ("tcp://198.18.0.2:5600", False, ("198.18.0.2", 5600)),
        ("tcp://cloud.example:5600", False, ("cloud.example", 5600)),
        ("tcp://[::1]:5600", False, ("[::1]", 5600)),
        ("tcp://0.0.0.0:0", True, ("0.0.0.0", 0)),
        ("tcp://*:5600", True, ("*", 5600)),
    ],
)
def test_endpoints(text: str, bind: bool, expected: tuple[str, int]) -> None:
    assert parse_endpoint(text, bind=bind, what="x") == expected


@pytest.mark.parametrize(
    ("text", "bind", "match"),
    [
        ("198.18.0.2:5600", False, "expected tcp://ADDRESS:PORT"),
        ("tcp://198.18.0.2", False, "expected tcp://ADDRESS:PORT"),
        ("tcp://198.18.0.2:0", False, "port in 1..65535"),
        ("tcp://198.18.0.2:70000", True, "port in 0..65535"),
        ("tcp://0.0.0.0:5600", False, "bind-all address"),
        ("tcp://bad_name!:5600", False, "neither an IP address nor a host name"),
    ],
)
def test_bad_endpoints(text: str, bind: bool, match: str) -> None:
    with pytest.raises(UsageError, match=match):
        parse_endpoint(text, bind=bind, what="ENDPOINT")


# ------------------------------------------------------------------ the cluster file
@pytest.fixture
def cluster_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(CLUSTER)
    return path


def test_set_speed_keeps_comments_order_and_style(cluster_file: Path) -> None:
    f = ClusterFile.load(cluster_file)
    change = f.set_speed("mid", 2.13)
    assert change.describe() == "hosts[1].speed (mid): (absent) -> 2.13"
    f.set_speed("198.18.0.3", 3.5)  # by address too
    cluster = f.write()
    assert [h.speed for h in cluster.hosts] == [1.0, 2.13, 3.5]
    text = cluster_file.read_text()
    expected = (
        CLUSTER.replace("{name: mid, address: 198.18.0.2}", "{name: mid, address: 198.18.0.2, speed: 2.13}")
        .replace("{name: cloud, address: 198.18.0.3, speed: 4.0}", "{name: cloud, address: 198.18.0.3, speed: 3.5}")
    )
    assert text == expected  # nothing else moved: comments, order and flow style are the user's


def test_set_link_replaces_a_pair_in_either_order(cluster_file: Path) -> None:
    f = ClusterFile.load(cluster_file)
    change = f.set_link(("edge", "cloud"), Link(47.6e6, 0.0003))
    assert change.describe() == "links.pairs[0] (edge-cloud): 100Mbit, 5ms -> 47.6Mbit, 300us"
    cluster = f.write()
    assert len(cluster.pairs) == 1
    assert cluster.link("cloud", "edge") == Link(47.6e6, 0.0003)
    assert "- {between: [cloud, edge], bandwidth: 47.6Mbit, latency: 300us}" in cluster_file.read_text()


def test_set_link_adds_a_pair_and_sets_the_default(cluster_file: Path) -> None:
    f = ClusterFile.load(cluster_file)
    assert f.set_link(("198.18.0.1", "mid"), Link(1.9e9, 0.0)).field == "links.pairs[1] (edge-mid)"
    assert f.set_link(None, Link(940e6, 0.00005)).describe() == "links.default: 1Gbit, 0.1ms -> 940Mbit, 50us"
    f.write()
    cluster = load_cluster(cluster_file)
    assert cluster.link("mid", "edge") == Link(1.9e9, 0.0)
    assert cluster.default_link == Link(940e6, 0.00005)
    assert cluster.link("mid", "cloud") == Link(940e6, 0.00005)  # no pair: the default
    assert "  - {between: [edge, mid], bandwidth: 1.9Gbit, latency: 0ms}" in cluster_file.read_text()


def test_a_file_without_pairs_gets_them(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("version: 1\nhosts:\n- {name: a, address: 10.0.0.1}\n- {name: b, address: 10.0.0.2}\ningress: a\nlinks:\n  default: {bandwidth: 1Gbit}\n")
    f = ClusterFile.load(path)
    f.set_link(("a", "b"), Link(95e6, 0.001))
    assert f.write().link("a", "b") == Link(95e6, 0.001)
    assert yaml.safe_load(path.read_text())["links"]["pairs"] == [{"between": ["a", "b"], "bandwidth": "95Mbit", "latency": "1ms"}]


def test_unknown_hosts_and_bad_pairs_name_the_flag_and_the_hosts(cluster_file: Path) -> None:
    f = ClusterFile.load(cluster_file)
    with pytest.raises(ClusterError, match=r"--host 'clod': no such host in .*cluster.yaml; its hosts are \['edge \(198.18.0.1\)', 'mid"):
        f.set_speed("clod", 2.0)
    with pytest.raises(ClusterError, match=r"--pair 'edg': no such host"):
        f.set_link(("edg", "mid"), Link(1e6))
    with pytest.raises(ClusterError, match="names host 'edge' twice"):
        f.set_link(("edge", "198.18.0.1"), Link(1e6))
    for bad in ("edge", "edge,", "a,b,c"):
        with pytest.raises(UsageError, match="--pair: expected two host names"):
            parse_pair(bad)
    assert cluster_file.read_text() == CLUSTER


def test_a_bad_file_is_refused_before_anything_is_measured(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(CLUSTER.replace("bandwidth: 1Gbit", "bandwidth: 1000"))
    with pytest.raises(ClusterError, match=r"links.default.bandwidth: 1000 has no unit"):
        ClusterFile.load(path)
    with pytest.raises(ClusterError, match="does not exist"):
        ClusterFile.load(tmp_path / "missing.yaml")


def test_an_update_that_would_break_the_file_leaves_it_unchanged(cluster_file: Path) -> None:
    f = ClusterFile.load(cluster_file)
    f.doc["hosts"][1]["speed"] = -1.0  # as a bad measurement would (set_speed itself refuses it)
    with pytest.raises(ClusterError, match="left unchanged.*hosts\\[1\\].speed"):
        f.write()
    assert cluster_file.read_text() == CLUSTER
    with pytest.raises(UsageError, match="above zero"):
        f.set_speed("mid", 0.0)
    assert [p.name for p in cluster_file.parent.iterdir()] == ["cluster.yaml"]  # no temporary file left


def test_a_peer_runs_only_bounded_speed_requests_by_model_name() -> None:
    from pipeline.probe.speed import SpeedConfig, checked_remote_config

    assert checked_remote_config({"model": "mobilenet_v3_large", "batch": 8, "seconds": 5.0, "threads": None}) == SpeedConfig()
    assert checked_remote_config({"model": "ResNet50", "batch": 1, "seconds": 1, "threads": 2}).threads == 2
    for params, match in (
        ({"model": "/etc/passwd.keras"}, "only keras.applications models by name"),
        ({"model": "../x"}, "only keras.applications models by name"),
        ({"batch": 0}, "--batch 0"),
        ({"batch": 8.5}, "--batch 8.5"),
        ({"seconds": 3600}, "at most 60 s"),
        ({"threads": 0}, "--threads 0"),
    ):
        with pytest.raises(UsageError, match=match):
            checked_remote_config(params)
