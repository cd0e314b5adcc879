"""Offline throughput of one model and workload across modes, in one process (ratios inside one run count).

For each mode a fresh engine shares the same weights; a warm-up round captures CUDA graphs and compiles glue ops
before the timed run. Total throughput = (prompt + generated tokens) / wall time (paper §3.1); % of optimal uses the
GEMM peak measured in the same run (eq. 5).
"""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import replace
from typing import Any

import torch

from nanoflow.config import ADMISSION_PACE, PACED_MARGIN, EngineArgs
from nanoflow.graphs.pipeline import DEFAULT_PRESET

log = logging.getLogger("nanoflow")

MODES = {
    # mode name -> (pipeline, cuda_graphs, async_scheduling)
    "non-overlap": ("none", True, True),
    "non-overlap-eager": ("none", False, True),
    "non-overlap-sync": ("none", True, False),
    "non-overlap-paced": ("none", True, True),  # admission pacing on (PACED_MODES)
    "nano-batch": ("llama-8b-nanobatch", True, True),
    "overlap-preset": (DEFAULT_PRESET, True, True),  # the engine picks the model's own overlap preset
    "overlap-preset-green": (DEFAULT_PRESET, True, True),
    "overlap-preset-nogrid": (DEFAULT_PRESET, True, True),
    "overlap-preset-partition": (DEFAULT_PRESET, True, True),
}
PACED_MODES = {"non-overlap-paced"}  # --admission-pace, or PACED_MARGIN where that is 0 (off)
KNOB_OF_MODE = {"overlap-preset-green": "green", "overlap-preset-nogrid": "none", "overlap-searched": "none",
                "overlap-preset-partition": "partition", "overlap-searched-partition": "partition",
                "overlap-searched-grid": "grid"}


def workload(spec_name: str, n: int, vocab: int, seed: int, max_len: int) -> list[tuple[list[int], int]]:
    from nanoflow.data import load_dataset

    data = load_dataset(spec_name, num_requests=n, seed=seed, vocab_size=vocab, max_len=max_len)
    return [(item.prompt_token_ids, item.max_tokens or 1) for item in data.items]


PROFILE_HOLD_MS = 300.0
"""How long the GPU is held while the CPU queues the nano-op profile's eager forward (``profile_plan``)."""


def clock_monitor(interval_s: float = 0.1) -> Any:
    """A started :class:`~nanoflow.bench.gpu_monitor.GpuMonitor` of the current GPU (SM clock, power, clock-event
    reasons) for a mode's timed run, or None without NVML (a warning says what to install).

    Why: modes run one after another in one process, and a later mode may find the GPU hotter or clocked lower.
    The clocks tell that apart from a slower pipeline: on an H100 a mode run second was 12% slower at a *higher* SM
    clock, and the cause was glue run eagerly (``recompile_limit_hits``, s15-bench-preset-first-*).
    """
    from nanoflow.bench.gpu_monitor import GpuMonitor

    try:
        return GpuMonitor(torch.cuda.current_device(), interval_s=interval_s).start()
    except Exception as exc:  # a bonus: never costs the throughput figure
        log.warning("no GPU clock record for this mode (%s)", exc)
        return None


def run_mode(args: EngineArgs, parts: dict[str, Any], reqs: list[tuple[list[int], int]],
             warmup_reqs: list[tuple[list[int], int]], profile: bool) -> dict[str, Any]:
    from nanoflow.engine.engine import Engine
    from nanoflow.graphs.glue import recompile_limit_hits

    hits_before = recompile_limit_hits()  # the record counts this mode's give-ups only
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the record's memory peaks are this mode's
    t_build = time.perf_counter()
    engine = Engine(args, parts=parts)
    try:
        return _run_engine(engine, args, reqs, warmup_reqs, profile, t_build, hits_before)
    finally:
        engine.close()
        gc.collect()
        torch.cuda.empty_cache()


class PlanSample:
    """A bounded, evenly spaced sample of a run's full plans, for profiling the one in the middle.

    Keeping every plan is not an option: a 2,048-token plan with ~700 decode rows holds ~1,050 objects the cyclic GC
    tracks (measured with the scheduler alone), and a 1,536-request LLaMA-3-8B run has ~1,000 full plans, so the
    GC's full collections walk a million more objects as the run goes on: the idle gaps of 0.05-0.25 s that grew
    late in the H200 runs (s8-bench-fp8kv-gcfreeze-h200-llama3-8b-iterations.png). It keeps the plans whose index
    is a multiple of ``stride`` and doubles the stride (dropping every other kept plan) whenever more than ``cap``
    are kept, so ``middle()`` is within one stride of the run's middle plan.
    """

    def __init__(self, cap: int = 32) -> None:
        self.cap = cap
        self.kept: list[Any] = []
        self.stride = 1
        self.seen = 0

    def add(self, plan: Any) -> None:
        if self.seen % self.stride == 0:
            self.kept.append(plan)
        self.seen += 1
        if len(self.kept) > self.cap:
            self.kept = self.kept[::2]
            self.stride *= 2

    def middle(self) -> Any:
        return self.kept[len(self.kept) // 2]


def _run_engine(engine: Any, args: EngineArgs, reqs: list[tuple[list[int], int]],
                warmup_reqs: list[tuple[list[int], int]], profile: bool, t_build: float,
                hits_before: int = 0) -> dict[str, Any]:
    from nanoflow.bench.iterations import IterationTimer
    from nanoflow.bench.measure import profile_plan, profile_replay
    from nanoflow.scheduler.request import SamplingParams

    warm_t0 = time.perf_counter()
    if engine.runner.graphs is not None:  # capture every token bucket outside the timed run
        engine.runner.graphs.capture_all()
    for ids, out in warmup_reqs:
        engine.add_request(ids, SamplingParams(max_tokens=out, temperature=0, ignore_eos=True))
    engine.run_until_done()
    warm_s = time.perf_counter() - warm_t0
    for k in ("stats_iterations", "stats_tokens", "stats_preemptions"):
        setattr(engine, k, 0)
    engine.stats_sched_s = engine.stats_launch_s = engine.stats_wall_s = 0.0
    sample = PlanSample()
    if profile:
        engine.plan_hook = lambda p: sample.add(p) if p.num_tokens == engine.dense_batch_size else None
    outs = [engine.add_request(ids, SamplingParams(max_tokens=out, temperature=0, ignore_eos=True))
            for ids, out in reqs]
    # After capture, compilation and queuing: no full GC pass walks the engine's objects or the queued requests in
    # the timed run (LLM.generate does the same for a batch, FREEZE_MIN_REQUESTS).
    engine.freeze_gc()
    torch.cuda.synchronize()
    monitor = clock_monitor()
    with IterationTimer(engine.runner) as timer:
        t0 = time.perf_counter()
        engine.run_until_done()
        wall = time.perf_counter() - t0
    engine.plan_hook = None
    rec = run_record(engine, outs, reqs, wall, warm_s, warm_t0 - t_build, hits_before)
    if engine.device.type == "cuda":
        from nanoflow.engine.memory_profile import memory_summary

        rec["memory"] = memory_summary(engine.device, engine.runner.kv_cache)
    if monitor is not None:
        monitor.stop()
        rec["gpu_clocks"] = monitor.summary()
    rec["_tokens"] = [list(o.token_ids) for o in outs]  # for compare_tokens across modes; not saved
    try:
        rec["iterations_timed"] = timer.summary(engine.dense_batch_size)
    except Exception as exc:  # the per-step timing is a bonus: keep the throughput figure
        log.exception("per-step timing failed")
        rec["iterations_timed_error"] = repr(exc)
    if profile and sample.kept:
        try:
            prof = profile_replay(engine, sample.middle())
            rec["profile"] = {k: v for k, v in prof.items() if k != "kernels"}
            rec["_records"] = prof["kernels"]
        except Exception as exc:  # profiling is a bonus: keep the throughput figure
            log.exception("profiling failed")
            rec["profile_error"] = repr(exc)
        try:  # the same batch eagerly, each nano-op timed with CUDA events (planned beside measured)
            from nanoflow.graphs.pipeline import PipelineSpec

            eager = profile_plan(engine, sample.middle(), hold_ms=PROFILE_HOLD_MS)
            graph = engine.model.graphs[0]
            layer = min(1, len(engine.model.graphs) - 1)  # an early layer: queued while the GPU was held
            rec["nano_op_profile"] = {"layer": layer, "layer_op_ms": eager["per_layer_op_ms"].get(layer, {}),
                                      "per_op_ms": eager["per_op_ms"], "layers_span_ms": eager["layers_span_ms"],
                                      "eager_wall_ms": eager["eager_wall_ms"], "hold_ms": PROFILE_HOLD_MS,
                                      "decode_tokens": eager["decode_tokens"]}
            rec["_nano"] = {"records": eager["records"], "graph": graph,
                            "spec": engine.runner.executor.spec
                            or PipelineSpec.sequential(graph, engine.dense_batch_size)}
        except Exception as exc:  # a bonus too
            log.exception("nano-op profiling failed")
            rec["nano_op_profile_error"] = repr(exc)
    return rec


def run_record(engine: Any, outs: list[Any], reqs: list[tuple[list[int], int]], wall: float, warm_s: float,
               build_s: float, hits_before: int = 0) -> dict[str, Any]:
    """The result record of one timed run: throughput, iteration and CPU times, graph statistics.
    ``hits_before``: :func:`~nanoflow.graphs.glue.recompile_limit_hits` before this engine was built, so
    ``recompile_limit_hits`` counts this mode's give-ups only."""
    prompt_toks = sum(len(o.prompt_token_ids) for o in outs)
    gen_toks = sum(len(o.token_ids) for o in outs)
    it = max(engine.stats_iterations, 1)
    rec: dict[str, Any] = {
        "requests": len(outs), "prompt_tokens": prompt_toks, "generated_tokens": gen_toks, "wall_s": wall,
        "throughput_tok_s": (prompt_toks + gen_toks) / wall, "iterations": engine.stats_iterations,
        "iteration_ms": wall / it * 1e3, "cpu_schedule_ms_per_iter": engine.stats_sched_s / it * 1e3,
        "cpu_launch_ms_per_iter": engine.stats_launch_s / it * 1e3, "warmup_s": warm_s, "engine_build_s": build_s,
        "errors": sum(o.finish_reason == "error" for o in outs), "dense_batch": engine.dense_batch_size,
        "kv_cache_tokens": engine.kv_tokens, "preemptions": engine.stats_preemptions,
        "admission_pace": engine.scheduler.admission_pace,
        "incomplete": sum(o.finish_reason != "length" or len(o.token_ids) != n for o, (_, n) in zip(outs, reqs)),
    }
    graphs = engine.runner.graphs
    if graphs is not None:
        from nanoflow.graphs.glue import recompile_limit_hits

        # > 0: some glue of this engine ran eagerly, uncompiled (dynamo's recompile limit; see
        # graphs/glue.compiled_glue)
        rec.update(graph_replays=graphs.replays, graph_eager_runs=graphs.eager_runs,
                   graph_capture_s=graphs.capture_seconds, graphs_captured=len(graphs.captured),
                   recompile_limit_hits=recompile_limit_hits() - hits_before)
    return rec


def compare_tokens(ref: list[list[int]], got: list[list[int]]) -> dict[str, Any]:
    """How one mode's greedy outputs compare with a reference mode's on the same requests (same order): how many are
    identical, and for the others where they first differ (token index into the output)."""
    if len(ref) != len(got):
        raise ValueError(f"the runs have {len(ref)} and {len(got)} requests; compare runs of the same workload")
    firsts = []
    for a, b in zip(ref, got):
        if a != b:
            firsts.append(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b))))
    out: dict[str, Any] = {"requests": len(ref), "identical": len(ref) - len(firsts), "differ": len(firsts)}
    if firsts:
        firsts.sort()
        out.update(first_difference_min=firsts[0], first_difference_median=firsts[len(firsts) // 2])
    return out


def compare_with_earlier(outputs: dict[str, list[list[int]]], label: str, tokens: list[list[int]]) -> dict[str, Any]:
    """Record fields comparing mode ``label``'s greedy outputs with those of the modes run before it (same weights,
    same requests: they should agree token for token), then add them to ``outputs``: ``tokens_vs_reference``
    against the first mode, and ``tokens_vs_modes`` against each later one (e.g. overlap against nano-batch, the
    same split run concurrently or not)."""
    fields: dict[str, Any] = {}
    if outputs:
        first, *later = outputs
        fields["tokens_vs_reference"] = {"reference": first, **compare_tokens(outputs[first], tokens)}
        if later:
            fields["tokens_vs_modes"] = {m: compare_tokens(outputs[m], tokens) for m in later}
    outputs[label] = tokens
    return fields


def base_args(model: str, dense: int, seed: int, kv_tokens: int | None, max_num_seqs: int | None,
              kv_cache_dtype: str = "auto", dtype: str = "bfloat16",
              admission_pace: float = ADMISSION_PACE) -> EngineArgs:
    return EngineArgs(model=model, load_format="dummy", dtype=dtype, device="cuda", dense_batch_size=dense,
                      seed=seed, kv_cache_tokens=kv_tokens, max_num_seqs=max_num_seqs, kv_cache_dtype=kv_cache_dtype,
                      admission_pace=admission_pace)


def mode_args(args: EngineArgs, mode: str, searched: str | None) -> EngineArgs:
    if mode.startswith("overlap-searched"):
        if mode not in KNOB_OF_MODE:
            raise ValueError(f"unknown mode {mode!r}; use overlap-searched, overlap-searched-grid or "
                             "overlap-searched-partition")
        return replace(args, pipeline=searched, resource_knob=KNOB_OF_MODE[mode])
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; use one of {', '.join([*MODES, 'overlap-searched'])}")
    pipeline, graphs, async_ = MODES[mode]
    return replace(args, pipeline=pipeline, cuda_graphs=graphs, async_scheduling=async_,
                   resource_knob=KNOB_OF_MODE.get(mode, args.resource_knob),
                   admission_pace=(args.admission_pace or PACED_MARGIN) if mode in PACED_MODES else args.admission_pace)
