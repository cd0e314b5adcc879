"""``nanoflow bench``: offline throughput on a GPU across modes, with % of optimal (paper eq. 5) and a peer.

Writes ``<output>.json`` (one record per mode, the schema of ``../shared/BENCHMARKING.md``) and ``<output>.png``.
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

from nanoflow.config import (
    ADMISSION_PACE,
    ADMISSION_PACE_HELP,
    BATCH_INVARIANT_HELP,
    DECODE_CHOICES,
    DECODE_OPTION_KEYS,
    DTYPES,
    GPU_MEMORY_UTILIZATION_HELP,
    KV_CACHE_DTYPE_HELP,
    KV_CACHE_DTYPES,
    PACED_MARGIN,
    ConfigError,
)
from nanoflow.engine.flags import memory_fraction

log = logging.getLogger("nanoflow")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="throughput benchmark on a GPU (modes, %% of optimal, peer)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-3-8b", help="built-in short name (dummy weights) or HF folder")
    p.add_argument("--workload", default="constant:1024:512",
                   help="dataset spec: constant:IN:OUT, splitwise, lmsys, sharegpt, or a file (see run-offline)")
    p.add_argument("--num-requests", type=int, default=256, help="requests in the timed run")
    p.add_argument("--warmup-requests", type=int, default=0,
                   help="requests of a warm-up round before timing (captures graphs); default: dense/IN + 4")
    p.add_argument("--dense-batch-size", type=int, default=2048, help="tokens per iteration")
    p.add_argument("--max-num-seqs", type=int, default=None, help="most running requests (decode capacity)")
    p.add_argument("--admission-pace", type=float, default=ADMISSION_PACE,
                   help=f"{ADMISSION_PACE_HELP}. Mode non-overlap-paced runs non-overlap with this pacing, or "
                        f"{PACED_MARGIN} where it is 0")
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv-cache-tokens", type=int, default=None,
                    help="KV capacity; default: --kv-fraction of free")
    kv.add_argument("--gpu-memory-utilization", type=memory_fraction, default=None,
                    help=GPU_MEMORY_UTILIZATION_HELP + ". Here: one probe before the first mode sizes the cache of "
                         "every mode (record field memory_profile); overrides --kv-fraction")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES,
                   help="weights and activations (dummy weights). float32 is for correctness runs: with bf16, greedy "
                        "outputs of random weights (near-tied logits) differ between modes whose GEMMs split the "
                        "batch differently; in float32 the modes' outputs (tokens_vs_reference) should agree. "
                        "%% of optimal is then against the float32 GEMM peak")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES, help=KV_CACHE_DTYPE_HELP)
    p.add_argument("--batch-invariant", action="store_true",
                   help=BATCH_INVARIANT_HELP + ". Here: every mode then computes each request's tokens alike, so "
                        "tokens_vs_reference shows whether nano-batching or overlap changes any output (with the "
                        "default kernels the split's rounding changes near-tied outputs of random weights)")
    p.add_argument("--no-fused-rope-kv", dest="fused_rope_kv", action="store_false",
                   help="run RoPE and the KV-cache write as separate (compiled) ops instead of the one Triton kernel "
                        "of ops/rope_kv.py, to measure what the fusion gains")
    p.add_argument("--kv-fraction", type=float, default=0.6,
                   help="fraction of the GPU memory free after the weights given to the KV cache (same for all modes)")
    p.add_argument("--modes", default="non-overlap",
                   help="comma list of: non-overlap, non-overlap-eager, non-overlap-sync, non-overlap-paced "
                        "(admission pacing on), nano-batch, "
                        "overlap-preset, overlap-preset-{partition,green,nogrid}, overlap-searched, "
                        "overlap-searched-{grid,partition} (the suffix names the resource knob; plain = decode grid "
                        "for the preset, none for the searched spec)")
    p.add_argument("--passes", type=int, default=1,
                   help="run the mode list this many times, every other pass in reverse order (A B B A for two "
                        "modes), so that no mode always runs first on a cool GPU or last on a warm one; every pass "
                        "is a record (field pass, label MODE-passN) and each mode's mean is printed")
    p.add_argument("--memory-share", type=float, default=None,
                   help="override the spec's shares: partitioned memory-bound nano-ops get this share of the SMs, "
                        "the compute-bound ones beside them the rest (sweeps the split without editing a spec)")
    p.add_argument("--decode-ctas-per-sm", type=int, default=2,
                   help="decode-attention programs per SM of its share under the grid/partition knobs")
    p.add_argument("--decode-variant", default="auto", choices=DECODE_CHOICES,
                   help="decode-attention kernel: auto (cuda where it applies and nvcc can build it, else split), "
                        "split (one program per row and kv head), row (one per row, all "
                        "kv heads, whole-page tiles, batched 3-D dots), row_flat (the same with 2-D dots), packed "
                        "(one per row and group of kv heads, their query heads as the rows of block-diagonal dots; "
                        "--decode-options head_group=N sets the group) or cuda (the hand-written CUDA kernel for a "
                        "float8 cache, --kv-cache-dtype fp8; built with nvcc on first use)")
    p.add_argument("--moe-backend", type=moe_backends, default=["auto"], metavar="NAME[,NAME...]",
                   help="grouped GEMM of MoE models' experts: triton (nanoflow's kernel), torch (torch._grouped_mm, "
                        "PyTorch's CUTLASS kernel) or auto (time both once per shape while warming up, keep the "
                        "faster; the picks are saved in the results as grouped_mm_choices). Several, comma-"
                        "separated, run every mode once per backend on the same weights (records labelled "
                        "MODE-moe-NAME)")
    p.add_argument("--decode-options", type=decode_options, default=None, metavar="KEY=INT[,KEY=INT...]",
                   help="decode-attention kernel tiles, e.g. block_n=128,num_warps=8,num_stages=3,prefetch=1 (keys: "
                        "block_n, num_warps, num_stages, prefetch = load the next K/V tile before computing on this "
                        "one, f16_tiles=0 = widen a float8 cache to bf16 instead of float16, tma=1 = copy each "
                        "K/V page by TMA, one page per tile (pair it with --block-size), tma=2 = the same, "
                        "warp-specialised, head_group = kv heads per program of the packed variant; default: the "
                        "kernel's own choice)")
    p.add_argument("--block-size", type=int, default=16,
                   help="tokens per KV-cache page (a power of two); with --decode-options tma=1 also the decode tile")
    p.add_argument("--searched-spec", default=None,
                   help="PipelineSpec JSON (or a preset's name) for the overlap-searched* modes")
    p.add_argument("--overlap-preset", default=None,
                   help="preset used by the overlap-preset* modes; default the model's own: llama-8b-overlap, "
                        "llama-70b-tp-overlap under --tp, mixtral-overlap / mixtral-tp-overlap for MoE models")
    p.add_argument("--peer", default=None, choices=["transformers"], help="also run this peer engine")
    p.add_argument("--peer-requests", type=int, default=64, help="requests for the peer (it is slow)")
    p.add_argument("--profile", action="store_true", help="per-op CUDA-event profile of a steady-state batch")
    p.add_argument("--output", default="benchmarks/results/bench", help="path prefix for .json and .png")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and workload")
    p.add_argument("--tp", type=int, default=1,
                   help="tensor-parallel degree; launch with torchrun --nproc-per-node N (rank 0 writes results)")
    return p


def decode_options(text: str) -> dict[str, int]:
    """``block_n=128,num_warps=8`` -> ``{"block_n": 128, "num_warps": 8}`` (argparse type of --decode-options)."""
    out: dict[str, int] = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or key not in DECODE_OPTION_KEYS or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(
                f"{item!r}: write KEY=INT with KEY one of {', '.join(DECODE_OPTION_KEYS)}, e.g. block_n=128")
        out[key] = int(value)
    return out


def moe_backends(text: str) -> list[str]:
    """``triton,auto`` -> ``["triton", "auto"]`` (argparse type of --moe-backend)."""
    from nanoflow.config import MOE_BACKENDS

    names = [t.strip() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in MOE_BACKENDS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"{text!r}: name one or more of {', '.join(MOE_BACKENDS)}, comma-separated")
    return list(dict.fromkeys(names))


def run(args: argparse.Namespace) -> int:
    import torch

    from nanoflow.bench import git_commit
    from nanoflow.bench.measure import gemm_peak
    from nanoflow.bench.throughput import base_args, clock_monitor, compare_with_earlier, mode_args, run_mode, workload
    from nanoflow.config import builtin_config_path
    from nanoflow.engine.builder import kv_token_bytes, load_parts

    passes = getattr(args, "passes", 1)
    mode_runs(args.modes, ["auto"], passes)  # a bad --modes / --passes fails before any loading
    if not torch.cuda.is_available():
        print("nanoflow bench needs a CUDA GPU", file=sys.stderr)
        return 2
    if args.tp > 1 and args.gpu_memory_utilization is not None:
        print("nanoflow bench: --gpu-memory-utilization measures one GPU; with --tp give --kv-cache-tokens or "
              "--kv-fraction", file=sys.stderr)
        return 2
    if args.tp > 1:
        from nanoflow.bench.tp import run_tp

        return run_tp(args)
    device = torch.device("cuda")
    ea = base_args(args.model, args.dense_batch_size, args.seed, args.kv_cache_tokens, args.max_num_seqs,
                   args.kv_cache_dtype, getattr(args, "dtype", "bfloat16"), args.admission_pace)
    ea.extra["decode_ctas_per_sm"] = args.decode_ctas_per_sm
    ea.extra["decode_variant"] = getattr(args, "decode_variant", "auto")
    if getattr(args, "decode_options", None):
        ea.extra["decode_options"] = args.decode_options
    if args.memory_share is not None:
        ea.extra["memory_share"] = args.memory_share
    ea.extra["fused_rope_kv"] = bool(getattr(args, "fused_rope_kv", True))
    # replace() checks the options together (e.g. --batch-invariant with --decode-options is refused)
    ea = replace(ea, block_size=args.block_size, batch_invariant=bool(getattr(args, "batch_invariant", False)))
    t0 = time.perf_counter()
    parts = load_parts(ea, device)
    spec = parts["model"].spec
    log.info("weights ready in %.1f s", time.perf_counter() - t0)
    max_len = min(spec.max_position_embeddings, 8192)
    memory_profile = None
    if ea.kv_cache_tokens is None and args.gpu_memory_utilization is not None:  # one capacity for every mode
        from nanoflow.engine.memory_profile import profile_kv_cache

        prof = profile_kv_cache(replace(ea, gpu_memory_utilization=args.gpu_memory_utilization,
                                        max_model_len=max_len), parts, device)
        memory_profile = prof.summary()
        ea = replace(ea, kv_cache_tokens=prof.kv_tokens)
    elif ea.kv_cache_tokens is None:  # one capacity for every mode, so their batches are comparable
        per_token = kv_token_bytes(ea, parts, device)
        ea = replace(ea, kv_cache_tokens=int(args.kv_fraction * torch.cuda.mem_get_info()[0] / per_token))
    monitor = clock_monitor(interval_s=0.005)  # the peak is a short burst: its clocks explain run-to-run spread
    peak = gemm_peak(spec, args.dense_batch_size, parts["dtype"], device)
    if monitor is not None:
        monitor.stop()
        peak["gpu_clocks"] = monitor.summary()
    optimal = peak["peak_tflops"] * 1e12 / (2 * spec.active_params)
    reqs = workload(args.workload, args.num_requests, spec.vocab_size, args.seed, max_len)
    ea = replace(ea, max_model_len=max_len)
    in_len = max(1, sum(len(r[0]) for r in reqs) // len(reqs))
    n_warm = args.warmup_requests or args.dense_batch_size // in_len + 4
    warm = workload(args.workload, n_warm, spec.vocab_size, args.seed + 1, max_len)
    warm = [(ids, min(n, 16)) for ids, n in warm]
    common = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "commit": git_commit(),
              "command": "nanoflow bench " + " ".join(sys.argv[2:] if sys.argv[1:2] == ["bench"] else sys.argv[1:]),
              "model": args.model, "tp": 1, "workload": args.workload, "dense_batch": args.dense_batch_size,
              "dtype": str(parts["dtype"]).removeprefix("torch."), "batch_invariant": ea.batch_invariant,
              "fused_rope_kv": ea.extra["fused_rope_kv"], "peak_tflops": peak["peak_tflops"], "optimal_tok_s": optimal,
              "gemm": peak, "memory_profile": memory_profile,
              "host": platform.node()}
    records: list[dict[str, Any]] = []
    timelines: dict[str, Any] = {}
    backends = args.moe_backend if spec.is_moe else ["auto"]  # each run sets its own extra["moe_backend"]
    runs = mode_runs(args.modes, backends, passes)
    outputs: dict[str, list[list[int]]] = {}  # each finished mode's greedy outputs, the first the reference
    reference_ms: dict[str, float] | None = None  # one layer's per-op ms measured alone (the first sequential mode)
    for mode, backend, pass_no in runs:
        label = mode if len(backends) == 1 else f"{mode}-moe-{backend}"
        if passes > 1:
            label = f"{label}-pass{pass_no}"
        log.info("mode %s ...", label)
        try:
            margs = mode_args(replace(ea, extra={**ea.extra, "moe_backend": backend}), mode, args.searched_spec)
            if mode.startswith("overlap-preset") and args.overlap_preset:  # else the model's own (mode_args)
                margs = replace(margs, pipeline=args.overlap_preset)
            rec = run_mode(margs, parts, reqs, warm, args.profile)
        except Exception as exc:  # one failing mode must not lose the others' figures
            log.exception("mode %s failed", label)
            rec = {"error": repr(exc)}
        timelines[label] = rec.pop("_records", None)
        nano = rec.pop("_nano", None)
        if nano is not None:
            reference_ms = reference_ms or _reference_op_ms(rec, nano)
            if reference_ms:
                rec.update(_planned_vs_measured(label, rec, nano, reference_ms, Path(args.output)))
        tokens = rec.pop("_tokens", None)
        if tokens is not None:
            rec.update(compare_with_earlier(outputs, label, tokens))
        rec.update(common, mode=mode, requests=len(reqs))
        if label != mode:
            rec["label"] = label
        if passes > 1:
            rec["pass"] = pass_no
        if spec.is_moe:
            from nanoflow.ops.moe import grouped_mm_choices

            rec["moe_backend"] = backend
            if backend == "auto":  # the picks this run used (made now or by an earlier auto run in this process)
                rec["grouped_mm_choices"] = grouped_mm_choices()
        if "throughput_tok_s" in rec:
            rec["pct_optimal"] = 100.0 * rec["throughput_tok_s"] / optimal
        records.append(rec)
        _print_row(rec)
        _save(records, args.output)  # after every mode: a run cut short keeps what it measured
    if passes > 1:
        print_pass_means(records)
    if args.peer == "transformers":
        from nanoflow.bench.peer import run_peer

        try:
            rec = run_peer(str(builtin_config_path(args.model)), spec, parts["model"].weights,
                           reqs[: args.peer_requests])
        except Exception as exc:
            log.exception("peer failed")
            rec = {"error": repr(exc)}
        rec.update(common, mode="peer-transformers")
        if "throughput_tok_s" in rec:
            rec["pct_optimal"] = 100.0 * rec["throughput_tok_s"] / optimal
        records.append(rec)
        _print_row(rec)
    out = _save(records, args.output)
    from nanoflow.bench.plots import plot_bench

    try:
        plot_bench(records, timelines, out)
    except Exception:  # a picture must not fail a run whose records are saved
        log.exception("the throughput chart or a Gantt chart failed")
    from nanoflow.bench.iterations import plot_iterations

    try:
        plot_iterations(records, out.with_name(out.name + "-iterations.png"))
    except Exception:  # a picture must not fail a run whose records are saved
        log.exception("the per-step chart failed")
    print(f"wrote {out.with_suffix('.json')}")
    return 0


def mode_runs(modes: str, backends: list[str], passes: int = 1) -> list[tuple[str, str, int]]:
    """(mode, MoE backend, pass) in run order: the comma list ``modes`` for each backend, ``passes`` times, every
    other pass reversed (A B B A ...), so that each mode runs early and late alike."""
    if passes < 1:
        raise ConfigError(f"--passes must be >= 1, got {passes}")
    names = [m.strip() for m in modes.split(",") if m.strip()]
    if not names:
        raise ConfigError("--modes names no mode; e.g. --modes non-overlap,overlap-preset")
    once = [(mode, b) for b in backends for mode in names]
    return [(mode, b, k + 1) for k in range(passes) for mode, b in (once if k % 2 == 0 else once[::-1])]


def print_pass_means(records: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each mode's mean over its passes (tok/s and % of optimal), printed; the records keep every pass."""
    runs: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        if "throughput_tok_s" in r:
            runs.setdefault(str(r.get("label", r["mode"])).rsplit("-pass", 1)[0], []).append(r)
    means = {}
    for name, rs in runs.items():
        means[name] = {"passes": len(rs), "throughput_tok_s": sum(r["throughput_tok_s"] for r in rs) / len(rs),
                       "pct_optimal": sum(r["pct_optimal"] for r in rs) / len(rs)}
        each = ", ".join(f"{r['throughput_tok_s']:.0f}" for r in rs)
        print(f"{name:>22}: {means[name]['throughput_tok_s']:10.0f} tok/s  {means[name]['pct_optimal']:5.1f}% of "
              f"optimal, mean of {len(rs)} passes ({each})", flush=True)
    return means


def _save(records: list[dict[str, Any]], output: str) -> Path:
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(records, indent=2, default=str))
    return out


def _print_row(rec: dict[str, Any]) -> None:
    if "throughput_tok_s" not in rec:
        print(f"{rec.get('mode'):>22}: FAILED {rec.get('error')}", flush=True)
        return
    extra = ""
    if "cpu_schedule_ms_per_iter" in rec:
        extra = (f" iter {rec['iteration_ms']:.1f} ms, sched {rec['cpu_schedule_ms_per_iter']:.2f} ms, "
                 f"launch {rec['cpu_launch_ms_per_iter']:.2f} ms")
    it = rec.get("iterations_timed")
    if it:
        extra += (f"; GPU busy {it['gpu_busy_s']:.1f} s, idle {it['gpu_idle_s']:.1f} s, full steps "
                  f"{it['full_steps']}/{it['steps']} at {it.get('full_step_ms_median', 0):.1f} ms")
    clocks = rec.get("gpu_clocks") or {}
    if clocks.get("samples"):
        extra += f"; SM clock {clocks['sm_mhz']['median']:.0f} MHz, {clocks['power_w']['median']:.0f} W"
        if "temp_c" in clocks:
            extra += f", {clocks['temp_c']['median']:.0f} C"
    if rec.get("recompile_limit_hits"):
        extra += f"; WARNING: torch.compile gave up {rec['recompile_limit_hits']}x (glue ran eagerly)"
    tv = rec.get("tokens_vs_reference")
    if tv:
        extra += f"; outputs identical to {tv['reference']}: {tv['identical']}/{tv['requests']}"
    print(f"{rec['mode']:>22}: {rec['throughput_tok_s']:10.0f} tok/s  {rec['pct_optimal']:5.1f}% of optimal"
          f" ({rec['optimal_tok_s']:.0f}){extra}", flush=True)


def _reference_op_ms(rec: dict[str, Any], nano: dict[str, Any]) -> dict[str, float] | None:
    """One layer's per-op CUDA-event times from a mode that runs the ops one after another (its nano-op profile),
    the durations the planned Gantt charts give each op; None for an overlapped mode."""
    if nano["spec"].num_streams > 1 or len(nano["spec"].nano_ops) != len(nano["graph"].ops):
        return None
    return dict(rec["nano_op_profile"]["layer_op_ms"])


def _planned_vs_measured(label: str, rec: dict[str, Any], nano: dict[str, Any], op_ms: dict[str, float],
                         out: Path) -> dict[str, Any]:
    """Draw the mode's planned layer beside its measured middle layer; the two layer times for the record."""
    from nanoflow.bench.planned import layer_rows, planned_layer, plot_planned_vs_measured

    layer = rec["nano_op_profile"]["layer"]
    rows = layer_rows(nano["records"], layer)
    planned = planned_layer(nano["spec"], nano["graph"], op_ms, int(rec["nano_op_profile"]["decode_tokens"]))
    fields: dict[str, Any] = {}
    if rows:
        fields["planned_layer_ms"] = max(n.end_ms for n in planned.nano_ops)
        fields["measured_layer_ms"] = max(r[3] for r in rows) - min(r[2] for r in rows)
    try:
        path = out.with_name(out.name + f"-{label}-planned-vs-measured.png")
        plot_planned_vs_measured(planned, nano["graph"], nano["records"], layer, path,
                                 f"{label}, layer {layer}: planned vs measured (CUDA events)")
    except Exception:  # a picture must not fail a run whose records are saved
        log.exception("the planned-vs-measured chart of %s failed", label)
    return fields
