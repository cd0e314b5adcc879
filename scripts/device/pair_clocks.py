"""Why a GEMM slows beside decode attention: clocks, power and throughput of each alone and of the pair.

green_decode.py found the gate/up GEMM losing 50-65% of its speed when decode attention runs in a green context of
the other SMs, whatever the decode kernel and its L2 policy, while each alone in its partition would sum to well
above 1. This script runs, for a few seconds each, inside green contexts (decode ``--decode-sms``, GEMM the rest):

1. the GEMM alone, 2. decode attention alone, 3. both at once (each on its own stream, relaunched back to back),

and samples ``nvidia-smi`` (SM and memory clocks, power, temperature) every 100 ms. Per phase it reports launches
per second of each kernel (so the pair's slowdown of each), and the median clocks and power. If the SM clock falls
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
    blocks = 1 + ROWS * per_row
    k = torch.randn((blocks, PAGE, HKV, D), generator=gen, device=dev, dtype=torch.bfloat16).to(FP8)
    v = torch.randn_like(k, dtype=torch.bfloat16).to(FP8)
    table = (torch.randperm(blocks - 1, generator=gen, device=dev) + 1).view(ROWS, per_row).to(torch.int32)
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

    def decode() -> None:
        decode_attention(q, k, v, table, lens, out, D**-0.5, workspace=ws, variant=OPTS.variant)

    def gemm() -> None:
        torch.mm(x, w.t(), out=y)

    for fn, s in ((decode, sd), (gemm, sg)):  # compile / pick kernels outside the timed phases
        with torch.cuda.stream(s):
            fn()
    torch.cuda.synchronize()

    samples: list = []
    stop = threading.Event()
    thread = threading.Thread(target=sampler, args=(stop, samples), daemon=True)
    thread.start()
    time.sleep(1.0)
    phases = []
    for name, jobs in (("gemm", [(gemm, sg)]), ("decode", [(decode, sd)]), ("pair", [(gemm, sg), (decode, sd)]),
                       ("idle", [])):
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
    summary = {"gemm_in_pair_over_alone": by["pair"]["gemm_per_s"] / by["gemm"]["gemm_per_s"],
               "decode_in_pair_over_alone": by["pair"]["decode_per_s"] / by["decode"]["decode_per_s"]}
    print("summary", json.dumps(summary), flush=True)
    report = {**report_header(None), "decode_sms": OPTS.decode_sms, "gemm_sms": total - OPTS.decode_sms,
              "variant": OPTS.variant, "gemm_tokens": OPTS.gemm_tokens, "phases": phases, "summary": summary}
    dest = Path(OPTS.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "pair_clocks.json").write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
