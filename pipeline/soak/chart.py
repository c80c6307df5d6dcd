"""The PNG chart of a soak report: latency, throughput and memory over time.

Drawn from the JSON report alone, so a chart can be redrawn later:
``python -m pipeline.soak.chart REPORT.json CHART.png``.

Three panels sharing the time axis (seconds since the start):

1. latency per interval: p50, p95 and p99 of the answered requests (ms, log
   scale), with red marks where an interval had wrong answers, errors or lost
   requests;
2. throughput: correct answers per second, per interval;
3. resident memory of every pipeline process (MiB); a process that restarted
   shows a break where its pid changed.

A dashed line marks the end of the warm-up; memory growth is measured after it.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

MIB = 1 << 20


def render(report: Mapping[str, Any], path: str | Path) -> Path:
    """Write the chart of ``report`` (a soak report dict) to ``path`` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed, and no GUI toolkit
    import matplotlib.pyplot as plt

    path = Path(path)
    intervals = report.get("intervals", [])
    t = [row["t_s"] for row in intervals]
    fig, (ax_lat, ax_rps, ax_mem) = plt.subplots(3, 1, figsize=(11, 9), sharex=True, constrained_layout=True)
    totals = report.get("totals", {})
    errors = sum(totals.get("errors", {}).values())
    verdict = "PASSED" if report.get("verdict", {}).get("ok") else "FAILED"
    fig.suptitle(
        f"soak of {report.get('model', '?')} at {report.get('target', '?')}: {verdict} — "
        f"{totals.get('correct', 0)} correct, {totals.get('wrong', 0)} wrong, {errors} errors, {totals.get('lost', 0)} lost"
    )

    for q, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        ys = [row[f"{q}_ms"] if row["correct"] + row["wrong"] else float("nan") for row in intervals]
        ax_lat.plot(t, ys, style, label=q)
    bad = [(row["t_s"], row["max_ms"]) for row in intervals if row["wrong"] or row["errors"] or row["lost"]]
    if bad:
        ax_lat.scatter([b[0] for b in bad], [max(b[1], 1e-3) for b in bad], color="red", marker="x", label="wrong/error/lost", zorder=3)
    ax_lat.set_ylabel("latency (ms)")
    if any(row["max_ms"] > 0 for row in intervals):
        ax_lat.set_yscale("log")
    ax_lat.legend(loc="upper right")
    ax_lat.grid(True, which="both", alpha=0.3)

    ax_rps.plot(t, [row["throughput_rps"] for row in intervals], color="tab:green")
    ax_rps.set_ylabel("correct answers / s")
    ax_rps.set_ylim(bottom=0)
    ax_rps.grid(True, alpha=0.3)

    for name, proc in report.get("processes", {}).items():
        samples = proc.get("samples", [])
        xs: list[float] = []
        ys_mem: list[float] = []
        last_pid = None
        for ts, pid, rss in samples:
            if last_pid is not None and pid != last_pid:  # a restart: break the line
                xs.append(ts)
                ys_mem.append(float("nan"))
            xs.append(ts)
            ys_mem.append(rss / MIB)
            last_pid = pid
        ax_mem.plot(xs, ys_mem, label=name)
    ax_mem.set_ylabel("resident memory (MiB)")
    ax_mem.set_xlabel("time since start (s)")
    ax_mem.grid(True, alpha=0.3)
    if report.get("processes"):
        ax_mem.legend(loc="center right", fontsize="small", ncol=2)
    else:
        ax_mem.text(0.5, 0.5, "memory not measured", ha="center", va="center", transform=ax_mem.transAxes)

    warmup = report.get("warmup_s")
    if warmup:
        for ax in (ax_lat, ax_rps, ax_mem):
            ax.axvline(warmup, color="grey", linestyle="--", linewidth=1)
        ax_mem.text(warmup, 1.0, " end of warm-up", transform=ax_mem.get_xaxis_transform(), va="top", fontsize="small", color="grey")

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        print("usage: python -m pipeline.soak.chart REPORT.json CHART.png", file=sys.stderr)
        return 2
    render(json.loads(Path(argv[0]).read_text()), argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
