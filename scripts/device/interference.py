#!/usr/bin/env python3
"""Interference of a GEMM and decode attention on one GPU across resource knobs (paper §4.1.1, Table 3).

LLaMA-3-8B shapes: gate/up GEMM over half a dense batch beside decode attention of the decode requests of the other
half. Writes $OUT/interference.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from _common import report_header

from nanoflow.search.interference import gemm_decode_pairs, partition_pairs, rp_table, sustained_clocks

DECODE_CONFIGS = [{"block_n": bn, "num_stages": st, "num_warps": 4, "kv_evict": ev}
                  for bn in (64, 128) for st in (2, 3, 4) for ev in ("evict_first", "")]
DECODE_CONFIGS.append({"block_n": 128, "num_stages": 3, "num_warps": 8, "kv_evict": "evict_first"})
# The row-wise kernel (one program per row over all kv heads; a tile is block_n / 16 whole pages, 32 KB of K per page
# for 8 kv heads of 128 in bf16). Configs that exceed shared memory (e.g. block_n 32 with 4 stages) are recorded as
# errors by partition_pairs and skipped.
DECODE_CONFIGS += [{"variant": "row", "block_n": bn, "num_stages": st, "num_warps": w, "kv_evict": "evict_first"}
                   for bn in (16, 32) for st in (2, 3, 4) for w in (4, 8)]
# The same tiles with 2-D dots over the flattened heads (fewer registers, more FLOPs).
DECODE_CONFIGS += [{"variant": "row_flat", "block_n": bn, "num_stages": st, "num_warps": w, "kv_evict": "evict_first"}
                   for bn in (16, 32) for st in (2, 3) for w in (4, 8)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", default="1024", help="GEMM rows (comma list)")
    ap.add_argument("--decode", default="320:1300,640:1300", help="decode rows:context pairs (comma list)")
    ap.add_argument("--programs", default="16,32,48,64,96,132,192,264", help="decode persistent-grid sizes")
    ap.add_argument("--green", default="16,32,48,64", help="decode green-context SM counts")
    ap.add_argument("--partition", action="store_true",
                    help="measure the partition knob instead (GEMM SM carve-out + bounded decode grid)")
    ap.add_argument("--decode-sms", default="24,32,48,64", help="partition: SMs left to decode attention")
    ap.add_argument("--ctas-per-sm", default="1,2", help="partition: decode programs per decode SM")
    ap.add_argument("--decode-variant", default="split", choices=["split", "row", "row_flat"],
                    help="grid knob (default mode): the decode kernel variant; the partition mode sweeps both "
                         "through DECODE_CONFIGS")
    ap.add_argument("--row-only", action="store_true",
                    help="partition: sweep only the row/row_flat-variant configs")
    ap.add_argument("--clocks", action="store_true",
                    help="instead: GEMM, decode and the pair (decode grid = --clock-programs) each sustained for "
                         "--seconds while NVML samples SM/memory clocks, power and throttle reasons (needs "
                         "nvidia-ml-py); tells a power-bound pair from HBM/L2 contention")
    ap.add_argument("--seconds", type=float, default=2.0, help="clocks: seconds per phase")
    ap.add_argument("--clock-programs", type=int, default=132,
                    help="clocks: decode persistent-grid size alone and in the pair (132: about half an H100/H200 at "
                         "the engine's 2 programs per SM of a 0.5 share)")
    args = ap.parse_args()
    if args.partition:
        return partition(args)
    if args.clocks:
        return clocks(args)
    dev = torch.device("cuda")
    results = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        for pair in args.decode.split(","):
            rows, ctx = (int(v) for v in pair.split(":"))
            res = gemm_decode_pairs(tokens, 4096, 14336, rows, ctx, 32, 8, 128,
                                    [int(p) for p in args.programs.split(",")],
                                    [int(s) for s in args.green.split(",") if s], dev,
                                    decode_cfg={"variant": args.decode_variant})
            res["rp_table"] = rp_table(res["pairs"])
            results.append(res)
            print(f"GEMM {tokens}x4096x28672 alone {res['t_gemm_alone_ms']:.3f} ms; decode {rows}x{ctx} alone "
                  f"{res['t_decode_alone_ms']:.3f} ms; serial {res['serial_ms']:.3f} ms")
            for p in res["pairs"]:
                if "error" in p:
                    print(f"  {p['knob']:5s} {p.get('decode_sms')}: {p['error'][:100]}")
                    continue
                k = p.get("programs", p.get("decode_sms"))
                print(f"  {p['knob']:5s} {k:4d}: pair {p['t_pair_ms']:.3f} ms (x{p['speedup_vs_serial']:.2f} vs serial)"
                      f"  P_gemm {p['P_gemm']:.2f} P_decode {p['P_decode']:.2f}")
            print("  R->P:", [(round(r, 2), round(q, 2)) for r, q in res["rp_table"]])
    with open(os.path.join(os.environ.get("OUT", "."), "interference.json"), "w") as f:
        json.dump({**report_header(), "results": results}, f, indent=2)


def clocks(args: argparse.Namespace) -> None:
    dev = torch.device("cuda")
    results = []
    programs = args.clock_programs
    for tokens in [int(t) for t in args.tokens.split(",")]:
        for pair in args.decode.split(","):
            rows, ctx = (int(v) for v in pair.split(":"))
            res = sustained_clocks(tokens, 4096, 14336, rows, ctx, 32, 8, 128, programs, dev, args.seconds)
            results.append(res)
            print(f"GEMM {tokens}x4096x28672 | decode {rows}x{ctx} on {programs} programs: pair x"
                  f"{res['pair_vs_serial']:.2f} vs serial")
            for phase in ("idle", "gemm", "decode", "decode_full", "pair"):
                r = res[phase]
                ms = f"{r['ms_per_iter']:.3f} ms/iter" if "ms_per_iter" in r else "-"
                print(f"  {phase:6s} {ms:>16s}  SM {r['sm_mhz']['median']:.0f} MHz (min {r['sm_mhz']['min']:.0f})  "
                      f"mem {r['mem_mhz']['median']:.0f} MHz  {r['power_w']['median']:.0f} W (max "
                      f"{r['power_w']['max']:.0f})  {r['reasons']}")
    with open(os.path.join(os.environ.get("OUT", "."), "interference_clocks.json"), "w") as f:
        json.dump({**report_header(), "results": results}, f, indent=2)


def partition(args: argparse.Namespace) -> None:
    dev = torch.device("cuda")
    configs = [c for c in DECODE_CONFIGS if c.get("variant", "split") != "split"] if args.row_only else DECODE_CONFIGS
    results = []
    for tokens in [int(t) for t in args.tokens.split(",")]:
        for pair in args.decode.split(","):
            rows, ctx = (int(v) for v in pair.split(":"))
            res = partition_pairs(tokens, 4096, 14336, rows, ctx, 32, 8, 128,
                                  [int(k) for k in args.decode_sms.split(",")],
                                  [int(c) for c in args.ctas_per_sm.split(",")], configs, dev)
            res["rp_table"] = rp_table(res["pairs"])
            results.append(res)
            print(f"GEMM {tokens}x4096x28672 alone {res['t_gemm_alone_ms']:.3f} ms; decode {rows}x{ctx} alone "
                  f"{res['t_decode_alone_ms']:.3f} ms; serial {res['serial_ms']:.3f} ms")
            for g in res["gemm_alone"]:
                print(f"  gemm {g['backend']:8s} {g['gemm_sms']:3d} SMs {g['t_ms']:.3f} ms")
            full = [d for d in res["decode_alone"] if d["programs"] is None and "t_ms" in d]
            for d in sorted(full, key=lambda d: d["t_ms"])[:4]:
                print(f"  decode full grid {d['config']}: {d['t_ms']:.3f} ms {d['tb_s']:.2f} TB/s")
            for p in res["pairs"]:
                print(f"  k={p['decode_sms']:3d} P={p['programs']:4d} {p['config']}: dec alone "
                      f"{p['t_decode_alone_ms']:.3f} gemm alone {p['t_gemm_alone_ms']:.3f} pair {p['t_pair_ms']:.3f}"
                      f" ms (x{p['speedup_vs_serial']:.2f}) P_gemm {p['P_gemm']:.2f} P_dec {p['P_decode']:.2f}")
    with open(os.path.join(os.environ.get("OUT", "."), "interference_partition.json"), "w") as f:
        json.dump({**report_header(), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
