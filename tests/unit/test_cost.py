"""The cost model's batch dependence (pure arithmetic on OpCost, no TensorFlow)."""

from __future__ import annotations

import math

import pytest

from pipeline.partition.cost import RATES_BATCH_1, RATES_BATCH_8, OpCost


def test_the_two_fits_are_the_ends_of_the_interpolation() -> None:
    c = OpCost(flops=2e6, activation_bytes=3e5, weight_bytes=1e5, params=25_000)
    assert c.seconds(1) == pytest.approx(c.call_seconds(1, RATES_BATCH_1))
    assert c.seconds(8) == pytest.approx(c.call_seconds(8, RATES_BATCH_8) / 8)
    assert c.seconds(64) == pytest.approx(c.seconds(8))  # beyond the fit: the batch-8 estimate
    assert c.seconds(0) == pytest.approx(c.seconds(1))
    # in between, on log2 of the batch: batch 2 is a third of the way, batch 4 two thirds
    for batch, w in [(2, 1 / 3), (4, 2 / 3)]:
        assert c.seconds(batch) == pytest.approx(c.seconds(1) + (c.seconds(8) - c.seconds(1)) * w)
    assert math.isclose(c.call_seconds(3, RATES_BATCH_1) - c.call_seconds(2, RATES_BATCH_1), c.call_seconds(2, RATES_BATCH_1) - c.call_seconds(1, RATES_BATCH_1))


def test_weights_amortise_over_a_batch_and_activations_do_not() -> None:
    # the reason plans move under batching: a weight-bound late layer gets much cheaper per sample,
    # an activation-bound early layer does not
    head = OpCost(flops=2 * 1280 * 1000, activation_bytes=4 * (1280 + 1000), weight_bytes=4 * 1280 * 1000, params=1_281_000)
    stem = OpCost(flops=112 * 112 * 16 * 2, activation_bytes=4 * 2 * 112 * 112 * 16, weight_bytes=0.0, params=0)
    assert head.seconds(8) < 0.5 * head.seconds(1)
    assert stem.seconds(8) >= 0.9 * stem.seconds(1)
    shares_1 = stem.seconds(1) / (stem.seconds(1) + head.seconds(1))
    shares_8 = stem.seconds(8) / (stem.seconds(8) + head.seconds(8))
    assert shares_8 > shares_1
