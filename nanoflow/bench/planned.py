"""Planned beside measured: one layer's pipeline as its spec plans it, next to the same layer timed with CUDA events.

The plan of a hand-written spec has no times of its own; here each nano-op gets the time its op took in the
non-overlap mode of the same run (``profile_plan``'s per-op CUDA-event times in one layer of one dense batch, the
GPU held while the CPU queued it, so no launch gaps count), pro rata to the work of its token range, and starts as
soon as its waits allow (``search.schedule.asap_times``). So the planned
panel is what the spec would take with no interference between concurrent nano-ops; the measured panel below it
shows what it took. A searched spec keeps the times its search planned.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from nanoflow.graphs.nanoop import LayerGraph
from nanoflow.graphs.pipeline import PipelineSpec


def work_fraction(op: str, lo: int, hi: int, dense: int, decode_rows: int) -> float:
    """The share of op ``op``'s work in rows ``[lo, hi)`` of a batch of ``dense`` rows whose first ``decode_rows``
    are decode rows: decode attention's work is in the decode rows, prefill attention's in the others, every other
    op's in all rows alike."""
    if op == "decode_attn":
        return max(0, min(hi, decode_rows) - lo) / decode_rows if decode_rows else 0.0
    if op == "prefill_attn":
        prefill = dense - decode_rows
        return max(0, hi - max(lo, decode_rows)) / prefill if prefill > 0 else 0.0
    return (hi - lo) / dense


def planned_from_isolated(spec: PipelineSpec, graph: LayerGraph, op_ms: Mapping[str, float],
                          decode_rows: int) -> PipelineSpec:
    """``spec`` with planned times: nano-op = ``op_ms[op]`` (one layer, the whole batch, measured alone) times its
    :func:`work_fraction`, started as soon as its waits allow. Ops missing from ``op_ms`` take no time."""
    from nanoflow.search.schedule import asap_times

    dense = spec.dense_batch_size
    nano = tuple(replace(n, start_ms=0.0,
                         end_ms=op_ms.get(n.op, 0.0) * work_fraction(n.op, n.lo, n.hi, dense, decode_rows))
                 for n in spec.nano_ops)
    return asap_times(replace(spec, nano_ops=nano), graph)


def layer_rows(records: Sequence[Any], layer: int) -> list[tuple[str, str, float, float]]:
    """Measured rows ``(stream, "op[lo:hi)", start_ms, end_ms)`` of one layer's nano-ops (``Timeline`` records)."""
    return [(r.stream, f"{r.op}[{r.lo}:{r.hi})", r.start_ms, r.end_ms) for r in records if r.layer == layer]


def planned_layer(spec: PipelineSpec, graph: LayerGraph, op_ms: Mapping[str, float],
                  decode_rows: int) -> PipelineSpec:
    """The layer as planned: the spec's own times if it has them (a searched spec), else
    :func:`planned_from_isolated` (without a period: no next layer is planned)."""
    if all(n.start_ms is not None and n.end_ms is not None for n in spec.nano_ops):
        return spec
    planned = planned_from_isolated(spec, graph, op_ms, decode_rows)
    return replace(planned, meta={**planned.meta, "period_ms": None})


def plot_planned_vs_measured(planned: PipelineSpec, graph: LayerGraph, records: Sequence[Any], layer: int,
                             path: Path, title: str) -> Path:
    """The Gantt chart: the planned layer (:func:`planned_layer`) above layer ``layer`` as measured."""
    from nanoflow.search.plot import plot_gantt

    return plot_gantt(planned, layer_rows(records, layer), path, title, graph=graph)
