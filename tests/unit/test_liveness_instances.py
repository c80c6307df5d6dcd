"""The ingress's liveness table with two instances of a shard (a rolling update): no restart storm."""

from __future__ import annotations

from pipeline.serving.pending import Liveness


def test_a_second_instance_on_another_host_waits_until_the_first_stops() -> None:
    live = Liveness(["a"], down_after_s=1.5)
    assert live.admit("a", "pod-1", 10, True, now=10) and not live.beat("a", True, 10, now=10)
    # the new pod loads, then is ready, beside the old one: its heartbeats are kept aside
    for t in (0.2, 0.7, 1.2):
        assert not live.admit("a", "pod-2", 20, t > 1.0, now=t + 10)
        assert live.admit("a", "pod-1", 10, True, now=t + 10.1) and not live.beat("a", True, 10, now=t + 10.1)
        assert live.pid_of("a") == 10 and live.is_up("a", now=t + 10.1)
    # the old pod says it is stopping: the ready standby is followed, no restart, still up
    assert live.admit("a", "pod-1", 10, False, now=11.4)
    assert not live.beat("a", False, 10, now=11.4)
    assert live.pid_of("a") == 20 and live.is_up("a", now=11.4)
    # the new one's heartbeats go on as the followed instance's; a straggler of the old one is kept aside
    assert live.admit("a", "pod-2", 20, True, now=11.7) and not live.beat("a", True, 20, now=11.7)
    assert not live.admit("a", "pod-1", 10, False, now=11.8)
    assert live.pid_of("a") == 20 and live.is_up("a", now=11.8)


def test_a_standby_that_is_not_ready_does_not_take_over() -> None:
    live = Liveness(["a"], down_after_s=1.5)
    live.admit("a", "pod-1", 10, True, now=10)
    live.beat("a", True, 10, now=10)
    assert not live.admit("a", "pod-2", 20, False, now=10.5)  # still loading
    assert live.admit("a", "pod-1", 10, False, now=10.6)
    live.beat("a", False, 10, now=10.6)
    assert live.pid_of("a") == 10 and not live.is_up("a", now=10.6)  # down: the ingress answers UNAVAILABLE


def test_once_the_followed_instance_is_gone_another_takes_over_as_a_restart() -> None:
    live = Liveness(["a"], down_after_s=1.5)
    live.admit("a", "pod-1", 10, True, now=10)
    live.beat("a", True, 10, now=10)
    assert live.admit("a", "pod-2", 20, True, now=12)  # pod-1 silent for longer than down_after_s
    assert live.beat("a", True, 20, now=12)  # a new pid: requests in flight on pod-1 were lost
    assert live.pid_of("a") == 20


def test_on_one_host_a_new_pid_is_a_restart_as_before() -> None:
    live = Liveness(["a"], down_after_s=1.5)
    assert live.admit("a", "host", 10, True, now=10) and not live.beat("a", True, 10, now=10)
    assert live.admit("a", "host", 11, False, now=10.5) and live.beat("a", False, 11, now=10.5)
    assert live.admit("a", "", 12, True, now=10.6) and live.beat("a", True, 12, now=10.6)  # no host named: as before
