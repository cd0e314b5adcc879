"""Kernel profiling for the auto-search (paper §4.1.1): every op of a layer at token batches 128..dense.

The profiled batch is a synthetic steady-state dense batch of the workload: ``decode_rows`` decode requests at the
front (context = prompt + half the output, the steady-state average) and prefill chunks after them. Each (op, size)
is measured on rows ``[0, size)`` of layer 0 by capturing ``reps`` back-to-back launches in a CUDA graph and timing
its replays with events, so CPU launch overhead does not inflate small ops. Results are cached as JSON per
(GPU, model, dtype, TP) and the run resumes from a partial file.
"""

from __future__ import annotations

import json
import logging
import re
import statistics
from pathlib import Path
from typing import Any

import torch

from nanoflow.config import cache_root

log = logging.getLogger("nanoflow")


def cache_dir() -> Path:
    return cache_root() / "profiles"


def profile_path(gpu: str, model: str, dtype: str, tp: int) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.-]+", "-", f"{gpu}-{model}-{dtype}-tp{tp}").strip("-").lower()
    return cache_dir() / f"{slug}.json"


def synthetic_plan(engine: Any, dense: int, decode_rows: int, ctx: int, chunk: int) -> Any:
    """A dense batch of ``decode_rows`` decodes (context ``ctx``) then prefill chunks of ``chunk`` tokens."""
    from nanoflow.scheduler.batcher import BatchPlan, ScheduledSeq
    from nanoflow.scheduler.request import Request, SamplingParams

    decode, prefill, keep = [], [], []
    # Decode rows reuse 64 distinct page sets round-robin: far more than L2 holds (so reads stay HBM-bound, as in
    # serving) without needing the whole workload's KV cache.
    tables = []
    for i in range(min(decode_rows, 64)):
        r = Request(f"prof-d{i}", [1] * ctx, SamplingParams(), 0.0)
        if not engine.blocks.allocate(r, ctx + 1):
            raise RuntimeError("KV cache too small for the profiling batch; lower --decode-rows")
        keep.append(r)
        tables.append(r)
    for i in range(decode_rows):
        r = tables[i % len(tables)]
        decode.append(ScheduledSeq(f"prof-d{i}", ctx, 1, [1], True, r.block_ids, r))
    left, k = dense - decode_rows, 0
    while left > 0:
        n = min(chunk, left)
        r = Request(f"prof-p{k}", [1] * n, SamplingParams(), 0.0)
        engine.blocks.allocate(r, n)
        keep.append(r)
        prefill.append(ScheduledSeq(r.request_id, 0, n, [1] * n, True, r.block_ids, r))
        left -= n
        k += 1
    return BatchPlan(-1, decode, prefill, dense, dense, []), keep


def graph_time(fn: Any, reps: int, repeat: int = 5, device: torch.device | None = None) -> float:
    if device is not None and device.type != "cuda":  # CPU: wall clock (tests and dry runs)
        import time

        fn()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - t0) / reps * 1e3
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    times = []
    for _ in range(repeat):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps)
    return statistics.median(times)


def profile_ops(engine: Any, sizes: list[int], decode_rows: int, ctx: int, chunk: int = 1024,
                path: Path | None = None, reps: int = 5) -> dict[str, Any]:
    """``{"ops": {op: {size: ms}}, "meta": ...}``; resumes from ``path`` and saves after every op."""
    from tqdm.auto import tqdm

    from nanoflow.graphs.forward_batch import build_range_meta
    from nanoflow.models.base import StepContext

    result: dict[str, Any] = {"ops": {}, "meta": {}}
    if path is not None and path.is_file():
        result = json.loads(path.read_text())
    runner = engine.runner
    dense = max(sizes)
    plan, _keep = synthetic_plan(engine, dense, decode_rows, ctx, chunk)
    saved_graphs, runner.graphs = runner.graphs, None
    # The glue ops as the engine runs them (torch.compile'd), compiled once with dynamic row counts: per-shape
    # compilation of every (op, size) would take minutes. Uncompiled glue made the first searched plan predict a layer
    # ~20% slower than measured (commit 9111b7d). Eager on the CPU.
    from nanoflow.graphs.glue import profiling_glue

    saved_glue, runner.glue = runner.glue, profiling_glue(runner)
    try:
        batch = runner.prepare(plan)
        from nanoflow.graphs.forward_batch import HostSeq

        dec, pre, row = [], [], 0
        for s in plan.decode:
            dec.append(HostSeq(row, s.start, 1, s.block_table))
            row += 1
        for s in plan.prefill:
            pre.append(HostSeq(row, s.start, s.num_tokens, s.block_table))
            row += s.num_tokens
        for b in sizes:
            batch.ranges[(0, b)] = build_range_meta(dec, pre, 0, b, runner.device, runner.attention.name == "torch")
        runner.run_layers(batch)
        ctx0 = StepContext(layer=0, bufs=runner.bufs, batch=batch, k_cache=runner.kv_cache[0, 0],
                           v_cache=runner.kv_cache[0, 1], cos_sin=runner.cos_sin, attention=runner.attention,
                           comm=runner.comm, glue=runner.glue)
        graph = engine.model.graphs[0]
        todo = [(op, b) for op in graph.ops for b in sizes if str(b) not in result["ops"].get(op.name, {})]
        for op, b in tqdm(todo, desc="profile ops", unit="kernel"):
            ms = graph_time(lambda op=op, b=b: op.run(ctx0, 0, b), reps, device=runner.device)
            result["ops"].setdefault(op.name, {})[str(b)] = ms
            if path is not None and b == sizes[-1]:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(result, indent=1))
    finally:
        runner.graphs, runner.glue = saved_graphs, saved_glue
        for r in _keep:
            engine.blocks.free(r)
    device_name = torch.cuda.get_device_name() if runner.device.type == "cuda" else "cpu"
    result["meta"].update(decode_rows=decode_rows, ctx=ctx, chunk=chunk, dense=dense, device=device_name,
                          torch=torch.__version__)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
    return result
