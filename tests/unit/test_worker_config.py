"""The worker's configuration parsing (pure)."""

from __future__ import annotations

import pytest


def test_cpus_option_parses_lists_and_ranges() -> None:
    import os

    from pipeline.errors import UsageError
    from pipeline.serving.worker import parse_cpus

    first = min(os.sched_getaffinity(0))
    assert parse_cpus(str(first)) == (first,)
    assert parse_cpus(f"{first}-{first}") == (first,)
    with pytest.raises(UsageError, match="not available"):
        parse_cpus("4096")
    with pytest.raises(UsageError, match="expected a list"):
        parse_cpus("zero")
