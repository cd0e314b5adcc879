"""Decode attention over a bf16 vs a float8 KV cache on a GPU: time, bandwidth and a tile/warp/stage sweep.

A float8 cache halves the bytes decode attention reads, so at the same fraction of HBM bandwidth a decode step
should take half the time. This script measures whether it does (LLaMA-3-8B heads, pages of 16 in shuffled order,
steady-state shapes of the 1,024/512 workload) and which ``block_n`` / ``num_warps`` / ``num_stages`` make the float8
path fastest (and whether the software-pipelined tile loop, ``prefetch``, helps, and whether widening float8 tiles to
float16, ``f16_tiles``, the default, beats widening them to bf16), for the full grid and for bounded
persistent grids (the overlap pipelines' grid knob). Each config is checked against the float64 reference on the
widened float8 pages. Writes ``$OUT/decode_kv_tune.json``.

    python scripts/device/tune_decode_kv.py            # on the GPU machine (about a minute on an H200)
    python scripts/device/tune_decode_kv.py --dry-run  # tiny shapes on the CPU through TRITON_INTERPRET

Environment: ``TUNE_QUICK=1`` (one case, the few-warp tiles); ``TUNE_PAGE`` (tokens per page, default 16);
``TUNE_TMA=1`` (pages copied by TMA, ``decode_attention(tma=True)``, one page per tile: warps x stages, beside two
pointer-loaded reference tiles and the defaults; pair it with ``TUNE_PAGE=64`` for 64-token tiles).
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from functools import partial
from pathlib import Path

from _cli import parse_script_args

OPTS = parse_script_args(__doc__, "decode_kv_tune.json")

import torch  # noqa: E402
from _common import DRY_RUN_DEVICE, rel_err, report_header  # noqa: E402
from _common import bench_ms as _bench_ms  # noqa: E402

from nanoflow.config import DECODE_OPTION_KEYS  # noqa: E402
from nanoflow.ops.attention import decode_attention, decode_attention_ref, decode_workspace  # noqa: E402
from nanoflow.ops.kv_store import FP8  # noqa: E402

DEVICE = torch.device("cpu" if OPTS.dry_run else "cuda")
HQ, HKV, D = (32, 8, 128) if not OPTS.dry_run else (4, 2, 64)
PAGE = int(os.environ.get("TUNE_PAGE", "16")) if not OPTS.dry_run else 16
TMA = os.environ.get("TUNE_TMA") == "1"
# (rows, tokens per row): the 1,024/512 steady state (~700-800 decode rows at ~1,280 tokens) and a longer context.
CASES = [(768, 1280), (256, 4096)] if not OPTS.dry_run else [(3, 40)]
if os.environ.get("TUNE_QUICK") == "1" and not OPTS.dry_run:
    CASES = CASES[:1]
# (block_n, num_warps, num_stages, prefetch, f16_tiles): prefetch = the software-pipelined tile loop
# (decode_attention(prefetch=)); f16_tiles = widen float8 to float16 (True, the default) or to bf16 (False).
# TUNE_QUICK=1: only the few-warp tiles (the float8 winners) and the old 4-warp default.
QUICK = os.environ.get("TUNE_QUICK") == "1"
if OPTS.dry_run:
    SWEEP = [(16, 4, 2, False, True), (16, 4, 2, True, True), (16, 4, 2, False, False), (16, 1, 3, False, True)]
elif QUICK:
    SWEEP = [(b, w, s, False, True) for b, w, s in itertools.product((32, 64, 128), (1, 2), (3, 4))] + [
        (128, 4, 2, False, True)]
else:
    SWEEP = ([(*c, False, True) for c in itertools.product((32, 64, 128, 256), (1, 2, 4, 8), (1, 2, 3))]
             + [(*c, True, True) for c in itertools.product((64, 128), (4, 8), (2,))]
             + [(64, 2, 3, False, False), (128, 4, 2, False, False)])
BF16_SWEEP = ([(64, 4, 2, False, True), (128, 4, 2, False, True), (64, 2, 3, False, True), (32, 2, 3, False, True),
               (64, 8, 2, False, True), (64, 4, 2, True, True)]
              if not OPTS.dry_run and not QUICK else [(16, 4, 2, False, True)])
# Bounded (persistent) grids: the overlap pipelines' decode knob; 528 and 1,056 give 2-warp tiles as many warps as
# 4-warp tiles get at 264 and 528.
PROGRAMS = (66, 264, 528, 1056) if not OPTS.dry_run else (2,)
# (num_warps, num_stages, tma) of the TMA path (TUNE_TMA=1), whose tile is one page; tma=2 is warp-specialised.
TMA_SWEEP = []
if TMA:
    TMA_SWEEP = ([(w, s, 1) for w in (1, 2, 4, 8) for s in (2, 3, 4, 6)]
                 + [(w, s, 2) for w in (4, 8) for s in (2, 3, 4)]) if not OPTS.dry_run else [(4, 2, 1), (2, 3, 1),
                                                                                              (4, 2, 2)]
    if not OPTS.dry_run:
        SWEEP = [(64, 2, 3, False, True), (128, 4, 2, False, True)]
        BF16_SWEEP = [(64, 4, 2, False, True)]
        PROGRAMS = (264, 1056)


def bench_ms(fn) -> float:
    return _bench_ms(fn, OPTS.dry_run)


def caches(rows: int, length: int, gen: torch.Generator):
    per_row = -(-length // PAGE)
    blocks = 1 + rows * per_row
    shape = (blocks, PAGE, HKV, D)
    k = torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn(shape, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    table = (torch.randperm(blocks - 1, generator=gen, device=DEVICE) + 1).view(rows, per_row).to(torch.int32)
    return k, v, table


def measure(q, k, v, table, lens, ws, moved: int, cfg: dict, ref) -> dict:
    rec = dict(cfg)
    try:
        out = torch.empty_like(q)
        fn = partial(decode_attention, q, k, v, table, lens, out, D**-0.5, workspace=ws, **cfg)
        fn()
        rec["rel_err"] = rel_err(out, ref)
        rec["ms"] = bench_ms(fn)
        rec["GBps"] = moved / rec["ms"] / 1e6
    except Exception as exc:  # one config's failure must not cost the sweep
        rec["error"] = repr(exc)[:300]
    return rec


def main() -> int:
    started = time.time()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    report: dict = {**report_header(None if DEVICE.type == "cuda" else DRY_RUN_DEVICE), "page": PAGE, "tma": TMA,
                    "cases": []}
    for rows, length in CASES:
        k16, v16, table = caches(rows, length, gen)
        k8, v8 = k16.to(FP8), v16.to(FP8)
        q = torch.randn(rows, HQ, D, generator=gen, device=DEVICE, dtype=torch.bfloat16)
        lens = torch.full((rows,), length, dtype=torch.int32, device=DEVICE)
        ws = decode_workspace(rows, HQ, D, 16, DEVICE)
        case: dict = {"N": rows, "seq_len": length, "bf16": [], "fp8": []}
        report["cases"].append(case)
        for name, k, v, sweep in (("bf16", k16, v16, BF16_SWEEP), ("fp8", k8, v8, SWEEP)):
            ref = decode_attention_ref(q, k.to(torch.bfloat16), v.to(torch.bfloat16), table, lens, D**-0.5)
            moved = rows * length * 2 * HKV * D * k.element_size()
            configs = [{}]  # the defaults first
            configs += [{"block_n": b, "num_warps": w, "num_stages": s, **({"prefetch": True} if f else {}),
                         **({} if f16 else {"f16_tiles": False})}
                        for b, w, s, f, f16 in sweep]
            configs += [{"tma": t, "num_warps": w, "num_stages": s} for w, s, t in TMA_SWEEP]
            configs += [{"max_programs": p} for p in PROGRAMS]
            configs += [] if QUICK or TMA else [{"variant": "row"}, {"variant": "row_flat"}]
            for cfg in configs:
                rec = measure(q, k, v, table, lens, ws, moved, cfg, ref)
                case[name].append(rec)
            timed = [r for r in case[name] if "ms" in r and "max_programs" not in r and "variant" not in r]
            case[f"{name}_best"] = min(timed, key=lambda r: r["ms"]) if timed else None
            best = case[f"{name}_best"]
            if best and DEVICE.type == "cuda":  # the best full-grid tiles on the bounded grids too
                tiles = {key: best[key] for key in SWEEP_KEYS if key in best}
                for p in PROGRAMS:
                    case[name].append(measure(q, k, v, table, lens, ws, moved,
                                              {**tiles, "max_programs": p}, ref))
            default = case[name][0]
            print(f"N={rows} len={length} {name}: default {default.get('ms', float('nan')):.3f} ms "
                  f"({default.get('GBps', 0):.0f} GB/s), best {best and best['ms']:.3f} ms "
                  f"({best and best['GBps']:.0f} GB/s) {best and {k_: best.get(k_) for k_ in SWEEP_KEYS}}", flush=True)
        old_path = [r for r in case["fp8"] if "ms" in r and r.get("f16_tiles") is False]
        case["fp8_bf16_tiles_best"] = min(old_path, key=lambda r: r["ms"]) if old_path else None
        if case["bf16_best"] and case["fp8_best"]:
            case["fp8_over_bf16_default"] = case["fp8"][0].get("ms", 0) / case["bf16"][0]["ms"]
            case["fp8_best_over_bf16_best"] = case["fp8_best"]["ms"] / case["bf16_best"]["ms"]
        del k16, v16, k8, v8
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    report["wall_s"] = time.time() - started
    bad = [r for c in report["cases"] for n in ("bf16", "fp8") for r in c[n]
           if "error" in r or r.get("rel_err", 0) > 3e-2]
    report["failures"] = bad
    out = Path(OPTS.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_kv_tune.json").write_text(json.dumps(report, indent=1, default=str))
    for c in report["cases"]:
        print({k_: c.get(k_) for k_ in ("N", "seq_len", "fp8_over_bf16_default", "fp8_best_over_bf16_best")})
        old = c.get("fp8_bf16_tiles_best")
        if old:
            print(f"  fp8 widened to bf16 (the old path), best: {old['ms']:.3f} ms ({old['GBps']:.0f} GB/s)")
        for name in ("bf16", "fp8"):
            grid = [(r.get("max_programs"), r.get("block_n"), round(r["GBps"])) for r in c[name]
                    if "max_programs" in r and "ms" in r]
            print(f"  {name} bounded grids (programs, block_n, GB/s): {grid}")
    print(f"failures: {len(bad)}", bad[:3])
    return 1 if bad else 0


SWEEP_KEYS = DECODE_OPTION_KEYS

if __name__ == "__main__":
    sys.exit(main())
