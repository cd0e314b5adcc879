"""``nanoflow bench`` under tensor parallelism: every rank runs every mode in lockstep, rank 0 measures and writes.

    torchrun --nproc-per-node 2 -m nanoflow.bench.tp --tp 2 --model llama-3-70b --modes non-overlap,overlap-preset

(the same flags as ``nanoflow bench`` plus ``--tp``; ``nanoflow bench --tp N`` can forward here via :func:`run_tp`).
Every rank loads its shard of the dummy weights; ranks > 0 then sit in ``engine.distributed.follow`` building,
capturing and running exactly what rank 0 announces. Rank 0 runs each mode through a ``DistributedEngine`` with
one KV capacity for all modes (the minimum over ranks), and writes ``<output>.json`` / ``.png``. Throughput is the
whole group's; ``pct_optimal`` divides it by ``tp`` x the per-GPU optimum (paper eq. 5 with N GPUs). The per-op
profile (``--profile``) and the transformers peer run on one GPU only and are not run here.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from nanoflow.config import ADMISSION_PACE

log = logging.getLogger("nanoflow")


def _mode_args(ea: Any, mode: str, searched: str | None, preset: str | None) -> Any:
    """The mode's engine args; the overlap-preset* modes run ``preset`` (default: the model's TP preset)."""
    from nanoflow.bench.throughput import mode_args

    args = mode_args(ea, mode, searched)
    return replace(args, pipeline=preset) if preset and mode.startswith("overlap-preset") else args


def _run_mode(args: Any, parts: dict[str, Any], comm: Any, reqs: list[tuple[list[int], int]],
              warm: list[tuple[list[int], int]]) -> dict[str, Any]:
    """One mode on all ranks (rank 0 drives): build, capture, warm up, time; the engine is closed on every rank."""
    import torch

    from nanoflow.bench.throughput import run_record
    from nanoflow.engine.distributed import DistributedEngine
    from nanoflow.graphs.glue import recompile_limit_hits
    from nanoflow.scheduler.request import SamplingParams

    hits_before = recompile_limit_hits()
    t_build = time.perf_counter()
    engine = DistributedEngine(args, comm, parts)
    try:
        warm_t0 = time.perf_counter()
        engine.capture_all()
        for ids, n in warm:
            engine.add_request(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        engine.run_until_done()
        warm_s = time.perf_counter() - warm_t0
        engine.stats_iterations = engine.stats_tokens = engine.stats_preemptions = 0
        engine.stats_sched_s = engine.stats_launch_s = engine.stats_wall_s = 0.0
        outs = [engine.add_request(ids, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
                for ids, n in reqs]
        if comm.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.run_until_done()
        wall = time.perf_counter() - t0
        return run_record(engine, outs, reqs, wall, warm_s, warm_t0 - t_build, hits_before)
    finally:
        engine.close()


def run_tp(args: argparse.Namespace) -> int:
    """The bench on ``args.tp`` ranks (launched by torchrun / accelerate); rank 0 returns 0 once results are written."""
    import torch

    from nanoflow.bench import git_commit
    from nanoflow.bench.measure import gemm_peak
    from nanoflow.bench.throughput import base_args, workload
    from nanoflow.engine.builder import kv_token_bytes, load_parts
    from nanoflow.engine.distributed import follow, stop_followers
    from nanoflow.ops.comm import init_from_env

    if not torch.cuda.is_available():
        print("nanoflow bench needs CUDA GPUs", file=sys.stderr)
        return 2
    comm = init_from_env("cuda", expected_world_size=args.tp)
    if comm is None:
        print(f"--tp {args.tp}: launch with torchrun --nproc-per-node {args.tp} -m nanoflow.bench.tp ...",
              file=sys.stderr)
        return 2
    ea = base_args(args.model, args.dense_batch_size, args.seed, args.kv_cache_tokens, args.max_num_seqs,
                   getattr(args, "kv_cache_dtype", "auto"),
                   admission_pace=getattr(args, "admission_pace", ADMISSION_PACE))
    ea = replace(ea, block_size=getattr(args, "block_size", 16),
                 batch_invariant=bool(getattr(args, "batch_invariant", False)))
    ea.extra["decode_ctas_per_sm"] = args.decode_ctas_per_sm
    ea.extra["decode_variant"] = getattr(args, "decode_variant", "auto")
    backends = getattr(args, "moe_backend", ["auto"])
    if len(backends) > 1:
        log.warning("--tp runs one MoE backend; using %s (drop the others)", backends[0])
    ea.extra["moe_backend"] = backends[0]
    if args.memory_share is not None:
        ea.extra["memory_share"] = args.memory_share
    ea = replace(ea, tp=args.tp, device=str(comm.device))
    t0 = time.perf_counter()
    parts = load_parts(ea, comm.device, comm.rank, comm.world_size)
    log.info("rank %d: weights ready in %.1f s", comm.rank, time.perf_counter() - t0)
    if ea.kv_cache_tokens is None:  # one capacity for every mode and rank, so the modes' batches are comparable
        per_token = kv_token_bytes(ea, parts, comm.device)
        mine = int(args.kv_fraction * torch.cuda.mem_get_info()[0] / per_token)
        ea = replace(ea, kv_cache_tokens=min(comm.all_gather_object(mine)))
    if not comm.is_leader:
        follow(comm, parts)
        comm.close()
        return 0
    try:
        records = _lead(args, ea, parts, comm, gemm_peak, workload, git_commit())
    finally:
        stop_followers(comm)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(records, indent=2, default=str))
    from nanoflow.bench.plots import plot_bench

    plot_bench(records, {}, out)
    print(f"wrote {out.with_suffix('.json')}")
    return 0


def _lead(args: argparse.Namespace, ea: Any, parts: dict[str, Any], comm: Any, gemm_peak: Any, workload: Any,
          commit: str) -> list[dict[str, Any]]:
    import torch

    spec = parts["model"].spec
    peak = gemm_peak(spec, args.dense_batch_size, parts["dtype"], comm.device, tp=args.tp)
    optimal_per_gpu = peak["peak_tflops"] * 1e12 / (2 * spec.active_params)
    optimal = args.tp * optimal_per_gpu
    max_len = min(spec.max_position_embeddings, 8192)
    reqs = workload(args.workload, args.num_requests, spec.vocab_size, args.seed, max_len)
    ea = replace(ea, max_model_len=max_len)
    in_len = max(1, sum(len(r[0]) for r in reqs) // len(reqs))
    n_warm = args.warmup_requests or args.dense_batch_size // in_len + 4
    warm = [(ids, min(n, 16)) for ids, n in workload(args.workload, n_warm, spec.vocab_size, args.seed + 1, max_len)]
    common = {"device": f"{args.tp}x {torch.cuda.get_device_name()}", "torch": torch.__version__, "commit": commit,
              "command": "torchrun -m nanoflow.bench.tp " + " ".join(sys.argv[1:]), "model": args.model,
              "tp": args.tp, "workload": args.workload, "dense_batch": args.dense_batch_size,
              "peak_tflops": peak["peak_tflops"], "optimal_tok_s": optimal, "optimal_per_gpu_tok_s": optimal_per_gpu,
              "gemm": peak, "host": platform.node(), "nccl_channels": comm.settings.nccl_channels}
    records: list[dict[str, Any]] = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        log.info("mode %s (tp=%d) ...", mode, args.tp)
        try:
            rec = _run_mode(_mode_args(ea, mode, args.searched_spec, args.overlap_preset), parts, comm, reqs, warm)
        except Exception as exc:  # keep the other modes' figures (a failure inside a forward ends the run instead)
            log.exception("mode %s failed", mode)
            rec = {"error": repr(exc)}
        rec.update(common, mode=mode, requests=len(reqs))
        if "throughput_tok_s" in rec:
            rec["throughput_per_gpu_tok_s"] = rec["throughput_tok_s"] / args.tp
            rec["pct_optimal"] = 100.0 * rec["throughput_tok_s"] / optimal
            print(f"{mode:>22}: {rec['throughput_tok_s']:10.0f} tok/s ({rec['throughput_per_gpu_tok_s']:.0f}/GPU) "
                  f"{rec['pct_optimal']:5.1f}% of optimal, iter {rec['iteration_ms']:.1f} ms", flush=True)
        else:
            print(f"{mode:>22}: FAILED {rec.get('error')}", flush=True)
        records.append(rec)
    return records


def main(argv: list[str] | None = None) -> int:
    from nanoflow.bench.cli import add_parser

    parser = argparse.ArgumentParser(prog="python -m nanoflow.bench.tp")
    sub = parser.add_subparsers(dest="command")
    bench = add_parser(sub)
    if not any(a.dest == "tp" for a in bench._actions):
        bench.add_argument("--tp", type=int, default=2, help="tensor-parallel degree (= processes launched)")
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    logging.basicConfig(level="INFO", format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return run_tp(args)


if __name__ == "__main__":
    sys.exit(main())
