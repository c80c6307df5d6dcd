"""The oracle: spread of reference outputs, the guard, the batching tolerance (pure numpy)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline import oracle


def _requests(outputs: np.ndarray, inputs: np.ndarray | None = None) -> tuple[list[dict], list[dict]]:
    inputs = np.arange(len(outputs), dtype=np.float32)[:, None] if inputs is None else inputs
    return [{"x": inputs[i : i + 1]} for i in range(len(outputs))], [{"y": outputs[i : i + 1]} for i in range(len(outputs))]


def test_spread_is_the_closest_pair_of_different_inputs() -> None:
    outs = np.array([[0.0, 1.0], [0.0, 1.5], [3.0, 1.0]])
    found = oracle.spread(*_requests(outs))
    assert found.rows == 3 and found.pairs == 3
    assert found.smallest == pytest.approx(0.5)
    assert found.median == pytest.approx(3.0)


def test_identical_inputs_are_compared_once() -> None:
    """A replay that cycles its inputs repeats answers; that is not input independence."""
    ins = np.array([[1.0], [2.0], [1.0]], dtype=np.float32)
    outs = np.array([[0.0], [5.0], [0.0]])
    found = oracle.spread(*_requests(outs, ins))
    assert found.rows == 2 and found.smallest == 5.0


def test_rows_of_a_batch_count_as_inputs() -> None:
    inputs = [{"x": np.array([[1.0], [2.0]], dtype=np.float32)}]
    outputs = [{"y": np.array([[7.0], [7.0]])}]
    assert oracle.spread(inputs, outputs).smallest == 0.0


def test_guard_refuses_a_model_that_answers_the_same() -> None:
    found = oracle.spread(*_requests(np.full((4, 3), 0.001)))
    with pytest.raises(oracle.NotDiscriminating, match="do not depend on the input"):
        oracle.require_discriminating(found, 0.0, what="test")
    warning = oracle.require_discriminating(found, 0.0, what="test", allow=True)
    assert warning and oracle.NOT_DISCRIMINATING in warning


def test_guard_refuses_a_tolerance_wider_than_the_spread() -> None:
    found = oracle.spread(*_requests(np.array([[0.0], [1e-6], [1.0]])))
    assert oracle.require_discriminating(found, 1e-7, what="test") is None
    with pytest.raises(oracle.NotDiscriminating, match="closest outputs of two different inputs differ by at most 1e-06"):
        oracle.require_discriminating(found, 1e-6, what="test")
    assert found.margin(1e-7) == pytest.approx(10.0)


def test_guard_needs_two_inputs() -> None:
    found = oracle.spread(*_requests(np.array([[1.0]])))
    with pytest.raises(oracle.NotDiscriminating, match="at least 2"):
        oracle.require_discriminating(found, 0.0, what="one request")


def test_nan_in_the_same_place_is_equal_elsewhere_infinite() -> None:
    outs = np.array([[np.nan, 1.0], [np.nan, 1.0], [2.0, 1.0]])
    found = oracle.spread(*_requests(outs))
    assert found.smallest == 0.0 and np.isinf(found.median)


def test_batching_tolerance_measures_the_batch_effect() -> None:
    """A fake model whose rows move by 1e-9 per extra row in the batch."""

    def call(x: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        v = x["x"].astype(np.float64)
        return {"y": v * 2 + 1e-9 * (len(v) - 1)}

    sample = {"x": np.arange(8, dtype=np.float64)[:, None]}
    tolerance, measured = oracle.batching_tolerance(call, sample)
    assert measured == pytest.approx(7e-9)
    assert tolerance == pytest.approx(7e-8)
    exact = oracle.batching_tolerance(lambda x: {"y": x["x"] * 2}, sample)
    assert exact == (0.0, 0.0)


def test_spread_examines_at_most_max_rows() -> None:
    outs = np.arange(600, dtype=np.float64)[:, None]
    found = oracle.spread(*_requests(outs), max_rows=50)
    assert found.rows == 50 and found.pairs == 50 * 49 // 2
