"""The namespace fixture itself: hosts reach each other over the bridge, links go down and up, shaping applies, nothing is left."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.netns import BASE_PREFIX, Network, NetnsError, Shaping, echo, namespaces, remove_leftovers


def test_hosts_reach_each_other_and_only_each_other(make_network) -> None:  # type: ignore[no-untyped-def]
    net = make_network(3)
    assert [h.address for h in net.hosts] == ["198.18.0.1", "198.18.0.2", "198.18.0.3"]
    for server, client in (("h2", "h1"), ("h3", "h2"), ("h1", "h3")):
        ok, _, out = echo(net, server, client, 20001)
        assert ok, out
    # loopback is up inside each host, and no route leads out of the bridge
    lo = net.run("h1", [sys.executable, "-c", "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print('ok')"])
    assert lo.stdout.strip() == "ok", lo.stderr
    routes = net.run("h1", ["ip", "route", "show"]).stdout
    assert "default" not in routes and "198.18.0.0/24" in routes, routes


def test_a_link_down_cuts_the_host_off_until_it_is_up_again(make_network) -> None:  # type: ignore[no-untyped-def]
    net = make_network(2)
    net.link_down("h2")
    ok, _, out = echo(net, "h2", "h1", 20002, timeout_s=1.0)
    assert not ok, f"echo got through a link that is down: {out}"
    net.link_up("h2")
    ok, _, out = echo(net, "h2", "h1", 20003, timeout_s=10.0)
    assert ok, out


def test_shaping_is_applied_both_ways_and_removed(make_network) -> None:  # type: ignore[no-untyped-def]
    net = make_network(2)
    net.shape("h1", Shaping("100mbit"))
    assert "tbf" in net.qdisc("h1") and "100Mbit" in net.qdisc("h1"), net.qdisc("h1")
    port = subprocess.run(
        ["ip", "netns", "exec", net.bridge_ns, "tc", "qdisc", "show", "dev", "v1"], capture_output=True, text=True, timeout=20
    ).stdout
    assert "tbf" in port, port
    ok, _, out = echo(net, "h2", "h1", 20004, nbytes=1 << 20, timeout_s=20.0)  # data still flows (speed: tests/netns.py --bench)
    assert ok, out
    net.unshape("h1")
    assert "tbf" not in net.qdisc("h1")
    with pytest.raises(ValueError, match="expected a rate like"):
        Shaping("100 megabits").tbf()


def test_teardown_leaves_no_namespace_even_after_a_failure() -> None:
    from tests.multihost.conftest import netns_reason

    reason = netns_reason()
    if reason:
        pytest.skip(reason)
    net = Network(2)
    with pytest.raises(RuntimeError, match="boom"):
        with net:
            assert len([n for n in namespaces() if n.startswith(net.prefix)]) == 3  # the bridge and two hosts
            raise RuntimeError("boom")
    assert not [n for n in namespaces() if n.startswith(net.prefix)]
    # a network that fails half-way is removed too
    bad = Network(2)
    subprocess.run(["ip", "netns", "add", bad.prefix + "h2"], check=True, timeout=20)  # h2 exists already: create fails
    try:
        with pytest.raises(NetnsError):
            bad.create()
        assert bad.leftovers() == [bad.prefix + "h2"]  # only the one it did not make
    finally:
        subprocess.run(["ip", "netns", "del", bad.prefix + "h2"], timeout=20)


def test_leftovers_of_a_dead_run_are_removed_and_a_live_run_is_kept() -> None:
    from tests.multihost.conftest import netns_reason

    reason = netns_reason()
    if reason:
        pytest.skip(reason)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    stale = f"{BASE_PREFIX}{dead.pid}-1-h1"
    with Network(1) as live:
        subprocess.run(["ip", "netns", "add", stale], check=True, timeout=20)
        removed = remove_leftovers()
        assert stale in removed and stale not in namespaces()
        assert live.leftovers(), "the live run's namespaces were removed"


def test_without_root_or_iproute2_the_reason_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.netns as netns

    monkeypatch.setattr(netns.os, "geteuid", lambda: 1000)
    assert netns.unavailable_reason() == "network namespaces need root (euid 1000)"
    monkeypatch.setattr(netns.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netns.shutil, "which", lambda tool: None if tool == "tc" else "/usr/sbin/ip")
    assert netns.unavailable_reason() == "'tc' (iproute2) is not installed"
