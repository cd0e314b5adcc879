"""Measurements the throughput benchmark makes besides end-to-end runs: GEMM peak, per-op profile, peer.

All GPU timings use CUDA events (median of repeats, after warm-up), per ``../shared/BENCHMARKING.md``.
"""

from __future__ import annotations

import functools
import logging
import statistics
import time
from typing import Any

import torch

from nanoflow.config import ModelSpec

log = logging.getLogger("nanoflow")


def time_cuda(fn: Any, warmup: int = 3, repeat: int = 10) -> float:
    """Median milliseconds of ``fn()`` on the current stream."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def layer_gemm_shapes(spec: ModelSpec, tp: int = 1) -> dict[str, tuple[int, int]]:
    """(N, K) of each dense GEMM weight of one layer, this rank's shard."""
    h, d = spec.hidden_size, spec.head_dim
    q, kv = spec.num_heads * d // tp, max(1, spec.num_kv_heads // tp) * d
    inter = spec.intermediate_size // tp
    return {"qkv": (q + 2 * kv, h), "o_proj": (h, q), "gate_up": (2 * inter, h), "down": (h, inter)}


def _rotating_mm(xs: list[torch.Tensor], ws: list[torch.Tensor], y: torch.Tensor) -> Any:
    state = {"i": 0}

    def run() -> None:
        i = state["i"] = state["i"] + 1
        torch.mm(xs[i % len(xs)], ws[i % len(ws)].t(), out=y)

    return run


def gemm_peak(spec: ModelSpec, tokens: int, dtype: torch.dtype, device: torch.device, tp: int = 1) -> dict[str, Any]:
    """bf16 GEMM TFLOP/s on the model's layer shapes at ``tokens`` rows (cuBLAS through torch).

    ``peak_tflops`` is the best shape's rate (the paper's "Compute" in eq. 5); ``layer_tflops`` is the
    FLOP-weighted rate of one layer's four GEMMs.
    """
    out: dict[str, Any] = {"tokens": tokens, "shapes": {}}
    total_flop, total_ms = 0.0, 0.0
    g = torch.Generator(device=device).manual_seed(0)
    for name, (n, k) in layer_gemm_shapes(spec, tp).items():
        # Several weight copies rotated so repeats do not run from L2 (random data, never zeros).
        xs = [torch.randn(tokens, k, device=device, dtype=dtype, generator=g) for _ in range(2)]
        ws = [torch.randn(n, k, device=device, dtype=dtype, generator=g) * 0.02 for _ in range(3)]
        y = torch.empty(tokens, n, device=device, dtype=dtype)
        ms = time_cuda(_rotating_mm(xs, ws, y), warmup=5, repeat=20)
        flop = 2.0 * tokens * n * k
        out["shapes"][name] = {"n": n, "k": k, "ms": ms, "tflops": flop / ms / 1e9}
        total_flop += flop
        total_ms += ms
    out["peak_tflops"] = max(v["tflops"] for v in out["shapes"].values())
    out["layer_tflops"] = total_flop / total_ms / 1e9
    return out


def copy_bandwidth(device: torch.device, gib: float = 2.0) -> float:
    """Device-to-device copy GB/s (bytes read + written)."""
    n = int(gib * 2**30 / 2)
    a = torch.randn(n, device=device, dtype=torch.bfloat16)
    b = torch.empty_like(a)
    ms = time_cuda(lambda: b.copy_(a), warmup=2, repeat=10)
    return 2 * a.numel() * 2 / ms / 1e6


def profile_plan(engine: Any, plan: Any, repeat: int = 3, hold_ms: float = 0.0) -> dict[str, Any]:
    """Run one recorded plan eagerly with per-op CUDA events; time per op and per resource kind, one iteration.

    Eagerly the GPU waits for the CPU's launches between small kernels, and the events count those gaps.
    ``hold_ms`` > 0 first queues a spin kernel of that length on the stream, so the CPU queues the layers while the
    GPU is held and the first layers then run back to back as in a CUDA graph (until the launch queue drains:
    read the first layers, not the last). ``per_layer_op_ms`` gives each layer's own per-op times.
    """
    from nanoflow.graphs.timeline import Timeline

    runner = engine.runner
    # Decode inputs that referred to the previous iteration's samples become a fixed token (timing only).
    seqs = [s._replace(input_token_ids=[max(t, 0) for t in s.input_token_ids]) for s in plan.decode]
    plan = type(plan)(plan.iteration, seqs, plan.prefill, plan.num_tokens, plan.dense_batch_size, plan.preempted)
    graphs, runner.graphs = runner.graphs, None
    glue, runner.glue = runner.glue, (graphs.glue if graphs is not None else runner.glue)
    try:
        batch = runner.prepare(plan)
        runner.forward(batch)
        timeline = Timeline()
        runner.executor.timeline = timeline
        records = []
        for _ in range(repeat):
            timeline.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            timeline.mark_origin()
            if hold_ms > 0:
                torch.cuda._sleep(int(hold_ms * _spin_cycles_per_ms()))
            runner.forward(batch)
            recs = timeline.records()
            wall = (time.perf_counter() - t0) * 1e3
            records.append((wall, recs))
    finally:
        runner.executor.timeline = None
        runner.graphs, runner.glue = graphs, glue
    wall, recs = records[len(records) // 2]
    kinds = {op.name: op.kind.value for op in engine.model.graphs[0].ops}
    per_op: dict[str, float] = {}
    for r in recs:
        per_op[r.op] = per_op.get(r.op, 0.0) + r.ms
    per_kind: dict[str, float] = {}
    for op, ms in per_op.items():
        per_kind[kinds.get(op, "other")] = per_kind.get(kinds.get(op, "other"), 0.0) + ms
    span = max(r.end_ms for r in recs) if recs else 0.0
    per_layer: dict[int, dict[str, float]] = {}
    for r in recs:
        ops = per_layer.setdefault(r.layer, {})
        ops[r.op] = ops.get(r.op, 0.0) + r.ms
    return {"decode_tokens": plan.num_decode_tokens, "prefill_tokens": plan.num_prefill_tokens,
            "per_op_ms": per_op, "per_kind_ms": per_kind, "layers_span_ms": span, "eager_wall_ms": wall,
            "per_layer_op_ms": per_layer, "records": recs}


@functools.cache
def _spin_cycles_per_ms() -> float:
    """Clock cycles of ``torch.cuda._sleep`` per millisecond on this GPU (measured once)."""
    cycles = 10_000_000
    return cycles / max(time_cuda(lambda: torch.cuda._sleep(cycles), warmup=1, repeat=3), 1e-3)


KERNEL_CLASSES = (
    # (class, resource kind, name fragments) — first match wins
    ("decode_attn", "memory", ("_decode_split", "_decode_reduce", "_decode_persistent", "_decode_row", "_decode_packed",
                                 "decode_fp8_kernel")),
    ("prefill_attn", "compute", ("_prefill_kernel",)),
    ("gemm", "compute", ("gemm", "cutlass", "nvjet", "xmma", "cublas", "sm90_", "sm80_")),
    ("nccl", "network", ("nccl",)),
    ("glue", "other", ("triton_", "_rope_kv_kernel")),
)


TOP_KERNELS = 25  # kernel names kept, by total time, in a profile record


def classify_kernel(name: str) -> tuple[str, str]:
    low = name.lower()
    for cls, kind, frags in KERNEL_CLASSES:
        if any(f.lower() in low for f in frags):
            return cls, kind
    return "other", "other"


def profile_replay(engine: Any, plan: Any, replays: int = 3) -> dict[str, Any]:
    """GPU kernel time per class for one recorded dense batch, replayed through its CUDA graph under the profiler.

    Unlike event timing in an eager run (which also measures CPU launch gaps), this reads the kernels' own
    durations from CUPTI, so it describes the graph path that the timed run used. ``kernels`` keeps one replay's
    kernels ``(stream, class, name, start_us, end_us)`` for the measured Gantt chart.
    """
    import json
    import os
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    runner = engine.runner
    seqs = [s._replace(input_token_ids=[max(t, 0) for t in s.input_token_ids]) for s in plan.decode]
    plan = type(plan)(plan.iteration, seqs, plan.prefill, plan.num_tokens, plan.dense_batch_size, plan.preempted)
    runner._prev_rows = {}
    batch = runner.prepare(plan)
    runner.forward(batch)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(replays):
        runner.forward(batch)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) / replays * 1e3
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            runner.forward(batch)
        torch.cuda.synchronize()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    finally:
        os.unlink(path)
    kernels = [e for e in trace.get("traceEvents", []) if e.get("cat") == "kernel"]
    per_class: dict[str, float] = {}
    per_kind: dict[str, float] = {}
    per_name: dict[str, list] = {}  # kernel name -> [class, ms per replay, launches per replay]
    for k in kernels:
        cls, kind = classify_kernel(k["name"])
        per_class[cls] = per_class.get(cls, 0.0) + k["dur"] / 1e3 / replays
        per_kind[kind] = per_kind.get(kind, 0.0) + k["dur"] / 1e3 / replays
        entry = per_name.setdefault(k["name"][:120], [cls, 0.0, 0.0])
        entry[1] += k["dur"] / 1e3 / replays
        entry[2] += 1 / replays
    # The kernels that cost most, by name: what "other" and "glue" are made of, for the next optimisation.
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])[:TOP_KERNELS]
    top_kernels = [{"name": name, "class": c, "ms": round(ms, 4), "launches": round(n)} for name, (c, ms, n) in top]
    one: list[tuple[str, str, str, float, float]] = []
    if kernels:
        kernels.sort(key=lambda e: e["ts"])
        n = len(kernels) // replays
        first = kernels[:n]
        base = first[0]["ts"]
        one = [(f"stream {k.get('args', {}).get('stream', '?')}", classify_kernel(k["name"])[0], k["name"][:40],
                (k["ts"] - base) / 1e3, (k["ts"] + k["dur"] - base) / 1e3) for k in first]
    span = max((e for *_, e in one), default=0.0)
    return {"decode_tokens": plan.num_decode_tokens, "prefill_tokens": plan.num_prefill_tokens,
            "per_class_ms": per_class, "per_kind_ms": per_kind, "kernel_span_ms": span,
            "forward_wall_ms": wall_ms, "top_kernels": top_kernels, "kernels": one}
