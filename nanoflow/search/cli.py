"""``nanoflow search``: profile (on a GPU, or read saved profiles) -> stage I MILP -> stage II MILP -> PipelineSpec.

Writes the spec JSON and a Gantt PNG of the planned pipeline. From saved profiles the search runs on a CPU.
A feasible plan comes within seconds (warm start from the sequential schedule); ``--time-limit`` bounds the rest.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

from nanoflow.bench.cli import decode_options
from nanoflow.config import DECODE_CHOICES

log = logging.getLogger("nanoflow")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("search", help="auto-search a nano-batch pipeline (profiling + two-stage MILP)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", help="built-in short name or HF folder")
    p.add_argument("--dense-batch", type=int, default=2048, help="tokens per iteration")
    p.add_argument("--workload", default="constant:1024:512",
                   help="constant:IN:OUT or splitwise/lmsys/sharegpt: sets the profiled decode/prefill mix")
    p.add_argument("--step", type=int, default=128, help="profiled batch sizes: step, 2*step, ..., dense")
    p.add_argument("--profile", default=None, help="saved profile JSON (default: the cache, else profile now on a GPU)")
    p.add_argument("--decode-rows", type=int, default=None,
                   help="decode requests in the profiled batch (default: dense * OUT / (IN + OUT))")
    p.add_argument("--rp-table", default=None,
                   help="interference JSON from scripts/device/interference.py for the memory R->P table "
                        "(default: the profile's, else the paper's Table 3)")
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds for both MILP stages together")
    p.add_argument("--max-split", type=int, default=4, help="most nano-operations per op")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (adds the all-reduce ops)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=("auto", "fp8"),
                   help="KV-cache element type the GPU profile is made with (decode attention reads it); fp8 "
                        "profiles and specs are cached apart from the others")
    p.add_argument("--decode-options", type=decode_options, default=None, metavar="KEY=INT[,KEY=INT...]",
                   help="decode-attention kernel options the GPU profile is made with (as nanoflow bench "
                        "--decode-options: block_n, num_warps, num_stages, prefetch, f16_tiles); use the ones the "
                        "engine will run")
    p.add_argument("--decode-variant", default="auto", choices=DECODE_CHOICES,
                   help="decode-attention kernel the GPU profile is made with (as nanoflow bench --decode-variant; "
                        "auto: the CUDA kernel where it applies and nvcc builds it, else split); profiles made with "
                        "another kernel than split are cached apart")
    p.add_argument("--output", default=None, help="spec path (default: the cache, keyed by GPU/model/dense/workload)")
    p.add_argument("--no-verify", dest="verify", action="store_false",
                   help="on a GPU, skip measuring the sequential and the searched pipeline's forward on the profiled "
                        "batch (by default both are measured, the prediction's error is recorded in the spec's meta, "
                        "and the faster of the two is kept)")
    return p


class _AnyWeights(dict):
    """Weights stand-in: the search needs the ops' names, kinds and buffers, never their kernels."""

    def __missing__(self, key: str) -> None:
        return None


def layer_graph(model: str, tp: int) -> Any:
    """The model's decoder-layer graph (dense LLaMA-family, or Mixtral's attention + router + experts)."""
    from nanoflow.config import ModelSpec
    from nanoflow.models.layers import llama_layer_graph
    from nanoflow.models.mixtral import mixtral_layer_graph

    spec = ModelSpec.load(model)
    heads, kv_heads = spec.num_heads // tp, max(1, spec.num_kv_heads // tp)
    if spec.is_moe:
        return spec, mixtral_layer_graph(_AnyWeights(), 0, heads, kv_heads, spec.head_dim, spec.rms_norm_eps,
                                         spec.num_experts_per_tok, tp > 1)
    return spec, llama_layer_graph(_AnyWeights(), 0, heads, kv_heads, spec.head_dim, spec.rms_norm_eps, tp > 1)


def workload_lengths(workload: str) -> tuple[float, float]:
    from nanoflow.data.datasets import TABLE4_DISTRIBUTIONS

    if workload.startswith("constant:"):
        _, a, b = workload.split(":")[:3]
        return float(a), float(b)
    d = TABLE4_DISTRIBUTIONS[workload]
    return d.input_mean, d.output_mean


def rp_from_interference(path: str) -> dict[str, list[tuple[float, float]]]:
    from nanoflow.search.problem import RP_TABLE_PAPER

    data = json.loads(Path(path).read_text())
    tables = [r["rp_table"] for r in data.get("results", []) if r.get("rp_table")]
    out = dict(RP_TABLE_PAPER)
    if tables:
        out["memory"] = [tuple(p) for p in tables[0]]
    return out


def run(args: argparse.Namespace) -> int:
    from nanoflow.search.problem import load_profile, problem_from_graph
    from nanoflow.search.stage1 import solve_stage1
    from nanoflow.search.stage2 import solve_stage2

    spec, graph = layer_graph(args.model, args.tp)
    p_in, p_out = workload_lengths(args.workload)
    decode_rows = args.decode_rows or int(args.dense_batch * p_out / (p_in + p_out))
    ctx = int(p_in + p_out / 2)
    sizes = list(range(args.step, args.dense_batch + 1, args.step))
    profile = load_profile(args.profile) if args.profile else None
    if profile is not None:
        decode_rows = profile.get("meta", {}).get("decode_rows", decode_rows)
        ctx = profile.get("meta", {}).get("ctx", ctx)
    # The GPU engine profiles the ops (unless a profile was given) and then times the candidate pipelines.
    engine = _gpu_engine(args, ctx) if profile is None or (args.verify and args.tp == 1) else None
    try:
        if profile is None:
            if engine is None:
                print("no profile: pass --profile FILE (made on a GPU by `nanoflow search` or "
                      "nanoflow.search.profiler), or run on a CUDA GPU", file=sys.stderr)
                return 2
            profile = _profile_ops(engine, args, sizes, decode_rows, ctx)
        rp = rp_from_interference(args.rp_table) if args.rp_table else None
        problem = problem_from_graph(graph, args.dense_batch, profile, rp_table=rp)
        t0 = time.perf_counter()
        s1 = solve_stage1(problem, max_split=args.max_split, time_limit_s=args.time_limit * 0.7)
        s2 = solve_stage2(problem, s1, time_limit_s=max(5.0, args.time_limit - (time.perf_counter() - t0)))
        wall = time.perf_counter() - t0
        verify = None
        if engine is not None and args.verify and args.tp == 1:
            from nanoflow.search.verify import compare, measure_layer_ms

            measured = measure_layer_ms(engine, {"sequential": None, "stage2": s2.spec}, decode_rows, ctx)
            verify = compare({"sequential": problem.sequential_ms, "stage2": s2.makespan_ms}, measured)
    finally:
        if engine is not None:
            engine.close()
    return _write(args, graph, problem, s1, s2, wall, verify)


def _write(args: argparse.Namespace, graph: Any, problem: Any, s1: Any, s2: Any, wall: float,
           verify: dict[str, dict[str, float]] | None) -> int:
    """Keep the stage II plan or the sequential one, save it with the search's figures, draw its Gantt chart."""
    from nanoflow.graphs.pipeline import PipelineSpec
    from nanoflow.search.plot import plot_gantt

    if verify:
        # Measured on the GPU: keep whichever pipeline ran faster, whatever the prediction said.
        keep_stage2 = verify["stage2"]["measured_ms"] < verify["sequential"]["measured_ms"]
        basis = "measured"
    else:
        # With interference priced in, overlapping may lose: then the honest answer is the sequential pipeline.
        keep_stage2 = s2.makespan_ms <= problem.sequential_ms
        basis = "predicted"
    result = s2.spec if keep_stage2 else _timed_sequential(PipelineSpec.sequential(graph, args.dense_batch), problem)
    if not keep_stage2:
        log.info("stage II plan is slower than sequential (%s): keeping the sequential pipeline", basis)
    result.meta.update(
        chosen="stage2" if keep_stage2 else "sequential", chosen_by=basis,
        search={"stage1_ms": s1.makespan_ms, "stage2_ms": s2.makespan_ms, "sequential_ms": problem.sequential_ms,
                "wall_s": wall, "status1": s1.status, "status2": s2.status, "workload": args.workload,
                "model": args.model, "kv_cache_dtype": getattr(args, "kv_cache_dtype", "auto"),
                "decode_variant": getattr(args, "decode_variant", "auto"),
                **({"verify": verify} if verify else {})})
    out = Path(args.output) if args.output else _default_output(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.save(out)
    png = out.with_suffix(".png")
    chosen_ms = s2.makespan_ms if keep_stage2 else problem.sequential_ms
    plot_gantt(result, None, png, f"{args.model} dense {args.dense_batch}: chosen layer plan {chosen_ms:.2f} ms "
               f"(stage II {s2.makespan_ms:.2f} ms, sequential {problem.sequential_ms:.2f} ms)", graph=graph)
    summary = {"spec": str(out), "gantt": str(png), "sequential_ms": problem.sequential_ms,
               "stage1_ms": s1.makespan_ms, "stage2_ms": s2.makespan_ms, "search_wall_s": round(wall, 1),
               "nano_counts": s1.nano_counts, "chosen": result.meta["chosen"], "chosen_by": basis}
    if verify:
        summary["verify"] = verify
    print(json.dumps(summary, indent=2))
    return 0


def _timed_sequential(spec: Any, problem: Any) -> Any:
    """The sequential spec with its profiled start/end times filled in (so its Gantt chart can be drawn)."""
    from dataclasses import replace

    t, nano = 0.0, []
    for n in spec.nano_ops:
        d = problem.time(n.op, n.hi - n.lo)
        nano.append(replace(n, start_ms=t, end_ms=t + d))
        t += d
    return replace(spec, nano_ops=tuple(nano))


def _default_output(args: argparse.Namespace) -> Path:
    from nanoflow.search.profiler import cache_dir

    tags = _spec_tags(getattr(args, "kv_cache_dtype", "auto"), getattr(args, "decode_variant", "auto"))
    name = f"{args.model}-d{args.dense_batch}-{args.workload.replace(':', '_')}{tags}-tp{args.tp}.json"
    return cache_dir().parent / "pipelines" / name


def _kv_tag(kv_cache_dtype: str) -> str:
    """``-kvfp8`` for float8-KV profiles and specs (their decode attention reads half the bytes), else nothing."""
    return "" if kv_cache_dtype == "auto" else f"-kv{kv_cache_dtype}"


def _spec_tags(kv_cache_dtype: str, decode_variant: str | None) -> str:
    """A searched spec's name tags: the KV-cache dtype's (:func:`_kv_tag`), then ``-dec<variant>`` when the search
    ran with a decode-attention kernel named by ``--decode-variant`` (not ``auto``): its plan was timed with that
    kernel, so only an engine asking for the same kernel picks it up."""
    dec = "" if decode_variant in (None, "auto") else f"-dec{decode_variant}"
    return _kv_tag(kv_cache_dtype) + dec


def cached_pipeline(model: str, dense: int, tp: int, kv_cache_dtype: str = "auto",
                    decode_variant: str | None = "auto") -> Path | None:
    """The newest searched spec in the cache for (model, dense batch, TP, KV-cache dtype, decode variant), any
    workload; None if there is none."""
    import re

    from nanoflow.search.profiler import cache_dir

    folder = cache_dir().parent / "pipelines"
    if not folder.is_dir():
        return None
    model = Path(model).name
    # model-d<dense>-<workload>[-kv<dtype>][-dec<variant>]-tp<tp>.json; the tags must be exactly this engine's
    pattern = re.compile(rf"{re.escape(model)}-d{dense}-.+?((?:-kv[a-z0-9]+)?(?:-dec[a-z0-9_]+)?)-tp{tp}\.json")
    want = _spec_tags(kv_cache_dtype, decode_variant)
    found = sorted((p for p in folder.glob(f"{model}-d{dense}-*-tp{tp}.json")
                    if (m := pattern.fullmatch(p.name)) is not None and m.group(1) == want),
                   key=lambda p: p.stat().st_mtime)
    return found[-1] if found else None


def _gpu_engine(args: argparse.Namespace, ctx: int) -> Any:
    """A dummy-weight engine for profiling and timing on the GPU, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    from nanoflow.config import EngineArgs
    from nanoflow.engine.engine import Engine

    kv = 64 * (ctx + 16) + args.dense_batch * 2 + 4096
    extra = {"decode_options": args.decode_options} if getattr(args, "decode_options", None) else {}
    extra["decode_variant"] = getattr(args, "decode_variant", "auto")
    return Engine(EngineArgs(model=args.model, load_format="dummy", dtype="bfloat16", device="cuda",
                             dense_batch_size=args.dense_batch, kv_cache_tokens=kv, max_model_len=ctx + 64,
                             kv_cache_dtype=args.kv_cache_dtype, extra=extra))


def _profile_ops(engine: Any, args: argparse.Namespace, sizes: list[int], decode_rows: int, ctx: int) -> dict:
    import torch

    from nanoflow.search.profiler import profile_ops, profile_path

    variant = getattr(engine.runner.attention, "decode_variant", "split")  # what "auto" resolved to
    tag = "bfloat16" + _kv_tag(args.kv_cache_dtype) + ("" if variant == "split" else f"-{variant}")
    path = profile_path(torch.cuda.get_device_name(), args.model, tag, args.tp)
    return profile_ops(engine, sizes, decode_rows, ctx, path=path)
