"""The cluster file: what it means, and a clear error naming the field for every bad input (pure logic)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pipeline.cluster import (
    LOOPBACK,
    Cluster,
    cluster_from_dict,
    load_cluster,
    parse_bandwidth,
    parse_latency,
)
from pipeline.errors import ClusterError, UsageError


def _good() -> dict[str, Any]:
    return {
        "version": 1,
        "hosts": [
            {"name": "edge", "address": "198.18.0.1", "speed": 1.0},
            {"name": "cloud", "address": "198.18.0.2", "speed": 4.0},
        ],
        "ingress": "edge",
        "links": {
            "default": {"bandwidth": "1Gbit", "latency": "0.1ms"},
            "pairs": [{"between": ["edge", "cloud"], "bandwidth": "100Mbit", "latency": "5ms"}],
        },
    }


def _error(data: Any) -> str:
    with pytest.raises(ClusterError) as info:
        cluster_from_dict(data, source="cluster.yaml")
    return info.value.message


def test_the_design_example_reads_as_written() -> None:
    c = cluster_from_dict(_good())
    assert isinstance(c, Cluster)
    assert c.names == ["edge", "cloud"] and c.ingress == "edge"
    assert c.host("cloud").speed == 4.0 and c.host("edge").speed == 1.0
    assert c.host("198.18.0.2").name == "cloud"  # by address too
    link = c.link("cloud", "edge")  # either direction
    assert link.bandwidth_bps == 100e6 and link.latency_s == pytest.approx(5e-3)
    assert c.link("edge", "edge") is LOOPBACK
    # 100 Mbit/s moves 12.5 MB/s: 125,000 bytes take 10 ms, plus the floor and the latency for a hop
    assert link.transfer_s(125_000) == pytest.approx(0.010)
    assert link.hop_s(125_000) == pytest.approx(0.010 + 0.005 + 0.0002)


def test_round_trip_through_to_dict() -> None:
    c = cluster_from_dict(_good())
    again = cluster_from_dict(c.to_dict())
    assert again.hosts == c.hosts and again.default_link == c.default_link and again.pairs == c.pairs


def test_defaults_speed_latency_and_no_pairs() -> None:
    data = _good()
    del data["hosts"][0]["speed"]
    data["links"] = {"default": {"bandwidth": "10Gbit"}}
    c = cluster_from_dict(data)
    assert c.host("edge").speed == 1.0
    assert c.link("edge", "cloud").bandwidth_bps == 10e9 and c.link("edge", "cloud").latency_s == 0.0


@pytest.mark.parametrize(
    ("text", "bps"),
    [("100Mbit", 100e6), ("1Gbit", 1e9), ("10Gbit", 10e9), ("512kbit", 512e3), ("800bit", 800.0), ("2.5gbit", 2.5e9), ("1 Tbit", 1e12)],
)
def test_bandwidth_units(text: str, bps: float) -> None:
    assert parse_bandwidth(text) == pytest.approx(bps)


@pytest.mark.parametrize(("text", "seconds"), [("5ms", 5e-3), ("0.1ms", 1e-4), ("200us", 2e-4), ("1s", 1.0), ("0", 0.0), (0, 0.0), ("50µs", 5e-5)])
def test_latency_units(text: Any, seconds: float) -> None:
    assert parse_latency(text) == pytest.approx(seconds)


def test_unknown_host_in_a_pair_names_the_field_and_the_hosts() -> None:
    data = _good()
    data["links"]["pairs"][0]["between"] = ["edge", "clod"]
    msg = _error(data)
    assert msg == "cluster.yaml: links.pairs[0].between: unknown host 'clod'; the hosts are ['edge', 'cloud']"


def test_unknown_ingress_host() -> None:
    data = _good()
    data["ingress"] = "gateway"
    assert _error(data) == "cluster.yaml: ingress: unknown host 'gateway'; the hosts are ['edge', 'cloud']"


def test_missing_ingress() -> None:
    data = _good()
    del data["ingress"]
    assert "ingress: missing" in _error(data)


def test_duplicate_names_and_addresses() -> None:
    data = _good()
    data["hosts"][1]["name"] = "edge"
    assert _error(data) == "cluster.yaml: hosts[1].name: 'edge' is also the name of hosts[0]; host names must be unique"
    data = _good()
    data["hosts"][1]["address"] = "198.18.0.1"
    msg = _error(data)
    assert msg.startswith("cluster.yaml: hosts[1].address: '198.18.0.1' is also the address of hosts[0]")


@pytest.mark.parametrize("value", ["100", 100, "100 "])
def test_bandwidth_without_a_unit(value: Any) -> None:
    data = _good()
    data["links"]["default"]["bandwidth"] = value
    msg = _error(data)
    assert msg.startswith("cluster.yaml: links.default.bandwidth: ") and "has no unit" in msg and "Mbit" in msg


@pytest.mark.parametrize(("value", "hint"), [("100MBps", "bits per second"), ("100furlongs", "expected one of"), ("1MB", "bits per second")])
def test_bandwidth_with_an_unknown_unit(value: str, hint: str) -> None:
    data = _good()
    data["links"]["pairs"][0]["bandwidth"] = value
    msg = _error(data)
    assert msg.startswith("cluster.yaml: links.pairs[0].bandwidth: unknown unit") and hint in msg


@pytest.mark.parametrize("value", ["0Mbit", "-5Mbit", "fast"])
def test_zero_negative_or_garbage_bandwidth(value: str) -> None:
    data = _good()
    data["links"]["default"]["bandwidth"] = value
    assert _error(data).startswith("cluster.yaml: links.default.bandwidth: expected")


@pytest.mark.parametrize("value", [0, -1.0, "fast", True, float("inf")])
def test_zero_negative_or_garbage_speed(value: Any) -> None:
    data = _good()
    data["hosts"][1]["speed"] = value
    msg = _error(data)
    assert msg.startswith("cluster.yaml: hosts[1].speed: expected a positive number") and repr(value) in msg


@pytest.mark.parametrize(("value", "fragment"), [("5", "has no unit"), (5, "has no unit"), ("5 parsecs", "unknown unit"), ("-1ms", "zero or more")])
def test_bad_latency(value: Any, fragment: str) -> None:
    data = _good()
    data["links"]["pairs"][0]["latency"] = value
    msg = _error(data)
    assert msg.startswith("cluster.yaml: links.pairs[0].latency: ") and fragment in msg


def test_missing_default_link() -> None:
    data = _good()
    del data["links"]["default"]
    assert _error(data).startswith("cluster.yaml: links.default: missing")
    data = _good()
    del data["links"]
    assert _error(data).startswith("cluster.yaml: links: expected a mapping with a default link")


def test_missing_bandwidth_in_a_link() -> None:
    data = _good()
    data["links"]["default"] = {"latency": "1ms"}
    assert _error(data).startswith("cluster.yaml: links.default.bandwidth: missing")


@pytest.mark.parametrize("version", [2, "1", None, True])
def test_wrong_version(version: Any) -> None:
    data = _good()
    data["version"] = version
    assert _error(data).startswith("cluster.yaml: version: expected 1, received")


def test_missing_version() -> None:
    data = _good()
    del data["version"]
    assert _error(data) == "cluster.yaml: version: missing; expected version: 1"


def test_a_pair_must_join_two_different_hosts_once() -> None:
    data = _good()
    data["links"]["pairs"][0]["between"] = ["edge", "edge"]
    assert "names host 'edge' twice" in _error(data)
    data = _good()
    data["links"]["pairs"].append({"between": ["cloud", "edge"], "bandwidth": "1Gbit"})
    assert _error(data).startswith("cluster.yaml: links.pairs[1].between: the link between 'cloud' and 'edge' is already set by links.pairs[0]")
    data = _good()
    data["links"]["pairs"][0]["between"] = ["edge"]
    assert _error(data).startswith("cluster.yaml: links.pairs[0].between: expected a list of two host names")


def test_unknown_fields_are_named() -> None:
    data = _good()
    data["hosts"][0]["cores"] = 4
    assert _error(data).startswith("cluster.yaml: hosts[0].cores: unknown field")
    data = _good()
    data["link"] = {}
    assert _error(data).startswith("cluster.yaml: link: unknown field")
    data = _good()
    data["links"]["default"]["jitter"] = "1ms"
    assert _error(data).startswith("cluster.yaml: links.default.jitter: unknown field")


def test_hosts_must_be_a_non_empty_list_with_names_and_addresses() -> None:
    data = _good()
    data["hosts"] = []
    assert _error(data).startswith("cluster.yaml: hosts: expected a non-empty list")
    data = _good()
    data["hosts"][0]["name"] = "edge box"
    assert _error(data).startswith("cluster.yaml: hosts[0].name: expected a name")
    data = _good()
    del data["hosts"][1]["address"]
    assert _error(data).startswith("cluster.yaml: hosts[1].address: expected the IP address or DNS name")
    data = _good()
    data["hosts"][1]["address"] = "not an address!"
    assert _error(data).startswith("cluster.yaml: hosts[1].address:")
    assert _error(["edge"]).startswith("cluster.yaml: expected a mapping")


def test_load_from_a_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "lab.yaml"
    path.write_text("version: 1\nhosts: [{name: a, address: 10.0.0.1}]\ningress: b\nlinks: {default: {bandwidth: 1Gbit}}\n")
    with pytest.raises(ClusterError, match=r"^lab.yaml: ingress: unknown host 'b'; the hosts are \['a'\]$"):
        load_cluster(path)
    with pytest.raises(ClusterError, match="does not exist"):
        load_cluster(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("hosts: [\n")
    with pytest.raises(ClusterError, match="not valid YAML"):
        load_cluster(tmp_path / "bad.yaml")


def test_cluster_error_is_a_usage_error() -> None:
    assert issubclass(ClusterError, UsageError)


def test_unknown_host_lookup_lists_the_hosts() -> None:
    c = cluster_from_dict(_good())
    with pytest.raises(ClusterError, match=r"unknown host 'moon'; the hosts are \['edge', 'cloud'\]"):
        c.host("moon")
