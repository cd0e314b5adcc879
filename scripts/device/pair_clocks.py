"""Why a GEMM slows beside decode attention: clocks, power and throughput of each alone and of the pair.

green_decode.py found the gate/up GEMM losing 50-65% of its speed when decode attention runs in a green context of
the other SMs, whatever the decode kernel and its L2 policy, while each alone in its partition would sum to well
above 1. This script runs, for a few seconds each, inside green contexts (decode ``--decode-sms``, GEMM the rest):

1. the GEMM alone, 2. decode attention alone, 3. both at once (each on its own stream, relaunched back to back),
4. with ``--partners``: the same for other memory-bound partners in decode's partition, to tell what in decode hurts
   the GEMM: ``decode_contig`` (the same decode over a block table whose pages are consecutive per row, not
   shuffled), ``copy`` (a plain device-to-device copy of the same bytes as one decode call reads) and ``read``
   (a max over those bytes: reads only, as decode),

and samples ``nvidia-smi`` (SM and memory clocks, power, temperature) every 100 ms. Per phase it reports launches
per second of each kernel (the pair phase relaunches both in lock step, so its rate is the pair's: the
summary sets the pair's time against the two apart), and the median clocks and power. If the SM clock falls
in the pair, the GPU is at its power limit and the slowdown is the clock's; if the clocks hold, it is the memory
system's.

    python scripts/device/pair_clocks.py             # on the GPU machine (about 30 s)
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from _cli import parse_script_args


def _args(ap) -> None:
    ap.add_argument("--decode-sms", type=int, default=48, help="SMs of decode attention's green context")
    ap.add_argument("--seconds", type=float, default=4.0, help="length of each phase")
    ap.add_argument("--variant", default="cuda", help="decode_attention variant (cuda or split)")
    ap.add_argument("--gemm-tokens", type=int, default=1024, help="rows of the gate/up GEMM (x 4096 -> 28672)")
    ap.add_argument("--pool-gb", type=float, default=0.0, help="size of the K and V page pools together; decode's "
                    "shuffled pages are spread over all of it (a serving cache is tens of GB; default: just the "
                    "pages one call reads, ~1.6 GB; the cuda variant takes at most 4 GiB per K or V pool)")
    ap.add_argument("--partners", default="decode", help="comma list of the memory-bound kernels paired with the "
                    "GEMM: decode (shuffled pages, as a serving cache), decode_contig (consecutive pages), copy, read")


OPTS = parse_script_args(__doc__, "pair_clocks.json", _args,
                         dry_run_help="not available: needs green contexts on a GPU")

import torch  # noqa: E402
from _common import report_header  # noqa: E402

from nanoflow.ops.attention import decode_attention, decode_workspace  # noqa: E402
from nanoflow.ops.kv_store import FP8  # noqa: E402

ROWS, LENGTH, HQ, HKV, D, PAGE = 640, 1280, 32, 8, 128, 16
FIELDS = ("clocks.sm", "clocks.mem", "power.draw", "temperature.gpu")


def sampler(stop: threading.Event, samples: list) -> None:
    cmd = ["nvidia-smi", f"--query-gpu={','.join(FIELDS)}", "--format=csv,noheader,nounits", "-lms", "100"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        vals = [v.strip() for v in line.split(",")]
        try:
            samples.append((time.time(), *[float(v) for v in vals]))
        except ValueError:
            continue
        if stop.is_set():
            break
    proc.terminate()


def main() -> int:
    if OPTS.dry_run or not torch.cuda.is_available():
        raise SystemExit("pair_clocks.py needs a CUDA GPU (green contexts, nvidia-smi); it has no CPU dry run")
    from torch.cuda.green_contexts import GreenContext

    dev = torch.device("cuda")
    total = torch.cuda.get_device_properties(dev).multi_processor_count
    gen = torch.Generator(device=dev).manual_seed(0)
    per_row = LENGTH // PAGE
    used = ROWS * per_row
    blocks = 1 + max(used, int(OPTS.pool_gb * 1e9 / (2 * PAGE * HKV * D)))
    # Random float8 bytes below 0x38 (|x| < 1, no NaN): built in place, no bfloat16 copy of a pool of tens of GB.
    k = torch.randint(0, 0x38, (blocks, PAGE, HKV, D), generator=gen, device=dev, dtype=torch.uint8).view(FP8)
    v = torch.randint(0, 0x38, (blocks, PAGE, HKV, D), generator=gen, device=dev, dtype=torch.uint8).view(FP8)
    table = (torch.randperm(blocks - 1, generator=gen, device=dev)[:used] + 1).view(ROWS, per_row).to(torch.int32)
    q = torch.randn(ROWS, HQ, D, generator=gen, device=dev, dtype=torch.bfloat16)
    lens = torch.full((ROWS,), LENGTH, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    ws = decode_workspace(ROWS, HQ, D, 16, dev)
    x = torch.randn(OPTS.gemm_tokens, 4096, device=dev, dtype=torch.bfloat16)
    w = torch.randn(28672, 4096, device=dev, dtype=torch.bfloat16) * 0.02
    y = torch.empty(OPTS.gemm_tokens, 28672, device=dev, dtype=torch.bfloat16)
    # Keep the contexts referenced: a collected GreenContext destroys its streams' context.
    ctx_d = GreenContext.create(num_sms=OPTS.decode_sms, device_id=dev.index or 0)
    ctx_g = GreenContext.create(num_sms=total - OPTS.decode_sms, device_id=dev.index or 0)
    sd, sg = ctx_d.Stream(), ctx_g.Stream()

    contig = (torch.arange(used, device=dev, dtype=torch.int32) + 1).view(ROWS, per_row)
    src = torch.empty(2 * ROWS * LENGTH * HKV * D, dtype=torch.uint8, device=dev)  # K and V bytes of one call
    dst = torch.empty_like(src)
    src16, peak = src.view(torch.float16), torch.empty((), dtype=torch.float16, device=dev)

    def decode() -> None:
        decode_attention(q, k, v, table, lens, out, D**-0.5, workspace=ws, variant=OPTS.variant)

    def decode_contig() -> None:
        decode_attention(q, k, v, contig, lens, out, D**-0.5, workspace=ws, variant=OPTS.variant)

    def copy() -> None:
        dst.copy_(src)

    def read() -> None:
        torch.amax(src16, out=peak)

    def gemm() -> None:
        torch.mm(x, w.t(), out=y)

    partners = {f.__name__: f for f in (decode, decode_contig, copy, read)}
    chosen = [p.strip() for p in OPTS.partners.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in partners]
    if unknown or not chosen:
        raise SystemExit(f"--partners {OPTS.partners!r}: name one or more of {', '.join(partners)}")
    for fn, s in ((gemm, sg), *((partners[p], sd) for p in chosen)):  # compile / pick kernels outside the timing
        with torch.cuda.stream(s):
            fn()
    torch.cuda.synchronize()

    samples: list = []
    stop = threading.Event()
    thread = threading.Thread(target=sampler, args=(stop, samples), daemon=True)
    thread.start()
    time.sleep(1.0)
    phases = []
    plan = [("gemm", [(gemm, sg)])]
    for p in chosen:
        plan += [(p, [(partners[p], sd)]), ("pair" if p == "decode" else f"pair_{p}", [(gemm, sg), (partners[p], sd)])]
    for name, jobs in (*plan, ("idle", [])):
        counts = [0] * len(jobs)
        start = time.time()
        while time.time() - start < OPTS.seconds:
            for i, (fn, s) in enumerate(jobs):
                with torch.cuda.stream(s):
                    for _ in range(4):
                        fn()
                counts[i] += 4
            if jobs:
                torch.cuda.synchronize()
            else:
                time.sleep(0.05)
        end = time.time()
        phase = {"phase": name, "seconds": end - start}
        for (fn, _), c in zip(jobs, counts):
            phase[f"{fn.__name__}_per_s"] = c / (end - start)
        inside = [s for s in samples if start + 0.3 <= s[0] <= end]
        for j, field in enumerate(FIELDS, start=1):
            vals = [s[j] for s in inside]
            phase[field] = statistics.median(vals) if vals else None
        phase["samples"] = len(inside)
        phases.append(phase)
        print(json.dumps(phase), flush=True)
    stop.set()
    by = {p["phase"]: p for p in phases}
    summary = {}
    for p in chosen:
        pair = by["pair" if p == "decode" else f"pair_{p}"]
        suffix = "" if p == "decode" else f"_{p}"
        summary[f"gemm_in_pair{suffix}_over_alone"] = pair["gemm_per_s"] / by["gemm"]["gemm_per_s"]
        summary[f"{p}_in_pair_over_alone"] = pair[f"{p}_per_s"] / by[p][f"{p}_per_s"]
        summary[f"{p}_alone_gb_s"] = by[p][f"{p}_per_s"] * src.numel() / 1e9  # bytes of K and V (copy: read)
        # The pair phase runs in lock step (4 + 4 launches, then a sync): its rate is the pair's, not each kernel's.
        pair_ms, apart_ms = 1e3 / pair["gemm_per_s"], 1e3 / by["gemm"]["gemm_per_s"] + 1e3 / by[p][f"{p}_per_s"]
        summary[f"{p}_pair_ms"], summary[f"{p}_apart_ms"] = pair_ms, apart_ms
        summary[f"{p}_pair_over_apart"] = pair_ms / apart_ms
    print("summary", json.dumps(summary), flush=True)
    report = {**report_header(None), "decode_sms": OPTS.decode_sms, "gemm_sms": total - OPTS.decode_sms,
              "variant": OPTS.variant, "gemm_tokens": OPTS.gemm_tokens, "partners": chosen, "pool_blocks": blocks,
              "phases": phases, "summary": summary}
    dest = Path(OPTS.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pair_clocks.json").write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
