"""Multi-host tests: hosts are network namespaces (tests/netns.py); they need root and iproute2, or they skip."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import pytest

from tests.netns import Network, remove_leftovers, unavailable_reason

_REASON: list[str | None] = []


def netns_reason() -> str | None:
    """Why namespaces cannot be made here (checked once per run)."""
    if not _REASON:
        _REASON.append(unavailable_reason())
        if _REASON[0]:
            print(f"\nmultihost tests skipped: {_REASON[0]}", file=sys.stderr)
    return _REASON[0]


@pytest.fixture(scope="session", autouse=True)
def _leftovers() -> None:
    """Namespaces of earlier runs that crashed are removed before any test makes its own."""
    if netns_reason() is None:
        remove_leftovers()


@pytest.fixture
def make_network() -> Iterator[Callable[[int], Network]]:
    """``make_network(n)``: n hosts on an isolated bridge, removed after the test whatever happens."""
    reason = netns_reason()
    if reason:
        pytest.skip(reason)
    made: list[Network] = []

    def make(count: int) -> Network:
        net = Network(count)
        made.append(net)  # before create: a half-made network is removed too
        return net.create()

    try:
        yield make
    finally:
        left = [name for net in made for name in net.destroy()]
        assert not left, f"namespaces left after the test: {left}"
