"""The namespace hosts for tests: the one implementation lives in :mod:`pipeline.netns` (the benchmark uses it too).

Run ``python -m pipeline.netns --bench`` (as root) to measure what shaping does to a TCP stream.
"""

from __future__ import annotations

from pipeline.netns import (  # noqa: F401  (re-exported for the tests)
    BASE_PREFIX,
    SUBNET,
    Host,
    NetnsError,
    Network,
    Shaping,
    bench,
    echo,
    namespaces,
    remove_leftovers,
    unavailable_reason,
)
