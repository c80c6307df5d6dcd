"""The serving processes' GIL switch interval (pipeline.gil): default, override, clear errors."""

from __future__ import annotations

import sys

import pytest

from pipeline import cli, gil


def test_the_default_is_a_tenth_of_a_millisecond_and_the_environment_overrides_it() -> None:
    assert gil.interval_s({}) == pytest.approx(0.0001)
    assert gil.interval_s({gil.ENV: " 0.5 "}) == pytest.approx(0.0005)
    before = sys.getswitchinterval()
    try:
        assert gil.configure({gil.ENV: "2"}) == pytest.approx(0.002)
        assert sys.getswitchinterval() == pytest.approx(0.002)
    finally:
        sys.setswitchinterval(before)


@pytest.mark.parametrize("raw", ["0", "-1", "fast", "nan"])
def test_a_bad_interval_names_the_variable_and_what_it_expects(raw: str) -> None:
    with pytest.raises(ValueError, match=rf"PIPELINE_SWITCH_INTERVAL_MS={raw!r}: expected a positive number of milliseconds"):
        gil.interval_s({gil.ENV: raw})


def test_a_serving_command_with_a_bad_interval_stops_before_it_starts(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(gil.ENV, "soon")
    before = sys.getswitchinterval()
    assert cli.main(["worker", "/nowhere", "--shard", "s"]) == 2
    assert "pipeline worker: error: PIPELINE_SWITCH_INTERVAL_MS='soon'" in capsys.readouterr().err
    assert sys.getswitchinterval() == before
