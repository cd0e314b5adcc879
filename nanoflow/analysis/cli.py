"""``nanoflow analyze``: the paper's cost model (§3) from the command line.

The main ``nanoflow`` CLI mounts :func:`add_parser` on its subparsers and dispatches to :func:`run`;
``python -m nanoflow.analysis.cli ...`` runs the same command stand-alone. Defaults reproduce the paper's Table 2
setting except the batch: ``--dense-batch 2048`` gives Table 2 itself; without it the largest dense batch that
fits in memory is used, as the paper's §3.1 assumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from nanoflow.analysis.cost_model import (
    TABLE2_WORKLOAD,
    WORKLOADS,
    AnalysisError,
    CostReport,
    Workload,
    analyze,
    parse_workload,
)
from nanoflow.analysis.hardware import UnknownGPUError, get_gpu, known_gpu_names
from nanoflow.config import ConfigError, ModelSpec

_OP_LABELS = {"kqv": "KQV", "o": "O", "ug": "UG", "d": "D", "dec_attn": "DecAttn", "pf_attn": "PfAttn", "net": "Net"}


def _configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="llama-2-70b",
                        help="model: a short name of nanoflow/configs (e.g. llama-3-8b), a folder with config.json, "
                             "or a config.json path (default: %(default)s)")
    parser.add_argument("--gpu", default="a100-80gb",
                        help=f"accelerator from the paper's Table 1: {', '.join(known_gpu_names())} "
                             "(case-insensitive; default: %(default)s)")
    parser.add_argument("--tp", type=int, default=8,
                        help="tensor-parallel degree = number of GPUs N_GPU (default: %(default)s)")
    parser.add_argument("--dense-batch", type=int, default=None,
                        help="tokens per iteration B_dense (default: the largest batch that fits in memory; "
                             "2048 reproduces Table 2)")
    parser.add_argument("--prompt-len", type=float, default=None,
                        help="average prompt length p in tokens (with --decode-len; overrides --workload)")
    parser.add_argument("--decode-len", type=float, default=None,
                        help="average decode length d in tokens (with --prompt-len; overrides --workload)")
    parser.add_argument("--workload", default=None,
                        help="constant lengths 'PROMPT/DECODE' such as 1024/512, or a Table 4 dataset: "
                             + ", ".join(f"{w.name} ({w.prompt_len:g}/{w.decode_len:g})" for w in WORKLOADS.values())
                             + f" (default: {TABLE2_WORKLOAD.name}, the Table 2 workload)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="per-GPU compute in TFLOP/s replacing the Table 1 FP16 figure everywhere, e.g. a "
                             "profiled GEMM peak (the paper uses 280 for the A100 in §3.5)")
    parser.add_argument("--kv-dtype-bytes", type=float, default=None,
                        help="bytes per KV-cache element when they differ from --dtype-bytes (1 for a float8 cache, "
                             "--kv-cache-dtype fp8): sizes the KV cache and decode attention's reads")
    parser.add_argument("--dtype-bytes", type=float, default=2,
                        help="bytes per element of weights, activations and KV cache, S_type (default: 2 = FP16)")
    parser.add_argument("--mem-fraction", type=float, default=1.0,
                        help="share of GPU memory available for weights and KV cache (default: %(default)s)")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object instead of tables")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register the ``analyze`` subcommand; the caller dispatches to :func:`run` (also set as ``func``)."""
    parser = subparsers.add_parser(
        "analyze",
        help="the paper's cost model: per-op compute/memory/network times, T_R, optimal throughput",
        description="Evaluate NanoFlow's cost model (paper §3): Table 2-style per-operation estimates, the "
                    "eq. (1)-(4) classification, the maximum dense batch and the eq. (5) optimal throughput.",
    )
    _configure(parser)
    parser.set_defaults(func=run)
    return parser


def _workload(args: argparse.Namespace) -> Workload:
    if (args.prompt_len is None) != (args.decode_len is None):
        raise AnalysisError("give both --prompt-len and --decode-len, or use --workload PROMPT/DECODE")
    if args.prompt_len is not None:
        return Workload(args.prompt_len, args.decode_len, f"{args.prompt_len:g}/{args.decode_len:g}")
    if args.workload is not None:
        return parse_workload(args.workload)
    return TABLE2_WORKLOAD


def format_report(report: CostReport) -> str:
    """Human-readable tables: one row per op plus totals, then the equation-level summary."""
    head = f"{'Operation':<10}{'GFLOP':>12}{'Mem GB':>10}{'Net GB':>9}{'T_comp ms':>11}{'T_mem ms':>10}" \
           f"{'T_net ms':>10}  Bound"
    lines = [
        (
            f"{report.model or 'model'} on {report.n_gpu} x {report.gpu.model} ({report.compute_tflops_per_gpu:g} "
            f"TFLOP/s, {report.gpu.mem_bw_gbps:g} GB/s, {report.gpu.net_bw_one_way_gbps:g} GB/s one-way net), "
            f"B_dense={report.dense_batch}, workload {report.workload.label} "
            f"(p={report.workload.prompt_len:g}, d={report.workload.decode_len:g}), S_type={report.dtype_bytes:g} B"
        ),
        "",
        head,
        "-" * len(head),
    ]
    for row in (*report.ops, report.totals):
        label = _OP_LABELS.get(row.name, "Total")
        if row is report.totals:
            lines.append("-" * len(head))
        lines.append(f"{label:<10}{row.gflop:>12.1f}{row.mem_gb:>10.2f}{row.net_gb:>9.2f}{row.t_compute_ms:>11.2f}"
                     f"{row.t_mem_ms:>10.2f}{row.t_net_ms:>10.2f}  {row.bottleneck.value}")
    mem = report.memory
    lines += [
        "",
        f"eq.(1) T_mem     = MemSize/MemBW      = {report.t_mem_eq1_ms:9.2f} ms",
        f"eq.(2) T_compute = 2 B P / Compute    = {report.t_compute_eq2_ms:9.2f} ms   (P = {report.active_params:,})",
        f"eq.(3) T_net     = 4(N-1) B D S L/Net = {report.t_net_eq3_ms:9.2f} ms",
        f"eq.(4) T_R       = T_mem/T_compute    = {report.t_r:9.3f}"
        f"      T_net/T_compute = {report.net_over_compute:.3f}",
        f"classification: {report.classification.value} (per-op totals: {report.totals.bottleneck.value})",
        "",
        (
            f"memory: {mem.capacity_gb:.1f} GB total, weights {mem.weights_gb:.1f} GB, "
            f"KV {mem.kv_gb_per_request:.3f} GB per request at p + d/2 tokens"
        ),
        f"max concurrent requests: {mem.max_concurrent_requests:,}   max dense batch: {mem.max_dense_batch:,} tokens"
        + ("" if mem.weights_fit else "   (weights do not fit)")
        + ("   (B_dense above it: KV would not fit)" if report.dense_batch > mem.max_dense_batch else ""),
        (
            f"optimal throughput eq.(5): {report.optimal_tokens_per_s_per_gpu:,.0f} tokens/s/GPU   "
            f"(per-op bound at this batch with perfect overlap: {report.overlap_bound_tokens_per_s_per_gpu:,.0f})"
        ),
    ]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Execute ``analyze``; returns the process exit status (2 on bad input, with the reason on stderr)."""
    try:
        model = ModelSpec.load(args.model)
        gpu = get_gpu(args.gpu)
        report = analyze(model, gpu, n_gpu=args.tp, dense_batch=args.dense_batch, workload=_workload(args),
                         dtype_bytes=args.dtype_bytes, peak_tflops=args.peak_tflops, mem_fraction=args.mem_fraction,
                         kv_dtype_bytes=args.kv_dtype_bytes)
    except (AnalysisError, UnknownGPUError, ConfigError) as exc:
        print(f"nanoflow analyze: error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report.to_dict(), indent=2) if args.json else format_report(report))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nanoflow.analysis.cli")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    # Stand-alone use may omit the subcommand name: `python -m nanoflow.analysis.cli --gpu h100`.
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "analyze":
        argv = ["analyze", *argv]
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
