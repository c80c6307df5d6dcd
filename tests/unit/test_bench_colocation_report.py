"""The co-location bench's arithmetic and table, on made-up numbers (pure logic: nothing is served)."""

from __future__ import annotations

import math
from typing import Any

from pipeline.bench.colocation import best_of, paired_ratios, render, triton_configs


def _row(p50s: list[float], rates: list[float], rss_mb: float, **extra: Any) -> dict[str, Any]:
    runs = [{"p50_ms": p, "rate": r} for p, r in zip(p50s, rates)]
    return {
        "p50_ms": sorted(p50s)[len(p50s) // 2], "rate": sum(rates) / len(rates), "rss_bytes": rss_mb * 2**20,
        "processes": 2, "errors": {}, "runs": runs, **extra,
    }  # fmt: skip


def test_paired_ratios_compare_round_by_round_and_count_the_rounds_won() -> None:
    mine = [{"p50_ms": 30.0, "rate": 60.0}, {"p50_ms": 40.0, "rate": 50.0}, {"p50_ms": 20.0, "rate": 90.0}]
    theirs = [{"p50_ms": 33.0, "rate": 50.0}, {"p50_ms": 36.0, "rate": 55.0}, {"p50_ms": 25.0, "rate": 60.0}]
    r = paired_ratios(mine, theirs)
    assert r["rounds"] == 3 and r["p50_won"] == 2 and r["rate_won"] == 2
    assert math.isclose(r["p50"]["median"], 30 / 33) and math.isclose(r["p50"]["max"], 40 / 36) and math.isclose(r["p50"]["min"], 0.8)
    assert math.isclose(r["rate"]["median"], 1.2) and math.isclose(r["rate"]["max"], 1.5)
    assert paired_ratios([], [])["p50_won"] == 0


def test_tritons_best_is_its_best_configuration_per_measure_with_that_configurations_rounds() -> None:
    out = {
        "triton-1": _row([30.0, 34.0], [40.0, 42.0], 980, version="0.7.0") | {"errors": {"UNAVAILABLE": 1}},
        "triton-2": _row([36.0, 33.0], [55.0, 50.0], 990, version="0.7.0") | {"errors": {"UNAVAILABLE": 2, "INTERNAL": 1}},
    }
    best = best_of(out, ["triton-1", "triton-2"])
    assert best["errors"] == {"UNAVAILABLE": 3, "INTERNAL": 1}  # every error of either is counted
    assert best["p50_ms"] == min(out["triton-1"]["p50_ms"], out["triton-2"]["p50_ms"])
    assert best["rate"] == out["triton-2"]["rate"] and best["rss_bytes"] == 980 * 2**20
    # triton-1 has the lower p50 over its rounds (34 against 36 ms), triton-2 the higher rate: their own
    # rounds, not the better number of each round (which would be 30 and 33 ms)
    assert best["p50_of"] == "triton-1" and best["rate_of"] == "triton-2"
    assert best["runs"] == [{"p50_ms": 30.0, "rate": 55.0}, {"p50_ms": 34.0, "rate": 50.0}]
    assert best["of"] == ["triton-1", "triton-2"] and best["version"] == "0.7.0"
    assert triton_configs(None, 2) == [(1, 0), (1, 1000), (2, 0), (2, 1000)]
    assert triton_configs(None, 1) == [(1, 0), (1, 1000)] and triton_configs(3, 2) == [(3, 0), (3, 1000)]


def test_the_table_shows_every_configuration_the_ratios_and_the_rounds() -> None:
    c: dict[str, Any] = {
        "cpus": 2, "rounds": 2, "shards": 2, "overlap": [{"threads": 1, "inter_threads": 2, "work": 2.36}],
        "local": _row([25.0, 26.0], [80.0, 70.0], 740), "per-shard": _row([31.0, 30.0], [60.0, 62.0], 1400),
        "co-located": _row([28.0, 29.0], [66.0, 64.0], 850), "with-ingress": _row([27.0, 28.0], [70.0, 66.0], 760),
        "triton-1": _row([30.0, 34.0], [40.0, 42.0], 980, version="0.7.0", threads=1, queue_delay_us=0),
        "triton-2": _row([36.0, 33.0], [55.0, 50.0], 990, version="0.7.0", threads=2, queue_delay_us=1000),
    }  # fmt: skip
    c["triton"] = best_of(c, ["triton-1", "triton-2"])
    c["paired"] = {n: paired_ratios(c[n]["runs"], c["triton"]["runs"]) for n in ("local", "per-shard", "co-located", "with-ingress")}
    text = "\n".join(render(c))
    assert "2 interleaved round(s)" in text
    for label in ("Triton, 1 thread, delay 0 ms ", "Triton, 2 threads, delay 1 ms", "Triton's best of 2", "PyTriton 0.7.0", "pipeline, shards co-located"):
        assert label in text, text
    co = next(line for line in text.splitlines() if line.startswith("  pipeline, shards co-located"))
    # p50 x triton: 29 / 34 (the better of the two p50s); rate: 65 / 52.5; RSS: 850 / 980
    assert co.split()[-3:] == [f"{29 / 34:.2f}", f"{65 / 52.5:.2f}", f"{850 / 980:.2f}"], co
    ing = next(line for line in text.splitlines() if line.startswith("  pipeline, co-located with ingress"))
    assert ing.split()[-3:] == [f"{28 / 34:.2f}", f"{68 / 52.5:.2f}", f"{760 / 980:.2f}"], ing
    assert sum("pipeline, co-located with ingress" in line for line in text.splitlines()) == 2  # its row and its rounds
    assert "lower in 2" in text and "2.36 shards' worth" in text
    assert "p50 Triton, 1 thread, delay 0 ms, rate Triton, 2 threads, delay 1 ms" in text, text
    skipped = {k: v for k, v in c.items() if not k.startswith("triton") and k != "paired"} | {"triton": {"skipped": "not asked for (--no-triton)"}}
    text = "\n".join(render(skipped))
    assert "skipped: not asked for (--no-triton)" in text and "x triton" not in text
