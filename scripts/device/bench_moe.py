"""Benchmark and check the MoE grouped GEMM on a GPU; writes ``$OUT/moe_bench.json``.

Mixtral-8x7B shapes (hidden 4096, intermediate 14336, 8 experts, top-2), bf16. For 1,024-4,096 routed rows (tokens x
2) with a random top-2 routing (softmax of Gaussian logits, as a random router gives) and a skewed one (a per-expert
logit bias, so a few experts take most rows), each of the layer's two grouped GEMMs (gate_up: N=28672, K=4096;
down: N=4096, K=14336) is timed as:

* ``triton``: ``nanoflow.ops.grouped_gemm`` (default tiles), TFLOP/s and the rate at which it streams the expert
  weights (every expert's weights must be read once: the memory floor);
* ``dense``: one ``torch.mm`` of the same M, N, K (same FLOPs, one expert's weights): the cuBLAS compute reference;
* ``loop``: a torch loop of per-expert ``torch.mm`` (what a naive MoE does);
* ``torch_grouped``: ``torch._grouped_mm`` when this torch has it (CUTLASS on sm90).

Then the whole ``experts`` op (sort, gather, both GEMMs, SiLU*mul, weighted combine) per token count, a small tile
sweep, and checks: each GEMM vs per-expert fp32 torch products, the MoE block vs the float64 reference, and a CUDA
graph captured on one routing and replayed after the routing (offsets and rows) changed. Every config is isolated:
a failure is recorded and the run goes on. About a minute on an H200.

    python scripts/device/bench_moe.py            # on the GPU machine
    python scripts/device/bench_moe.py --dry-run  # tiny shapes on the CPU through TRITON_INTERPRET
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

from _cli import parse_script_args


def _args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--no-tune", action="store_true", help="skip the tile sweep")


OPTS = parse_script_args(__doc__, "moe_bench.json", _args)

import torch  # noqa: E402
from _common import DRY_RUN_DEVICE, rel_err, report_header  # noqa: E402
from _common import bench_ms as _bench_ms  # noqa: E402

from nanoflow.ops import moe  # noqa: E402
from nanoflow.ops.grouped_gemm import GemmConfig, default_config, grouped_gemm  # noqa: E402


@dataclass(frozen=True)
class Shapes:
    hidden: int
    inter: int
    experts: int
    top_k: int
    routed_rows: tuple[int, ...]
    tune_rows: tuple[int, ...]
    tune: tuple[GemmConfig, ...]
    check_tokens: int


_TILES = ((64, 128, 64, 4, 4), (128, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4),
          (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 128, 8, 3), (64, 256, 64, 4, 4),
          (256, 128, 64, 8, 3))
# The grouped tile order (GemmConfig.group_m) on the best tiles of sessions 7-8 (gate/up: pointer 128x256 and TMA
# 128x128; down: TMA 128x128 and 64x256). Warp specialisation was swept in session 8 and tied the best tiles
# (s8-moe-grouped-gemm-ws-h200.json), so it is no longer swept.
_GROUPED = (((128, 256, 64, 8, 4), False), ((128, 128, 64, 8, 3), True), ((128, 128, 64, 4, 4), True),
            ((64, 256, 64, 4, 4), True))
GPU = Shapes(4096, 14336, 8, 2, (1024, 2048, 4096), (2048, 4096),
             tuple(GemmConfig(*t, tma=tma) for tma in (True, False) for t in _TILES)
             + tuple(GemmConfig(*t, tma=tma, group_m=g) for t, tma in _GROUPED for g in (4, 8, 16)), 256)
TINY = Shapes(32, 48, 4, 2, (24, 40), (40,), (GemmConfig(16, 32, 16), GemmConfig(16, 32, 16, tma=True),
                                              GemmConfig(16, 32, 16, tma=True, warp_specialize=True),
                                              GemmConfig(16, 32, 16, group_m=2)), 12)
SHAPES = TINY if OPTS.dry_run else GPU
DEVICE = torch.device("cpu" if OPTS.dry_run else "cuda")
DTYPE = torch.bfloat16
TUNE_BUDGET_S = 90.0  # the sweep starts no new config after this long (keeps the whole run under three minutes)


def bench_ms(fn: Callable[[], object]) -> float:
    return _bench_ms(fn, OPTS.dry_run, warmup=10, rep=50)


def routing(tokens: int, skew: bool, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights, experts)`` of a random router: Gaussian logits, plus a linear per-expert bias when skewed."""
    logits = torch.randn(tokens, SHAPES.experts, generator=gen, device=DEVICE)
    if skew:
        logits += torch.linspace(1.5, -1.5, SHAPES.experts, device=DEVICE)
    return moe.route(logits, SHAPES.top_k)


def loop_mm(x: torch.Tensor, bounds: list[int], w: torch.Tensor, out: torch.Tensor) -> None:
    for e in range(w.shape[0]):
        if bounds[e + 1] > bounds[e]:
            torch.mm(x[bounds[e]:bounds[e + 1]], w[e].t(), out=out[bounds[e]:bounds[e + 1]])


def bench_gemms(report: dict, weights: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    for rows in SHAPES.routed_rows:
        for skew in (False, True):
            _, experts = routing(rows // SHAPES.top_k, skew, gen)
            order = moe.sort_by_expert(experts, SHAPES.experts)
            counts = (order.offsets[1:] - order.offsets[:-1]).tolist()
            bounds = order.offsets.tolist()
            for gemm, w in weights.items():
                rec: dict = {"gemm": gemm, "rows": rows, "routing": "skewed" if skew else "random",
                             "N": w.shape[1], "K": w.shape[2], "max_rows_per_expert": max(counts),
                             "min_rows_per_expert": min(counts), "config": default_config(
                                 rows, w.shape[1], w.shape[2], SHAPES.experts, DEVICE)._asdict()}
                report["gemm"].append(rec)
                try:
                    x = torch.randn(rows, w.shape[2], generator=gen, device=DEVICE, dtype=DTYPE)
                    out = torch.empty(rows, w.shape[1], device=DEVICE, dtype=DTYPE)
                    flop = 2.0 * rows * w.shape[1] * w.shape[2]
                    w_bytes = w.numel() * w.element_size()
                    ms = bench_ms(partial(grouped_gemm, x, order.offsets, w, out))
                    rec.update(ms=ms, TFLOPs=flop / ms / 1e9, weight_GBps=w_bytes / ms / 1e6)
                    pointers = default_config(rows, w.shape[1], w.shape[2], SHAPES.experts, DEVICE)._replace(tma=False)
                    pms = bench_ms(partial(grouped_gemm, x, order.offsets, w, out, config=pointers))
                    rec.update(pointer_ms=pms, pointer_TFLOPs=flop / pms / 1e9)
                    ref = torch.empty_like(out, dtype=torch.float32)
                    loop_mm(x.float(), bounds, w.float(), ref)
                    rec["rel_err"] = rel_err(out, ref)
                    dense_out = torch.empty_like(out)
                    dms = bench_ms(partial(torch.mm, x, w[0].t(), out=dense_out))
                    rec.update(dense_ms=dms, dense_TFLOPs=flop / dms / 1e9)
                    lms = bench_ms(partial(loop_mm, x, bounds, w, dense_out))
                    rec.update(loop_ms=lms, loop_TFLOPs=flop / lms / 1e9)
                    if hasattr(torch, "_grouped_mm") and DEVICE.type == "cuda":
                        try:
                            wt = w.transpose(1, 2)
                            ends = order.offsets[1:]
                            got = torch._grouped_mm(x, wt, offs=ends)
                            rec["torch_grouped_rel_err"] = rel_err(got, ref)
                            tms = bench_ms(partial(torch._grouped_mm, x, wt, offs=ends))
                            rec.update(torch_grouped_ms=tms, torch_grouped_TFLOPs=flop / tms / 1e9)
                        except Exception as exc:  # optional comparison only
                            rec["torch_grouped_error"] = repr(exc)[:300]
                    del x, out, ref, dense_out
                except Exception as exc:  # keep going: one config's failure must not cost the run
                    rec["error"] = repr(exc)[:500]
                    report["failures"].append({"gemm": (gemm, rows, skew), "trace": traceback.format_exc()[-2000:]})


def sort_token_major(experts: torch.Tensor, num_experts: int) -> moe.ExpertOrder:
    """Session 6's ``sort_by_expert``: the one-hot as ``[pairs, E]``, scanned along its outer (strided) dim."""
    flat = experts.reshape(-1).long()
    ids = torch.arange(num_experts, device=flat.device)
    hit = (flat[:, None] == ids[None, :]).to(torch.int32)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(hit.sum(dim=0, dtype=torch.int64), dim=0, out=offsets[1:])
    rank = torch.cumsum(hit, dim=0).gather(1, flat[:, None]).squeeze(1) - 1
    position = offsets[flat] + rank
    order = torch.empty_like(position).scatter_(0, position, torch.arange(flat.numel(), device=flat.device))
    return moe.ExpertOrder(order, offsets.to(torch.int32), position)


def bench_block(report: dict, weights: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """The whole experts op (what the ``experts`` nano-op runs) per token count, random routing."""
    w13, w2 = weights["gate_up"], weights["down"]
    h, inter, k = SHAPES.hidden, SHAPES.inter, SHAPES.top_k
    for rows in SHAPES.routed_rows:
        tokens = rows // k
        rec: dict = {"tokens": tokens, "rows": rows}
        report["block"].append(rec)
        try:
            x = torch.randn(tokens, h, generator=gen, device=DEVICE, dtype=DTYPE)
            wts, experts = routing(tokens, False, gen)
            scratch = moe.MoEScratch(*(torch.empty(rows, n, device=DEVICE, dtype=DTYPE)
                                       for n in (h, 2 * inter, inter, h)))
            out = torch.empty_like(x)
            ms = bench_ms(partial(moe.experts_forward, x, wts, experts, w13, w2, out, scratch))
            flop = 2.0 * rows * 3 * h * inter
            rec.update(ms=ms, TFLOPs=flop / ms / 1e9)
            rec["sort_ms"] = bench_ms(partial(moe.sort_by_expert, experts, SHAPES.experts))
            rec["sort_token_major_ms"] = bench_ms(partial(sort_token_major, experts, SHAPES.experts))
            got, want = moe.sort_by_expert(experts, SHAPES.experts), sort_token_major(experts, SHAPES.experts)
            rec["sort_layouts_agree"] = all(torch.equal(a, b) for a, b in zip(got, want))
        except Exception as exc:
            rec["error"] = repr(exc)[:500]
            report["failures"].append({"block": tokens, "trace": traceback.format_exc()[-2000:]})


def tune(report: dict, weights: dict[str, torch.Tensor], gen: torch.Generator, started: float) -> None:
    for rows in SHAPES.tune_rows:
        _, experts = routing(rows // SHAPES.top_k, False, gen)
        offsets = moe.sort_by_expert(experts, SHAPES.experts).offsets
        for gemm, w in weights.items():
            x = torch.randn(rows, w.shape[2], generator=gen, device=DEVICE, dtype=DTYPE)
            out = torch.empty(rows, w.shape[1], device=DEVICE, dtype=DTYPE)
            for cfg in SHAPES.tune:
                rec: dict = {"gemm": gemm, "rows": rows, **cfg._asdict()}
                if time.time() - started > TUNE_BUDGET_S and not OPTS.dry_run:
                    rec["skipped"] = "time budget"
                    report["tune"].append(rec)
                    continue
                try:
                    ms = bench_ms(partial(grouped_gemm, x, offsets, w, out, config=cfg))
                    rec.update(ms=ms, TFLOPs=2.0 * rows * w.shape[1] * w.shape[2] / ms / 1e9)
                except Exception as exc:
                    rec["error"] = repr(exc)[:300]
                report["tune"].append(rec)


def checks(report: dict, weights: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """Route + the experts op against the float64 reference, eagerly and (on a GPU) replayed from a CUDA graph."""
    h, inter, k, e = SHAPES.hidden, SHAPES.inter, SHAPES.top_k, SHAPES.experts
    tokens = SHAPES.check_tokens
    w13, w2 = weights["gate_up"], weights["down"]
    x = torch.randn(tokens, h, generator=gen, device=DEVICE, dtype=DTYPE)
    router = torch.randn(e, h, generator=gen, device=DEVICE, dtype=DTYPE) / h**0.5
    scratch = moe.MoEScratch(*(torch.empty(tokens * k, n, device=DEVICE, dtype=DTYPE)
                               for n in (h, 2 * inter, inter, h)))
    out = torch.empty_like(x)

    def block() -> None:
        # fp32 logits from the bf16 inputs route like the reference's float64 ones (bf16 logits could flip near-ties)
        wts, experts = moe.route(x.float() @ router.float().t(), k)
        moe.experts_forward(x, wts, experts, w13, w2, out, scratch)

    def check_block(what: str) -> None:
        err = rel_err(out, moe.moe_reference(x, router, w13, w2, k, dtype=torch.float64))
        report["checks"].append({"what": f"MoE block bf16, {tokens} tokens vs float64, {what}", "rel_err": err,
                                 "ok": err < 3e-2})

    try:  # route + the experts op, bf16, against the float64 loop over experts
        block()
        check_block("eager")
        if DEVICE.type == "cuda":  # the same, captured once, replayed on new tokens (so a new routing)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                block()
            x.copy_(torch.randn(tokens, h, generator=gen, device=DEVICE, dtype=DTYPE))
            out.fill_(float("nan"))
            graph.replay()
            check_block("CUDA-graph replay on new tokens")
    except Exception as exc:
        report["checks"].append({"what": "MoE block", "error": repr(exc)[:500], "ok": False})


def check_gemm_graph(report: dict, weights: dict[str, torch.Tensor], gen: torch.Generator) -> None:
    """One grouped GEMM captured on routing A, replayed after routing B's rows and offsets were written in place."""
    if DEVICE.type != "cuda":
        return
    h, k, e = SHAPES.hidden, SHAPES.top_k, SHAPES.experts
    try:
        rows = 2048
        w = weights["gate_up"]
        x = torch.randn(rows, h, generator=gen, device=DEVICE, dtype=DTYPE)
        offsets = moe.sort_by_expert(routing(rows // k, False, gen)[1], e).offsets
        out = torch.full((rows, w.shape[1]), float("nan"), device=DEVICE, dtype=DTYPE)
        grouped_gemm(x, offsets, w, out)  # compile outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            grouped_gemm(x, offsets, w, out)
        new = moe.sort_by_expert(routing(rows // k, True, gen)[1], e).offsets
        new = new.clamp(max=rows - 5)  # the last 5 rows are outside every expert now: they must not be written
        offsets.copy_(new)
        x.copy_(torch.randn(rows, h, generator=gen, device=DEVICE, dtype=DTYPE))
        out.fill_(float("nan"))
        graph.replay()
        ref = torch.empty(rows, w.shape[1], device=DEVICE)
        loop_mm(x.float(), offsets.tolist(), w.float(), ref)
        err = rel_err(out[:rows - 5], ref[:rows - 5])
        untouched = bool(out[rows - 5:].isnan().all())
        report["checks"].append({"what": "grouped GEMM CUDA-graph replay, new routing", "rel_err": err,
                                 "rows_past_offsets_untouched": untouched, "ok": err < 1e-2 and untouched})
    except Exception as exc:
        report["checks"].append({"what": "CUDA-graph replay", "error": repr(exc)[:500], "ok": False})


def print_table(report: dict) -> None:
    print(f"\n{report['device']}  torch {report['torch']}  triton {report['triton']}  ({report['seconds']:.0f} s)")
    for c in report["checks"]:
        print(f"check {c['what']}: " + (f"rel_err {c['rel_err']:.2e} " if "rel_err" in c else c.get("error", ""))
              + ("ok" if c["ok"] else "FAILED"))
    print("gemm     rows  routing  rows/expert   triton TF/s  (W GB/s)  pointers  dense TF/s  loop TF/s  torch_grouped"
          "  rel_err")
    for r in report["gemm"]:
        spread = f"{r['min_rows_per_expert']:5d}-{r['max_rows_per_expert']:<5d}"
        head = f"{r['gemm']:8s} {r['rows']:5d}  {r['routing']:7s} {spread}"
        if "ms" not in r:
            print(f"{head}  {r.get('error')}")
            continue
        tg = f"{r['torch_grouped_TFLOPs']:13.0f}" if "torch_grouped_TFLOPs" in r else "            -"
        print(f"{head}  {r['TFLOPs']:11.0f}  {r['weight_GBps']:8.0f}  {r['pointer_TFLOPs']:8.0f}  "
              f"{r['dense_TFLOPs']:10.0f}  "
              f"{r['loop_TFLOPs']:9.0f}  {tg}  {r['rel_err']:.1e}")
    print("experts op  tokens   ms      TF/s   sort ms (token-major ms, agree)")
    for r in report["block"]:
        print(f"            {r['tokens']:6d} " + (
            f"{r['ms']:7.3f}  {r['TFLOPs']:6.0f}   {r['sort_ms']:.3f} ({r['sort_token_major_ms']:.3f}, "
            f"{r['sort_layouts_agree']})" if "sort_ms" in r else r.get("error", "")))
    for gemm in ("gate_up", "down"):
        for rows in SHAPES.tune_rows:
            best = sorted((t for t in report["tune"] if t["gemm"] == gemm and t["rows"] == rows and "ms" in t),
                          key=lambda t: t["ms"])[:3]
            if best:
                print(f"tune {gemm} rows={rows} best:", [
                    (t["block_m"], t["block_n"], t["block_k"], t["num_warps"], t["num_stages"],
                     ("tma+ws" if t.get("warp_specialize") else "tma") if t["tma"] else "ptr",
                     f"g{t.get('group_m', 0)}", round(t["TFLOPs"]))
                    for t in best])
    print(f"failures: {len(report['failures'])}")


def main() -> int:
    started = time.time()
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    report: dict = {**report_header(None if DEVICE.type == "cuda" else DRY_RUN_DEVICE), "dtype": str(DTYPE),
                    "model": "mixtral-8x7b" if not OPTS.dry_run else "tiny", "shapes": asdict(SHAPES),
                    "gemm": [], "block": [], "tune": [], "checks": [], "failures": []}
    h, inter, e = SHAPES.hidden, SHAPES.inter, SHAPES.experts
    # Scaled like trained weights so bf16 activations stay in range through both GEMMs.
    weights = {
        "gate_up": torch.randn(e, 2 * inter, h, generator=gen, device=DEVICE, dtype=DTYPE) / h**0.5,
        "down": torch.randn(e, h, inter, generator=gen, device=DEVICE, dtype=DTYPE) / inter**0.5,
    }
    out_dir = Path(OPTS.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for step in (checks, check_gemm_graph, bench_gemms, bench_block):
        step(report, weights, gen)
    if not OPTS.no_tune:
        tune(report, weights, gen, time.time())
    report["seconds"] = time.time() - started
    (out_dir / "moe_bench.json").write_text(json.dumps(report, indent=1, default=str))
    print_table(report)
    return 0 if all(c["ok"] for c in report["checks"]) and not report["failures"] else 1


if __name__ == "__main__":
    sys.exit(main())
