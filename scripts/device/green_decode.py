"""Decode attention confined to a green context of n SMs: which kernel keeps HBM busy on part of the GPU.

Overlapping decode attention (memory-bound) with a GEMM (compute-bound) pays only if attention reaches most of the
HBM bandwidth on a small share of the SMs, leaving the rest to the GEMM. The session-1 pair measurements found the
default tiles far from that (bf16 decode on 32 of 132 H200 SMs: 38% of its full-GPU speed, while a plain GEMV
reached 80%), which is why no pipeline beat the non-overlapped baseline. This script measures, for a float8 and a
bf16 cache (LLaMA-3-8B heads, shuffled pages, every row the same length):

1. each kernel config alone inside a green context of n SMs (n from ``--sms``, and the whole GPU): ms and TB/s;
2. for the best config at each n: the pair with the gate/up GEMM (``--gemm-tokens`` x 4096 -> 28672) in a green
   context of the other SMs. ``P_decode`` is decode's full-GPU time over its time in the pair (the GEMM repeated to
   cover it), ``P_gemm`` the same for the GEMM; a sum above 1 is what an overlapped pipeline can gain.

The float8 cache also runs the hand-written CUDA kernel (``variant="cuda"``, ``decode_cuda.py``; configs ``fp8-cuda*``).
Both caches also run the packed variant (``variant="packed"``: ``head_group`` kv heads per program, their query
heads as the rows of block-diagonal dots, so no dot row or softmax row is padding). Float8 configs include pages
copied by TMA (``tma=1``; one page per tile, so the cache is built with pages of ``--tma-page`` tokens): TMA copies
land in shared memory asynchronously, where pointer-loaded float8 tiles are widened in registers and keep few bytes
in flight per SM.

    python scripts/device/green_decode.py            # on the GPU machine (about three minutes)
    python scripts/device/green_decode.py --dry-run  # tiny shapes on the CPU, no green contexts
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from _cli import parse_script_args


def _args(ap) -> None:
    ap.add_argument("--rows", type=int, default=640, help="decode rows (requests)")
    ap.add_argument("--length", type=int, default=1280, help="tokens per row")
    ap.add_argument("--sms", default="16,32,48,64", help="green-context SM counts for decode (comma list)")
    ap.add_argument("--gemm-tokens", type=int, default=1024, help="rows of the paired gate/up GEMM")
    ap.add_argument("--tma-page", type=int, default=64, help="tokens per page of the caches the TMA configs read")
    ap.add_argument("--pair", default="", help="pair these configs (comma list) with the GEMM at every n, instead of "
                                               "the fastest config alone at each n")
    ap.add_argument("--only", default="", help="run only the configs whose name contains one of these (comma list; "
                                               "the two defaults always run)")


OPTS = parse_script_args(__doc__, "green_decode.json", _args)

import torch  # noqa: E402
from _common import DRY_RUN_DEVICE, rel_err, report_header  # noqa: E402
from _common import bench_ms as _bench_ms  # noqa: E402

from nanoflow.ops.attention import decode_attention, decode_attention_ref, decode_workspace  # noqa: E402
from nanoflow.ops.kv_store import FP8  # noqa: E402
from nanoflow.search.interference import _events_time  # noqa: E402

DRY = OPTS.dry_run
DEVICE = torch.device("cpu" if DRY else "cuda")
HQ, HKV, D = (32, 8, 128) if not DRY else (4, 2, 64)
ROWS, LENGTH = (OPTS.rows, OPTS.length) if not DRY else (3, 40)
PAGE = 16

# (name, cache dtype, page, decode_attention keywords)
CONFIGS: list[tuple[str, str, int, dict]] = [("fp8-default", "fp8", PAGE, {}), ("bf16-default", "bf16", PAGE, {})]
# The packed variant (decode_packed.py): head_group kv heads per program, their query heads as the dots' rows.
PACKED = ([(4, b, w, s) for b, w, s in ((16, 2, 2), (16, 4, 2), (32, 2, 2), (32, 4, 2), (32, 4, 3), (64, 4, 2),
                                         (32, 8, 2), (64, 8, 2))] + [(2, 32, 4, 2), (2, 64, 4, 2)]) if not DRY else [
    (2, 16, 4, 2)]
CONFIGS += [(f"{dt}-packed-h{h}-{b}x{w}w{s}s", dt, PAGE, {"variant": "packed", "head_group": h, "block_n": b,
                                                         "num_warps": w, "num_stages": s})
            for dt in ("fp8", "bf16") for h, b, w, s in PACKED if dt == "fp8" or (h == 4 and b <= 32)]
if not DRY:
    # Deep pipelines: with >= 5 stages Triton 3.6 keeps the next tile's K/V copies in flight during this tile's compute
    # (its loop waits with num=3); at 2-4 stages it waits for every copy (num=0) before computing, so a CTA never
    # overlaps its own loads with its compute (compiled TTGIR, scripts/device/green_decode.py docstring).
    CONFIGS += [(f"{dt}-deep-{b}x{w}w{s}s", dt, PAGE, {"block_n": b, "num_warps": w, "num_stages": s})
                for dt, b, w, s in (("fp8", 64, 2, 5), ("fp8", 64, 2, 6), ("fp8", 32, 2, 5), ("fp8", 32, 2, 6),
                                    ("fp8", 64, 4, 5), ("fp8", 32, 4, 5), ("fp8", 128, 4, 5), ("fp8", 16, 2, 6),
                                    ("bf16", 64, 4, 5), ("bf16", 32, 4, 5), ("bf16", 32, 4, 6), ("bf16", 64, 2, 5))]
    CONFIGS += [(f"fp8-ptr-64x{w}w3s-maxreg{r}", "fp8", PAGE, {"block_n": 64, "num_warps": w, "num_stages": 3,
                                                         "maxnreg": r})
                for w, r in ((2, 128), (2, 96), (4, 128), (4, 96))]
    CONFIGS += [(f"bf16-ptr-64x4w2s-maxreg{r}", "bf16", PAGE, {"block_n": 64, "num_warps": 4, "num_stages": 2,
                                                         "maxnreg": r}) for r in (96, 64)]
    CONFIGS += [(f"fp8-ptr-{b}x{w}w{s}s", "fp8", PAGE, {"block_n": b, "num_warps": w, "num_stages": s})
                for b, w, s in ((64, 4, 3), (128, 4, 2), (32, 2, 4), (64, 1, 3), (128, 8, 3))]
    TP = OPTS.tma_page
    # The hand-written CUDA kernel (decode_cuda.py): one warp per (row, kv head), tensor-core products on registers.
    CONFIGS += [("fp8-cuda", "fp8", PAGE, {"variant": "cuda"}), ("fp8-cuda-plain", "fp8", PAGE,
                                                                 {"variant": "cuda", "kv_evict": ""}),
                ("fp8-cuda-split2", "fp8", PAGE, {"variant": "cuda", "num_splits": 2})]
    CONFIGS += [(f"fp8-cuda-{s}s", "fp8", PAGE, {"variant": "cuda", "num_stages": s}) for s in (3, 6)]
    CONFIGS += [(f"fp8-tma-p{TP}-{w}w{s}s", "fp8", TP, {"tma": 1, "num_warps": w, "num_stages": s})
                for w in (1, 2, 4) for s in (3, 4, 6, 8)]
    CONFIGS += [(f"fp8-tma-p16-{w}w{s}s", "fp8", 16, {"tma": 1, "num_warps": w, "num_stages": s})
                for w in (1, 2) for s in (4, 8)]
    CONFIGS += [(f"bf16-ptr-{b}x{w}w{s}s", "bf16", PAGE, {"block_n": b, "num_warps": w, "num_stages": s})
                for b, w, s in ((64, 4, 3), (128, 4, 3), (64, 4, 4), (128, 8, 4))]
    CONFIGS += [(f"bf16-tma-p{TP}-{w}w{s}s", "bf16", TP, {"tma": 1, "num_warps": w, "num_stages": s})
                for w in (2, 4) for s in (3, 4)]


def bench_ms(fn) -> float:
    return _bench_ms(fn, DRY, warmup=10, rep=40)


def build(page: int, gen: torch.Generator) -> dict:
    per_row = -(-LENGTH // page)
    blocks = 1 + ROWS * per_row
    k = torch.randn((blocks, page, HKV, D), generator=gen, device=DEVICE, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    table = (torch.randperm(blocks - 1, generator=gen, device=DEVICE) + 1).view(ROWS, per_row).to(torch.int32)
    return {"bf16": (k, v), "fp8": (k.to(FP8), v.to(FP8)), "table": table}


def green(n: int):
    from torch.cuda.green_contexts import GreenContext

    return GreenContext.create(num_sms=n, device_id=DEVICE.index or 0)


def main() -> int:
    started = time.time()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    q = torch.randn(ROWS, HQ, D, generator=gen, device=DEVICE, dtype=torch.bfloat16)
    lens = torch.full((ROWS,), LENGTH, dtype=torch.int32, device=DEVICE)
    ws = decode_workspace(ROWS, HQ, D, 16, DEVICE)
    only = [o for o in OPTS.only.split(",") if o]
    configs = [c for c in CONFIGS if not only or c[0].endswith("default") or any(o in c[0] for o in only)]
    caches = {p: build(p, gen) for p in sorted({c[2] for c in configs})}  # only the page sizes the run reads
    total_sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count if not DRY else 1
    sm_list = [int(s) for s in OPTS.sms.split(",") if s] if not DRY else []
    contexts = {n: green(n) for n in sm_list}
    streams = {n: ctx.Stream() for n, ctx in contexts.items()}
    refs = {}
    rows = []
    for name, dt, page, kw in configs:
        k, v = caches[page][dt]
        table = caches[page]["table"]
        moved = ROWS * LENGTH * 2 * HKV * D * k.element_size()
        out = torch.empty_like(q)

        def fn(k=k, v=v, table=table, kw=kw, out=out):
            decode_attention(q, k, v, table, lens, out, D**-0.5, workspace=ws, **kw)

        rec = {"config": name, "kv": dt, "page": page, **kw}
        try:
            fn()
            key = (dt, page)
            if key not in refs:
                refs[key] = decode_attention_ref(q, k.to(torch.bfloat16), v.to(torch.bfloat16), table, lens, D**-0.5)
            rec["rel_err"] = rel_err(out, refs[key])
            rec["full"] = {"sms": total_sms, "ms": bench_ms(fn)}
            rec["full"]["TBps"] = moved / rec["full"]["ms"] / 1e9
            for n in sm_list:
                with torch.cuda.stream(streams[n]):
                    ms = bench_ms(fn)
                rec[f"sms{n}"] = {"sms": n, "ms": ms, "TBps": moved / ms / 1e9, "P": rec["full"]["ms"] / ms}
        except Exception as exc:  # a config the device cannot compile or run: record it, keep the sweep
            rec["error"] = repr(exc)[:300]
        rows.append(rec)
        cells = " ".join(f"{n}:{rec[f'sms{n}']['TBps']:.2f}" for n in sm_list if f"sms{n}" in rec)
        full = rec.get("full", {})
        print(f"{name:24s} err {rec.get('rel_err', float('nan')):.1e} full {full.get('ms', float('nan')):.3f} ms "
              f"{full.get('TBps', 0):.2f} TB/s | green TB/s {cells} {rec.get('error', '')[:120]}", flush=True)

    pairs = []
    if not DRY:
        x = torch.randn(OPTS.gemm_tokens, 4096, device=DEVICE, dtype=torch.bfloat16)
        w = torch.randn(28672, 4096, device=DEVICE, dtype=torch.bfloat16) * 0.02
        y = torch.empty(OPTS.gemm_tokens, 28672, device=DEVICE, dtype=torch.bfloat16)
        t_gemm = bench_ms(lambda: torch.mm(x, w.t(), out=y))
        for dt in ("fp8", "bf16"):
            ok = [r for r in rows if r["kv"] == dt and "full" in r and r["rel_err"] < 3e-2]
            if not ok:
                continue
            best_full = min(ok, key=lambda r: r["full"]["ms"])
            pair_names = [p for p in OPTS.pair.split(",") if p]
            for n, best in [(n, r) for n in sm_list for r in ok if r["config"] in pair_names and f"sms{n}" in r] \
                    if pair_names else [(n, min((r for r in ok if f"sms{n}" in r), key=lambda r: r[f"sms{n}"]["ms"],
                                                default=None)) for n in sm_list]:
                if best is None:
                    continue
                name, dt_, page, kw = next(c for c in configs if c[0] == best["config"])
                k, v = caches[page][dt]
                table = caches[page]["table"]
                out = torch.empty_like(q)
                g_ctx = green(total_sms - n)
                sg, sd = g_ctx.Stream(), streams[n]
                t_dp, t_gp = best[f"sms{n}"]["ms"], None
                with torch.cuda.stream(sg):
                    t_gp = bench_ms(lambda: torch.mm(x, w.t(), out=y))
                reps_g = max(1, math.ceil(1.3 * t_dp / t_gp))
                reps_d = max(1, math.ceil(1.3 * t_gp / t_dp))

                def dec(r, k=k, v=v, table=table, kw=kw, out=out):
                    return lambda: [decode_attention(q, k, v, table, lens, out, D**-0.5, workspace=ws, **kw)
                                    for _ in range(r)]

                def gemm(r):
                    return lambda: [torch.mm(x, w.t(), out=y) for _ in range(r)]

                (t_d, _), _ = _events_time([(sd, dec(1)), (sg, gemm(reps_g))])
                (_, t_g), _ = _events_time([(sd, dec(reps_d)), (sg, gemm(1))])
                rec = {"kv": dt, "decode_sms": n, "gemm_sms": total_sms - n, "config": best["config"],
                       "t_decode_full_ms": best_full["full"]["ms"], "t_gemm_full_ms": t_gemm,
                       "t_decode_partition_ms": t_dp, "t_gemm_partition_ms": t_gp,
                       "t_decode_in_pair_ms": t_d, "t_gemm_in_pair_ms": t_g,
                       "P_decode": best_full["full"]["ms"] / t_d, "P_gemm": t_gemm / t_g}
                rec["P_sum"] = rec["P_decode"] + rec["P_gemm"]
                pairs.append(rec)
                print(f"pair {dt} decode {n} SMs ({best['config']}) + GEMM {total_sms - n} SMs: P_decode "
                      f"{rec['P_decode']:.2f} (alone in partition {best_full['full']['ms'] / t_dp:.2f}), P_gemm "
                      f"{rec['P_gemm']:.2f} (alone in partition {t_gemm / t_gp:.2f}), sum {rec['P_sum']:.2f}",
                      flush=True)
    report = {**report_header(None if not DRY else DRY_RUN_DEVICE), "rows": ROWS, "length": LENGTH,
              "heads": [HQ, HKV, D], "gemm_tokens": OPTS.gemm_tokens, "configs": rows, "pairs": pairs,
              "wall_s": time.time() - started}
    out = Path(OPTS.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "green_decode.json").write_text(json.dumps(report, indent=1, default=str))
    bad = [r for r in rows if "error" in r and r["config"].endswith("default")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
