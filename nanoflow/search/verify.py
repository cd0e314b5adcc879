"""Predicted vs measured layer time: run whole forwards of candidate pipelines on the profiled batch.

The search predicts one layer's time from per-op profiles and the R -> P table. This module measures it: the
synthetic dense batch the profile was made on (same decode rows, context and prefill chunks) goes through the full
forward -- embedding and every layer, each candidate spec laid on streams by the engine's executor -- captured in a
CUDA graph and timed by replays. The measured time per layer is that forward's time over the number of layers (the
embedding, a few microseconds, is counted in). On a CPU the wall clock stands in (tests).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from nanoflow.graphs.pipeline import PipelineSpec


def measure_layer_ms(engine: Any, specs: Mapping[str, PipelineSpec | None], decode_rows: int, ctx: int,
                     chunk: int = 1024, knob: str = "none", reps: int = 2) -> dict[str, float]:
    """``{name: measured ms per layer}`` for each spec (None = the sequential baseline) on the profiled batch.

    ``knob`` is how nano-op shares are enforced (graphs/resources.py); ``none`` is what ``overlap-searched`` runs.
    """
    from nanoflow.graphs.executor import Executor
    from nanoflow.graphs.glue import profiling_glue
    from nanoflow.graphs.resources import ResourceConfig
    from nanoflow.search.profiler import graph_time, synthetic_plan

    runner = engine.runner
    dense = engine.dense_batch_size
    plan, keep = synthetic_plan(engine, dense, decode_rows, ctx, chunk)
    saved = runner.executor, runner.graphs, runner.glue
    runner.graphs = None  # time the forward directly, not the engine's own captured buckets
    runner.glue = profiling_glue(runner)
    out: dict[str, float] = {}
    try:
        for name, spec in specs.items():
            runner.executor = Executor(saved[0].graphs, spec, runner.device, resources=ResourceConfig(knob=knob))
            batch = runner.prepare(plan)
            ms = graph_time(lambda batch=batch: runner.run_layers(batch), reps, device=runner.device)
            out[name] = ms / len(saved[0].graphs)
    finally:
        runner.executor, runner.graphs, runner.glue = saved
        for r in keep:
            engine.blocks.free(r)
    return out


def compare(predicted: Mapping[str, float], measured: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Per spec: predicted and measured ms per layer and the prediction's error relative to the measurement."""
    return {name: {"predicted_ms": predicted[name], "measured_ms": measured[name],
                   "error": (predicted[name] - measured[name]) / measured[name]}
            for name in measured if name in predicted and measured[name] > 0}
