"""Benchmark and check the paged attention kernels on a GPU; writes ``$OUT/attention_bench.json``.

Measures, in one run: the device's copy bandwidth (a large device-to-device copy, bytes read + written over time);
decode attention's achieved bandwidth (K+V bytes read + q/out) for N x seq_len over a few ``num_splits`` values, as a
fraction of that copy bandwidth; prefill attention TFLOP/s against torch SDPA (causal, contiguous q/k/v, no context);
and correctness against the float64 reference (bf16 decode on a realistic shape, each prefill shape on one segment,
decode replayed from a CUDA graph after its metadata changed). Both decode variants are measured: ``split`` (the
default) and ``row`` (one program per row over all kv heads), each also on bounded persistent grids (``max_programs``,
the grid knob that leaves SMs to a concurrent GEMM) to show bandwidth per program. Every config is isolated: a
failure is recorded and the run goes on. Data are random (never zeros) and block tables shuffled, so pages are not
contiguous.

    python scripts/device/bench_attention.py            # on the GPU machine (about 2-3 minutes on an H100)
    python scripts/device/bench_attention.py --dry-run  # tiny shapes on the CPU through TRITON_INTERPRET
    python scripts/device/bench_attention.py --tune     # also sweep tile/warp/stage choices (decode|prefill|all)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from _cli import parse_script_args


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--tune", nargs="?", const="all", choices=("decode", "prefill", "all"),
                    help="also sweep tile sizes / num_warps / num_stages of decode, prefill or both")


OPTS = parse_script_args(__doc__, "attention_bench.json", _args)

import torch  # noqa: E402
import triton  # noqa: E402
from _common import DRY_RUN_DEVICE, rel_err, report_header  # noqa: E402
from _common import bench_ms as _bench_ms  # noqa: E402

from nanoflow.ops.attention import (  # noqa: E402
    decode_attention,
    decode_attention_ref,
    decode_workspace,
    default_num_splits,
    prefill_attention,
    prefill_attention_ref,
)


@dataclass(frozen=True)
class Shapes:
    """Everything size-dependent, so the dry run reuses the same code paths on tiny inputs."""

    hq: int
    hkv: int
    d: int
    block_size: int
    decode_rows: tuple[int, ...]
    decode_lens: tuple[int, ...]
    splits: tuple[int, ...]
    prefill_chunks: tuple[int, ...]
    prefill_ctx: tuple[int, ...]
    prefill_tokens: int  # tokens per prefill launch (segments = tokens // chunk) so the grid fills the GPU
    copy_bytes: int
    max_cache_bytes: int


GPU = Shapes(32, 8, 128, 16, (32, 256, 1024), (1024, 2048, 4096), (1, 2, 4, 8), (512, 1024, 2048), (0, 1024), 8192,
             2 << 30, 40 << 30)
TINY = Shapes(4, 2, 64, 16, (2, 3), (40, 70), (1, 3), (32,), (0, 20), 64, 1 << 20, 1 << 30)
SHAPES = TINY if OPTS.dry_run else GPU
# Persistent-grid sizes (max_programs) measured for both decode variants: bandwidth on a bounded share of the SMs.
BOUNDED_PROGRAMS = (16, 32, 48, 64, 132, 264) if not OPTS.dry_run else (1, 2)
DEVICE = torch.device("cpu" if OPTS.dry_run else "cuda")
DTYPE = torch.bfloat16


def bench_ms(fn: Callable[[], object]) -> float:
    return _bench_ms(fn, OPTS.dry_run)


def pages(rows: int, tokens_per_row: int) -> int:
    return rows * triton.cdiv(tokens_per_row, SHAPES.block_size)


def paged_cache(num_pages: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random bf16 K/V pages: ``num_pages`` usable ones plus the null page 0."""
    blocks = 1 + num_pages
    shape = (blocks, SHAPES.block_size, SHAPES.hkv, SHAPES.d)
    k = torch.randn(shape, generator=gen, device=DEVICE, dtype=DTYPE)
    v = torch.randn(shape, generator=gen, device=DEVICE, dtype=DTYPE)
    return k, v


def shuffled_tables(rows: int, tokens_per_row: int, num_blocks: int, gen: torch.Generator) -> torch.Tensor:
    """Each row gets distinct pages drawn at random from 1..num_blocks-1 (never contiguous in memory order)."""
    per_row = triton.cdiv(tokens_per_row, SHAPES.block_size)
    perm = torch.randperm(num_blocks - 1, generator=gen, device=DEVICE)[: rows * per_row] + 1
    return perm.view(rows, per_row).to(torch.int32)


def copy_bandwidth(report: dict) -> float:
    n = SHAPES.copy_bytes // 2
    src = torch.randn(n, device=DEVICE, dtype=DTYPE)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    gbs = 2 * src.numel() * src.element_size() / ms / 1e6
    report["copy"] = {"bytes": 2 * src.numel() * src.element_size(), "ms": ms, "GBps": gbs}
    return gbs


def check_decode(report: dict, gen: torch.Generator) -> None:
    """bf16 decode on a realistic shape (ragged lengths, skipped rows) vs the float64 reference, plus graph replay."""
    rows, max_len = (64, 4096) if not OPTS.dry_run else (3, 70)
    k, v = paged_cache(pages(rows, max_len), gen)
    table = shuffled_tables(rows, max_len, k.shape[0], gen)
    lens = torch.randint(1, max_len + 1, (rows,), generator=gen, device=DEVICE, dtype=torch.int32)
    lens[::7] = 0
    q = torch.randn(rows, SHAPES.hq, SHAPES.d, generator=gen, device=DEVICE, dtype=DTYPE)
    scale = SHAPES.d**-0.5
    ref = decode_attention_ref(q, k, v, table, lens, scale)
    live = lens > 0
    configs = [{"num_splits": s} for s in SHAPES.splits]
    configs += [{"variant": "row", "num_splits": s} for s in SHAPES.splits]
    configs += [{"variant": "row", "max_programs": BOUNDED_PROGRAMS[0]},
                {"variant": "row", "max_programs": BOUNDED_PROGRAMS[-1], "block_n": 2 * SHAPES.block_size},
                {"variant": "row_flat", "num_splits": SHAPES.splits[-1]},
                {"variant": "row_flat", "max_programs": BOUNDED_PROGRAMS[0]}]
    for cfg in configs:
        out = torch.full_like(q, float("nan"))
        what = f"decode bf16 N={rows} " + " ".join(f"{key}={val}" for key, val in cfg.items())
        try:
            decode_attention(q, k, v, table, lens, out, scale, **cfg)
        except Exception as exc:
            report["checks"].append({"what": what, "rel_err": float("nan"), "error": repr(exc)[:300], "ok": False})
            continue
        err = rel_err(out[live], ref[live])
        untouched = bool(out[~live].isnan().all())
        report["checks"].append({"what": what, "rel_err": err, "skipped_rows_untouched": untouched,
                                 "ok": err < 2e-2 and untouched})
    if DEVICE.type != "cuda":
        return
    # CUDA graph: capture with one set of lengths, change them in place, replay, compare with the new reference.
    ws = decode_workspace(rows, SHAPES.hq, SHAPES.d, 4, DEVICE)
    for variant in ("split", "row", "row_flat"):
        out = torch.full_like(q, float("nan"))
        decode_attention(q, k, v, table, lens, out, scale, num_splits=4, workspace=ws, variant=variant)  # compile
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            decode_attention(q, k, v, table, lens, out, scale, num_splits=4, workspace=ws, variant=variant)
        lens.copy_(torch.randint(1, max_len + 1, (rows,), generator=gen, device=DEVICE, dtype=torch.int32))
        graph.replay()
        err = rel_err(out, decode_attention_ref(q, k, v, table, lens, scale))
        report["checks"].append({"what": f"decode bf16 {variant} CUDA-graph replay, new lengths", "rel_err": err,
                                 "ok": err < 2e-2})


def bench_decode(report: dict, copy_gbs: float, gen: torch.Generator) -> None:
    elem = torch.tensor([], dtype=DTYPE).element_size()
    bytes_per_token = 2 * SHAPES.hkv * SHAPES.d * elem  # K and V
    page_bytes = SHAPES.block_size * bytes_per_token
    capacity = min(max(pages(r, n) for r in SHAPES.decode_rows for n in SHAPES.decode_lens),
                   SHAPES.max_cache_bytes // page_bytes)
    k, v = paged_cache(capacity, gen)
    for rows in SHAPES.decode_rows:
        q = torch.randn(rows, SHAPES.hq, SHAPES.d, generator=gen, device=DEVICE, dtype=DTYPE)
        out = torch.empty_like(q)
        # Room for the row variant's default too (one program per row, so more splits on few rows).
        ws = decode_workspace(rows, SHAPES.hq, SHAPES.d, max(*SHAPES.splits, default_num_splits(rows, 1, DEVICE)),
                              DEVICE)
        for length in SHAPES.decode_lens:
            rec: dict = {"N": rows, "seq_len": length}
            report["decode"].append(rec)
            if pages(rows, length) > capacity:
                rec["skipped"] = f"needs {rows * length * bytes_per_token / 1e9:.1f} GB of KV, over the cap"
                continue
            try:
                table = shuffled_tables(rows, length, k.shape[0], gen)
                lens = torch.full((rows,), length, dtype=torch.int32, device=DEVICE)
                moved = rows * length * bytes_per_token + 2 * q.numel() * elem + table.numel() * 4
                rec["bytes"] = moved
                rec["per_splits"] = {}
                default = default_num_splits(rows, SHAPES.hkv, DEVICE)
                for splits in sorted({*SHAPES.splits, default}):
                    ms = bench_ms(partial(decode_attention, q, k, v, table, lens, out, SHAPES.d**-0.5,
                                          num_splits=splits, workspace=ws))
                    rec["per_splits"][splits] = {"ms": ms, "GBps": moved / ms / 1e6}
                best = min(rec["per_splits"], key=lambda s: rec["per_splits"][s]["ms"])
                rec.update(best_splits=best, default_splits=default,
                           default_frac=rec["per_splits"][default]["GBps"] / copy_gbs,
                           ms=rec["per_splits"][best]["ms"], GBps=rec["per_splits"][best]["GBps"])
                rec["frac_of_copy"] = rec["GBps"] / copy_gbs
                # The row variants at their default full grid, then all variants on bounded persistent grids.
                for variant in ("row", "row_flat"):
                    row_ms = bench_ms(partial(decode_attention, q, k, v, table, lens, out, SHAPES.d**-0.5,
                                              workspace=ws, variant=variant))
                    rec[f"{variant}_default"] = {"ms": row_ms, "GBps": moved / row_ms / 1e6,
                                                 "frac_of_copy": moved / row_ms / 1e6 / copy_gbs}
                rec["bounded"] = {}
                for variant, programs in itertools.product(("split", "row", "row_flat"), BOUNDED_PROGRAMS):
                    ms = bench_ms(partial(decode_attention, q, k, v, table, lens, out, SHAPES.d**-0.5,
                                          max_programs=programs, variant=variant))
                    rec["bounded"][f"{variant}@{programs}"] = {"ms": ms, "GBps": moved / ms / 1e6,
                                                               "GBps_per_program": moved / ms / 1e6 / programs}
            except Exception as exc:  # keep going: one config's failure must not cost the run
                rec["error"] = repr(exc)
                report["failures"].append({"decode": (rows, length), "trace": traceback.format_exc()[-2000:]})
    if OPTS.tune in ("decode", "all"):
        tune_decode(report, k, v, copy_gbs, gen)
    del k, v


def tune_decode(report: dict, k: torch.Tensor, v: torch.Tensor, copy_gbs: float, gen: torch.Generator) -> None:
    """Sweep tile size, warps and pipeline depth on two representative shapes (to choose the defaults)."""
    cases = [(256, 2048), (1024, 4096)] if not OPTS.dry_run else [(2, 40)]
    elem = k.element_size()
    for rows, length in cases:
        if pages(rows, length) > k.shape[0] - 1:
            continue
        q = torch.randn(rows, SHAPES.hq, SHAPES.d, generator=gen, device=DEVICE, dtype=DTYPE)
        out = torch.empty_like(q)
        ws = decode_workspace(rows, SHAPES.hq, SHAPES.d, 8, DEVICE)
        table = shuffled_tables(rows, length, k.shape[0], gen)
        lens = torch.full((rows,), length, dtype=torch.int32, device=DEVICE)
        moved = rows * length * 2 * SHAPES.hkv * SHAPES.d * elem
        # The interpreter ignores warps and stages: the dry run only walks the code path.
        for block_n in (32, 64, 128) if not OPTS.dry_run else (32,):
            for warps in (2, 4, 8) if not OPTS.dry_run else (4,):
                for stages in (1, 2, 3, 4) if not OPTS.dry_run else (2,):
                    for splits in (1, 2, 4) if not OPTS.dry_run else (2,):
                        rec = {"N": rows, "seq_len": length, "block_n": block_n, "num_warps": warps,
                               "num_stages": stages, "splits": splits}
                        try:
                            ms = bench_ms(partial(
                                decode_attention, q, k, v, table, lens, out, 0.1, num_splits=splits, workspace=ws,
                                block_n=block_n, num_warps=warps, num_stages=stages))
                            rec.update(ms=ms, frac_of_copy=moved / ms / 1e6 / copy_gbs)
                        except Exception as exc:
                            rec["error"] = repr(exc)[:300]
                        report["tune"].append(rec)
        # The row variants: one program per row (all kv heads); tiles of whole pages. Full grid and bounded grids.
        grids = [{"splits": s} for s in (1, 2, 4)] + [{"max_programs": p} for p in (48, 132)]
        for variant, block_n in itertools.product(("row", "row_flat"), (16, 32, 64) if not OPTS.dry_run else (16,)):
            for warps in (4, 8) if not OPTS.dry_run else (4,):
                for stages in (1, 2, 3, 4) if not OPTS.dry_run else (2,):
                    for grid in grids if not OPTS.dry_run else grids[1:2] + grids[-1:]:
                        rec = {"N": rows, "seq_len": length, "variant": variant, "block_n": block_n,
                               "num_warps": warps, "num_stages": stages, **grid}
                        try:
                            ms = bench_ms(partial(
                                decode_attention, q, k, v, table, lens, out, 0.1, num_splits=grid.get("splits"),
                                workspace=ws, max_programs=grid.get("max_programs"), block_n=block_n,
                                num_warps=warps, num_stages=stages, variant=variant))
                            rec.update(ms=ms, frac_of_copy=moved / ms / 1e6 / copy_gbs)
                        except Exception as exc:
                            rec["error"] = repr(exc)[:300]
                        report["tune"].append(rec)


def causal_flops(q_len: int, ctx: int) -> float:
    """QK^T and PV over the visible keys: query i sees ctx + i + 1 keys."""
    visible = q_len * ctx + q_len * (q_len + 1) / 2
    return 4.0 * SHAPES.hq * SHAPES.d * visible


def bench_prefill(report: dict, gen: torch.Generator) -> None:
    scale = SHAPES.d**-0.5
    for chunk in SHAPES.prefill_chunks:
        segs = max(1, SHAPES.prefill_tokens // chunk)
        for ctx in SHAPES.prefill_ctx:
            rec: dict = {"chunk": chunk, "ctx": ctx, "segments": segs}
            report["prefill"].append(rec)
            try:
                k, v = paged_cache(pages(segs, ctx + chunk), gen)
                table = shuffled_tables(segs, ctx + chunk, k.shape[0], gen)
                q = torch.randn(segs * chunk, SHAPES.hq, SHAPES.d, generator=gen, device=DEVICE, dtype=DTYPE)
                out = torch.full_like(q, float("nan"))
                i32 = dict(dtype=torch.int32, device=DEVICE)
                q_start = torch.arange(segs, **i32) * chunk
                q_len = torch.full((segs,), chunk, **i32)
                ctx_len = torch.full((segs,), ctx, **i32)
                run = partial(prefill_attention, q, k, v, out, q_start, q_len, ctx_len, table, scale, chunk)
                run()
                ref = prefill_attention_ref(q, k, v, q_start[:1], q_len[:1], ctx_len[:1], table[:1], scale)
                rec["rel_err_first_segment"] = rel_err(out[:chunk], ref[:chunk])
                rec["all_rows_written"] = not bool(out.isnan().any())
                ms = bench_ms(run)
                rec.update(ms=ms, TFLOPs=segs * causal_flops(chunk, ctx) / ms / 1e9)
                if ctx == 0:
                    # SDPA on contiguous [segs, H, chunk, D] q/k/v; GQA expanded beforehand (not timed).
                    group = SHAPES.hq // SHAPES.hkv
                    qq = q.view(segs, chunk, SHAPES.hq, SHAPES.d).transpose(1, 2).contiguous()
                    kk = torch.randn(segs, SHAPES.hkv, chunk, SHAPES.d, generator=gen, device=DEVICE, dtype=DTYPE)
                    kk = kk.repeat_interleave(group, 1).contiguous()
                    vv = torch.randn_like(kk)
                    sdpa = torch.nn.functional.scaled_dot_product_attention
                    sms = bench_ms(partial(sdpa, qq, kk, vv, is_causal=True, scale=scale))
                    rec.update(sdpa_ms=sms, sdpa_TFLOPs=segs * causal_flops(chunk, 0) / sms / 1e9)
                del k, v
            except Exception as exc:
                rec["error"] = repr(exc)
                report["failures"].append({"prefill": (chunk, ctx), "trace": traceback.format_exc()[-2000:]})


def tune_prefill(report: dict, gen: torch.Generator) -> None:
    """Sweep prefill tiles, warps and pipeline depth on a short and a long chunk (to choose the defaults)."""
    cases = [(512, 0, 16), (2048, 1024, 4)] if not OPTS.dry_run else [(32, 20, 2)]
    for chunk, ctx, segs in cases:
        k, v = paged_cache(pages(segs, ctx + chunk), gen)
        table = shuffled_tables(segs, ctx + chunk, k.shape[0], gen)
        q = torch.randn(segs * chunk, SHAPES.hq, SHAPES.d, generator=gen, device=DEVICE, dtype=DTYPE)
        out = torch.empty_like(q)
        i32 = dict(dtype=torch.int32, device=DEVICE)
        meta = (torch.arange(segs, **i32) * chunk, torch.full((segs,), chunk, **i32), torch.full((segs,), ctx, **i32))
        sweep = itertools.product((64, 128), (32, 64), (4, 8), (2, 3), (False, True))
        for block_m, block_n, warps, stages, pack in sweep if not OPTS.dry_run else [(32, 16, 4, 2, True)]:
            rec = {"chunk": chunk, "ctx": ctx, "block_m": block_m, "block_n": block_n, "num_warps": warps,
                   "num_stages": stages, "pack_gqa": pack}
            try:
                ms = bench_ms(partial(prefill_attention, q, k, v, out, *meta, table, 0.1, chunk, block_m=block_m,
                                      block_n=block_n, num_warps=warps, num_stages=stages, pack_gqa=pack))
                rec.update(ms=ms, TFLOPs=segs * causal_flops(chunk, ctx) / ms / 1e9)
            except Exception as exc:
                rec["error"] = repr(exc)[:300]
            report["tune_prefill"].append(rec)

def print_table(report: dict) -> None:
    print(f"\n{report['device']}  torch {report['torch']}  triton {report['triton']}")
    print(f"copy bandwidth: {report['copy']['GBps']:.0f} GB/s (read + write)")
    for c in report["checks"]:
        print(f"check {c['what']}: rel_err {c['rel_err']:.2e} {'ok' if c['ok'] else 'FAILED'}")
    print("decode     N  seq_len  splits(default)     ms     GB/s  of-copy")
    for r in report["decode"]:
        if "ms" in r:
            print(f"       {r['N']:5d}  {r['seq_len']:7d}  {r['best_splits']:6d}({r['default_splits']})  "
                  f"{r['ms']:8.3f}  {r['GBps']:7.0f}  {r['frac_of_copy']:6.1%}")
            for variant in ("row", "row_flat"):
                if f"{variant}_default" in r:
                    row = r[f"{variant}_default"]
                    print(f"        {variant:8s} (default grid)     {row['ms']:8.3f}  {row['GBps']:7.0f}  "
                          f"{row['frac_of_copy']:6.1%}")
            if r.get("bounded"):
                print("        bounded GB/s:", ", ".join(f"{key} {b['GBps']:.0f}" for key, b in r["bounded"].items()))
        else:
            print(f"       {r['N']:5d}  {r['seq_len']:7d}  {r.get('skipped') or r.get('error')}")
    print("prefill chunk   ctx  segs      ms   TFLOP/s  SDPA TFLOP/s  rel_err")
    for r in report["prefill"]:
        if "ms" in r:
            sdpa = f"{r['sdpa_TFLOPs']:12.1f}" if "sdpa_TFLOPs" in r else "           -"
            print(f"       {r['chunk']:5d} {r['ctx']:5d} {r['segments']:5d} {r['ms']:7.3f} {r['TFLOPs']:9.1f} "
                  f"{sdpa}  {r['rel_err_first_segment']:.1e}")
        else:
            print(f"       {r['chunk']:5d} {r['ctx']:5d}  {r.get('error')}")
    if report["tune"]:
        best = sorted((t for t in report["tune"] if "ms" in t), key=lambda t: (t["N"], t["ms"]))
        keys = ("block_n", "num_warps", "num_stages", "splits", "max_programs", "frac_of_copy")
        for rows in sorted({t["N"] for t in best}):
            for variant in ("split", "row", "row_flat"):
                print(f"tune N={rows} {variant} best:", [
                    {k: t[k] for k in keys if k in t}
                    for t in best if t["N"] == rows and t.get("variant", "split") == variant][:4])
    for chunk in sorted({t["chunk"] for t in report["tune_prefill"]}):
        best = sorted((t for t in report["tune_prefill"] if t["chunk"] == chunk and "ms" in t), key=lambda t: t["ms"])
        print(f"tune prefill chunk={chunk} best:", [
            {k: t[k] for k in ("block_m", "block_n", "num_warps", "num_stages", "pack_gqa", "TFLOPs")}
            for t in best[:4]])
    print(f"failures: {len(report['failures'])}")


def main() -> int:
    started = time.time()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    report: dict = {**report_header(None if DEVICE.type == "cuda" else DRY_RUN_DEVICE), "dtype": str(DTYPE),
                    "shapes": SHAPES.__dict__, "checks": [], "decode": [], "prefill": [], "tune": [],
                    "tune_prefill": [], "failures": []}
    if DEVICE.type == "cuda":
        report["sm_count"] = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    copy_gbs = copy_bandwidth(report)
    steps = [partial(check_decode, report, gen), partial(bench_decode, report, copy_gbs, gen),
             partial(bench_prefill, report, gen)]
    if OPTS.tune in ("prefill", "all"):
        steps.append(partial(tune_prefill, report, gen))
    for step in steps:
        try:
            step()
        except Exception:
            report["failures"].append({"step": "top", "trace": traceback.format_exc()[-2000:]})
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    report["wall_s"] = time.time() - started
    out = Path(OPTS.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "attention_bench.json").write_text(json.dumps(report, indent=1, default=str))
    print_table(report)
    for f in report["failures"]:
        print(f["trace"])
    return 1 if report["failures"] or not all(c["ok"] for c in report["checks"]) else 0


if __name__ == "__main__":
    sys.exit(main())
