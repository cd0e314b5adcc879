"""How long Python's full GC passes take while the scheduler alone serves an offline batch, with and without
freezing the queued requests first (what ``LLM.generate`` and ``nanoflow bench`` now do).

A 2,048-request LLaMA-3-8B bench on an H100 showed 45-104 ms GPU-idle stalls every ~66 steps (1.4 s of 110 s,
benchmarks/results/2026-12-07-s14-bench-fp8kv-2048req-fused-h100-llama3-8b.json, ``gap_ms``): full collections
walking every queued request's token lists. This reproduces the cause on a CPU, without a model. Since requests keep
their prompt as a tuple (untracked by the GC), the unfrozen case walks only the output lists.

    python scripts/gc_probe.py --requests 2048 --output gc.json
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

from nanoflow.scheduler import BlockManager, Request, SamplingParams, Scheduler


def run(args: argparse.Namespace, freeze_after_add: bool) -> dict:
    bm = BlockManager(args.kv_tokens // 16 + 1, 16)
    sched = Scheduler(bm, args.dense_batch, max_num_seqs=4096, max_model_len=args.prompt + args.output + 1)
    gc.collect()
    gc.freeze()  # the engine's own objects are frozen after it is built
    for i in range(args.requests):
        sched.add_request(Request(f"r{i}", list(range(args.prompt)),
                                  SamplingParams(max_tokens=args.output, ignore_eos=True), 0.0))
    if freeze_after_add:
        gc.freeze()
    pauses: list[tuple[int, float]] = []
    started: list[float] = []

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        else:
            pauses.append((info["generation"], (time.perf_counter() - started.pop()) * 1e3))

    gc.callbacks.append(callback)
    steps, t0 = 0, time.perf_counter()
    try:
        while sched.has_work():
            plan = sched.schedule()
            if plan is None:
                break
            sched.update(plan, {s.request_id: 7 for s in plan.seqs if s.sample})
            steps += 1
    finally:
        gc.callbacks.remove(callback)
        gc.unfreeze()
    full = [ms for gen, ms in pauses if gen == 2]
    return {"freeze_after_add": freeze_after_add, "steps": steps, "wall_s": time.perf_counter() - t0,
            "full_collections": len(full), "full_ms_total": sum(full), "full_ms_max": max(full, default=0.0),
            "all_collections": len(pauses), "all_ms_total": sum(ms for _, ms in pauses)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--requests", type=int, default=2048, help="requests queued before the run")
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens per request")
    ap.add_argument("--output", type=int, default=512, help="generated tokens per request")
    ap.add_argument("--dense-batch", type=int, default=2048, help="tokens per iteration")
    ap.add_argument("--kv-tokens", type=int, default=885933, help="KV capacity (the H100 float8 runs')")
    ap.add_argument("--output-file", default="", help="write the JSON record here")
    args = ap.parse_args(argv)
    records = [run(args, False), run(args, True)]
    for r in records:
        print(f"freeze after adding: {r['freeze_after_add']!s:5}  {r['steps']} steps, {r['full_collections']} full "
              f"collections, {r['full_ms_total']:.0f} ms in them (longest {r['full_ms_max']:.0f} ms)")
    if args.output_file:
        report = {"command": "python scripts/gc_probe.py " + " ".join(sys.argv[1:] if argv is None else argv),
                  "python": sys.version.split()[0], "records": records}
        Path(args.output_file).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
