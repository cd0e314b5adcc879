"""Gantt charts of a pipeline: the planned schedule of a spec and/or measured nano-op timings.

One row per stream, bars coloured by resource kind and labelled with the op and its token range (and its share R
when below 1). With both inputs the planned chart sits above the measured one on a shared time axis. Planned charts
of periodic specs also show, hatched, the previous and next layer's nano-ops that overlap this layer, and a
dashed line where the next layer starts. Uses matplotlib's Agg canvas directly (no pyplot global state).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from nanoflow.graphs.nanoop import LayerGraph, ResourceKind
from nanoflow.graphs.pipeline import PipelineSpec

COLOURS = {"compute": "#f2b134", "memory": "#59a14f", "network": "#4e79a7", "other": "#bab0ac",
           "copy": "#b07aa1"}
MeasuredRow = tuple[str, str, float, float]
"""(stream label, nano-op name such as ``"qkv[0:1024)"``, start ms, end ms)."""


def _kind_by_name(op: str) -> str:
    """Fallback when neither the graph nor the spec's meta says: LLaMA op-name conventions."""
    if "all_reduce" in op or "all_gather" in op:
        return "network"
    if op.startswith("decode_attn"):
        return "memory"
    if op in ("qkv", "o_proj", "gate_up", "down", "prefill_attn") or op.endswith(("_proj", "gemm")):
        return "compute"
    return "other"


def _op_of(name: str) -> str:
    m = re.search(r"([A-Za-z_][\w.]*)\s*\[", name)
    return m.group(1) if m else name.split()[-1]


def _resolve_kinds(planned: PipelineSpec | None, graph: LayerGraph | None,
                   kinds: Mapping[str, ResourceKind | str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    if planned is not None:
        out.update({k: str(v) for k, v in planned.meta.get("kinds", {}).items()})
    if graph is not None:
        out.update({op.name: op.kind.value for op in graph.ops})
    if kinds:
        out.update({k: v.value if isinstance(v, ResourceKind) else str(v).lower() for k, v in kinds.items()})
    return out


def _draw(ax, rows: list[str], bars: list[tuple[int, float, float, str, str, bool]], span: float) -> None:
    """bars: (row, start, end, kind, label, ghost); ghosts are neighbouring layers' nano-ops."""
    for row, start, end, kind, label, ghost in bars:
        colour = COLOURS.get(kind, COLOURS["other"])
        ax.barh(row, end - start, left=start, height=0.72, color=colour, alpha=0.35 if ghost else 0.95,
                edgecolor="#333333", linewidth=0.6, hatch="///" if ghost else None)
        width = end - start
        if not ghost and width > 0.012 * span:
            vertical = width < 0.06 * span
            if vertical:  # a narrow bar: op and rows only, written upwards
                label = "\n".join(label.split("\n")[:2])
            ax.text(start + width / 2, row, label, ha="center", va="center", fontsize=6 if vertical else 7.5,
                    rotation=90 if vertical else 0, clip_on=True)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.grid(axis="x", linestyle=":", linewidth=0.6, alpha=0.7)


def _planned_bars(spec: PipelineSpec, kinds: dict[str, str]) -> tuple[list[str], list, float]:
    if any(n.start_ms is None or n.end_ms is None for n in spec.nano_ops):
        raise ValueError(f"spec {spec.name!r} has no planned times; plot a searched spec or pass measured timings")
    streams = sorted({n.stream for n in spec.nano_ops})
    row_of = {s: k for k, s in enumerate(streams)}
    names = []
    for s in streams:
        ks = sorted({kinds.get(n.op, _kind_by_name(n.op)) for n in spec.nano_ops if n.stream == s})
        names.append(f"stream {s}\n({', '.join(ks)})")
    end = max(n.end_ms for n in spec.nano_ops)
    bars = []
    for n in spec.nano_ops:
        label = f"{n.op}\n[{n.lo}:{n.hi})" + (f"\nR={n.share:g}" if n.share < 1 else "")
        bars.append((row_of[n.stream], n.start_ms, n.end_ms, kinds.get(n.op, _kind_by_name(n.op)), label, False))
    t = spec.meta.get("period_ms")
    if spec.meta.get("wrap", True) and isinstance(t, (int, float)) and 0 < t < end:
        for n in spec.nano_ops:
            for shift in (-t, t):
                s, e = n.start_ms + shift, n.end_ms + shift
                if e > 0 and s < end:
                    bars.append((row_of[n.stream], max(s, 0.0), min(e, end), kinds.get(n.op, _kind_by_name(n.op)),
                                 "", True))
    return names, bars, end


def plot_gantt(planned: PipelineSpec | None, measured: Sequence[MeasuredRow] | None, path: str | Path,
               title: str = "", graph: LayerGraph | None = None,
               kinds: Mapping[str, ResourceKind | str] | None = None) -> Path:
    """Write a PNG (or any format matplotlib infers from ``path``) and return its path.

    Resource kinds come from ``kinds``, else ``graph``, else the spec's ``meta["kinds"]``, else op-name
    conventions. Measured rows keep their order of first appearance per stream label.
    """
    if planned is None and not measured:
        raise ValueError("nothing to plot: pass a planned spec, measured timings, or both")
    kind_of = _resolve_kinds(planned, graph, kinds)
    panels = []
    if planned is not None:
        rows, bars, end = _planned_bars(planned, kind_of)
        panels.append(("planned" + (f" — {planned.name}" if planned.name else ""), rows, bars, end))
    if measured:
        labels = list(dict.fromkeys(r[0] for r in measured))
        t0 = min(r[2] for r in measured)
        bars = [(labels.index(s), a - t0, b - t0, kind_of.get(_op_of(n), _kind_by_name(_op_of(n))),
                 n.replace("[", "\n[", 1), False) for s, n, a, b in measured]
        panels.append(("measured", labels, bars, max(r[3] for r in measured) - t0))
    span = max(p[3] for p in panels)
    height = sum(1.2 + 1.0 * len(p[1]) for p in panels)
    fig = Figure(figsize=(max(10.0, min(24.0, 0.35 * sum(len(p[2]) for p in panels))), height + 0.8))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (name, rows, bars, _) in zip(axes, panels, strict=True):
        _draw(ax, rows, bars, span)
        ax.set_title(name, fontsize=9, loc="left")
    if planned is not None and isinstance(planned.meta.get("period_ms"), (int, float)):
        axes[0].axvline(planned.meta["period_ms"], color="#c0392b", linestyle="--", linewidth=1.0)
        axes[0].text(planned.meta["period_ms"], -0.45, " next layer", color="#c0392b", fontsize=7, va="top")
    axes[-1].set_xlabel("time (ms)")
    axes[-1].set_xlim(0, span * 1.01)
    used = sorted({b[3] for p in panels for b in p[2]})
    fig.legend(handles=[Patch(color=COLOURS.get(k, COLOURS["other"]), label=k) for k in used],
               loc="upper right", ncol=len(used), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    out = Path(path)
    fig.savefig(out, dpi=130)
    return out
