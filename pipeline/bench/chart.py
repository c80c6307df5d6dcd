"""The PNG chart of a bench report: each measured ratio beside its goal.

Drawn from the JSON report alone: ``python -m pipeline.bench.chart REPORT.json CHART.png``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def ratios(report: Mapping[str, Any]) -> list[tuple[str, float, float | None, bool]]:
    """``(label, value, goal or None, higher_is_better)`` for every ratio the report holds."""
    rows: list[tuple[str, float, float | None, bool]] = []
    if "pipeline_latency" in report:
        base = min(report["local_latency"]["p50_ms"], report.get("local_latency_after", report["local_latency"])["p50_ms"])
        rows.append(("latency p50, batch 1\n(pipeline / local)", report["pipeline_latency"]["p50_ms"] / base, 1.10, False))
    if "pipeline_throughput" in report:
        best = report["local_throughput"]["best"]
        for c, row in report["pipeline_throughput"].items():
            goal = 0.90 if int(c) == 32 else None  # the goal is set for concurrency 32
            rows.append((f"throughput, concurrency {c}\n(pipeline / local best)", row["rate"] / best, goal, True))
    p = report.get("parallel") or {}
    if "speedup" in p:
        rows.append(("2 shards on 2 cores, 1 sample/request\n(vs whole model, 1 core)", p["speedup"], 1.8, True))
    if "batched_speedup" in p:
        rows.append((f"2 shards on 2 cores, {p['best_batch']} samples/request\n(vs whole model, 1 core)", p["batched_speedup"], 1.8, True))
    for row in report.get("hop") or []:
        rows.append((f"hop {row['label']}\n(codec / bare ZeroMQ)", row["ratio"], 1.20, False))
    return rows


def render(report: Mapping[str, Any], path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ratios(report)
    path = Path(path)
    fig, ax = plt.subplots(figsize=(10, 0.6 * len(rows) + 1.5), constrained_layout=True)
    labels = [r[0] for r in rows]
    values = [r[1] for r in rows]
    colors = [
        "tab:grey" if g is None else "tab:green" if (v >= g if hib else v <= g) else "tab:red" for _, v, g, hib in rows
    ]
    y = list(range(len(rows)))[::-1]
    ax.barh(y, values, color=colors, alpha=0.8)
    for yi, (_, v, g, hib) in zip(y, rows):
        if g is not None:
            ax.plot([g, g], [yi - 0.4, yi + 0.4], color="black", linewidth=2)
        goal = "" if g is None else f" (goal {'≥' if hib else '≤'} {g:g})"
        ax.text(v, yi + 0.25, f" {v:.2f}{goal}", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.axvline(1.0, color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("ratio (black tick: goal; green: met, red: not met, grey: no goal)")
    m = report.get("machine", {})
    ax.set_title(f"pipeline bench: {report.get('topology')} in {report.get('shards')} shards, {report.get('date')}, {m.get('cpus')} CPUs", fontsize=10)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m pipeline.bench.chart REPORT.json CHART.png", file=sys.stderr)
        return 2
    render(json.loads(Path(args[0]).read_text()), args[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
