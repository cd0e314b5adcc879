"""Pictures of a benchmark run: throughput per mode against the optimal line, time per op kind, and the
measured nano-op timeline of overlap modes as a Gantt chart (streams as rows)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_bench(records: list[dict[str, Any]], timelines: dict[str, Any], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if "throughput_tok_s" in r]
    if not ok:
        return
    profiled = [r for r in ok if "profile" in r]
    fig, axes = plt.subplots(1, 2 if profiled else 1, figsize=(13 if profiled else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    names = [r.get("label", r["mode"]) for r in ok]
    vals = [r["throughput_tok_s"] for r in ok]
    bars = ax.bar(names, vals, color=["#4c72b0" if not n.startswith("peer") else "#999999" for n in names])
    for b, r in zip(bars, ok):
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), f"{r['pct_optimal']:.0f}%", ha="center",
                va="bottom", fontsize=9)
    opt = ok[0]["optimal_tok_s"]
    ax.axhline(opt, color="crimson", ls="--", lw=1)
    ax.text(len(names) - 0.5, opt, f"optimal {opt:,.0f}", color="crimson", ha="right", va="bottom", fontsize=9)
    ax.set_ylabel("total tokens/s (prompt + generated)")
    ax.set_title(f"{ok[0]['model']} {ok[0]['workload']} on {ok[0]['device']}", fontsize=10)
    ax.tick_params(axis="x", rotation=20)
    if profiled:
        ax2 = axes[0][1]
        kinds = sorted({k for r in profiled for k in r["profile"]["per_class_ms"]})
        bottom = [0.0] * len(profiled)
        for kind in kinds:
            v = [r["profile"]["per_class_ms"].get(kind, 0.0) for r in profiled]
            ax2.bar([r.get("label", r["mode"]) for r in profiled], v, bottom=bottom, label=kind)
            bottom = [a + b for a, b in zip(bottom, v)]
        ax2.set_ylabel("GPU kernel ms per dense batch (CUPTI, graph replay)")
        ax2.set_title("time per resource kind, one steady-state dense batch", fontsize=10)
        ax2.legend(fontsize=8)
        ax2.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    plt.close(fig)
    for mode, recs in timelines.items():
        if recs:
            plot_measured_gantt(recs, out.with_name(out.name + f"-{mode}-gantt.png"), f"{mode}: measured")


def plot_measured_gantt(kernels: list[Any], path: Path, title: str, window: float = 0.12) -> None:
    """Kernels of one replayed dense batch (a window in its middle), streams as rows, coloured by class."""
    from nanoflow.search.plot import plot_gantt

    if not kernels:
        return
    span = max(k[4] for k in kernels)
    lo, hi = span * 0.45, span * (0.45 + window)
    rows = [(s, cls, st - lo, en - lo) for s, cls, _name, st, en in kernels if st >= lo and en <= hi]
    if rows:
        plot_gantt(None, rows, path, title)
