"""Simulate the scheduler alone (no model, no GPU) on a constant-length workload and report how full its dense
batches are under the admission rule of the paper (peak over time, ``peak_blocks``) and under the older rule (the
sum of every running request's final length). Throughput on a GPU follows how many tokens each iteration carries
when the KV cache, not the dense batch, limits the running requests (Mixtral-8x7B on one H200).

    python scripts/sim_admission.py                                  # Mixtral-8x7B on one H200, float8 KV
    python scripts/sim_admission.py --kv-tokens 1730180 --requests 1536   # LLaMA-3-8B, float8 KV
    python scripts/sim_admission.py --admission-pace 1.05               # with the engine's admission pacing

Writes a JSON record (``--output-file``) with both rules' iterations, mean tokens per iteration, preemptions, the
iterations whose batch was full and those that carried no prefill while requests waited (the engine's admission
pacing, ``--admission-pace``, is what removes most of these).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from unittest import mock

from tqdm import tqdm

from nanoflow.config import ADMISSION_PACE
from nanoflow.graphs.cuda_graph import halving_buckets, token_buckets
from nanoflow.scheduler import BlockManager, Request, SamplingParams, Scheduler, batcher


def sum_of_final_lengths(held: list[int], remaining: list[int], block_size: int) -> int:
    """The older admission rule: every request's blocks at its predicted end, all at once."""
    return sum(-(-(h + r) // block_size) for h, r in zip(held, remaining))


def simulate(args: argparse.Namespace, rule: str) -> dict:
    bm = BlockManager(args.kv_tokens // args.block_size + 1, args.block_size)
    sched = Scheduler(bm, args.dense_batch, max_num_seqs=args.max_num_seqs, max_model_len=args.prompt + args.output + 1,
                      decode_len_prior=args.decode_len_prior, admission_pace=args.admission_pace)
    # What `nanoflow bench` does first: a few short requests on the same engine (they set the average decode length
    # the admission starts from).
    for i in range(args.warmup_requests):
        sched.add_request(Request(f"w{i}", [5] * args.prompt, SamplingParams(max_tokens=args.warmup_output,
                                                                             ignore_eos=True), 0.0))
    while sched.has_work():
        plan = sched.schedule()
        sched.update(plan, {s.request_id: 7 for s in plan.seqs if s.sample})
    for i in range(args.requests):
        sched.add_request(Request(f"r{i}", [5] * args.prompt, SamplingParams(max_tokens=args.output,
                                                                             ignore_eos=True), 0.0))
    tokens, decodes, full, preempted, stalled = [], [], 0, 0, 0
    patch = mock.patch.object(batcher, "peak_blocks", sum_of_final_lengths) if rule == "sum" else nullcontext()
    if args.prefill_cap:
        # Admission pacing (an experiment, not in the engine): at most prefill_cap prefill tokens per iteration
        # (continued chunks count first), so requests are admitted at a steadier rate and their ages spread out.
        admit = sched._admit

        def paced(budget: int, prefill: list, it: int) -> int:
            room = min(budget, args.prefill_cap - sum(s.num_tokens for s in prefill))
            return budget if room <= 0 else budget - (room - admit(room, prefill, it))

        sched._admit = paced
    t0 = time.perf_counter()
    with patch, tqdm(total=args.requests, desc=f"{rule} rule", unit="req", leave=False) as bar:
        while sched.has_work():
            plan = sched.schedule()
            if plan is None:
                break
            tokens.append(plan.num_tokens)
            decodes.append(plan.num_decode_tokens)
            full += plan.num_tokens == args.dense_batch
            preempted += len(plan.preempted)
            stalled += bool(sched.num_waiting) and plan.num_prefill_tokens == 0
            done = sched.update(plan, {s.request_id: 7 for s in plan.seqs if s.sample})
            bar.update(len(done))
    rec = {"rule": rule, "admission_pace": args.admission_pace, "prefill_cap": args.prefill_cap,
           "iterations": len(tokens), "stalled_iterations": stalled,
           "mean_tokens_per_iteration": sum(tokens) / max(1, len(tokens)),
           "full_iterations": full, "preemptions": preempted, "cpu_s": time.perf_counter() - t0}
    ms = None
    if args.step_fit:
        # scripts/step_model.py's fit: a + b * padded + c * prefill + d * decode tokens, padded = the CUDA-graph
        # bucket the step runs (the engine's token_buckets, or the halvings older runs used).
        fit = dict(json.loads(Path(args.step_fit).read_text())["fit"])
        fixed, per_token = args.fit_scale
        fit["a"] *= fixed
        for key in ("b_padded", "c_prefill", "d_decode"):
            fit[key] *= per_token
        buckets = halving_buckets if args.buckets == "halvings" else token_buckets
        sizes = sorted(buckets(args.dense_batch))
        ms = sum(fit["a"] + fit["b_padded"] * next((s for s in sizes if s >= t), t) + fit["c_prefill"] * (t - d)
                 + fit["d_decode"] * d for t, d in zip(tokens, decodes))
    elif args.step_model:
        # A simpler per-step model: a + b * prefill + c * decode tokens.
        a, b, c = args.step_model
        ms = sum(a + b * (t - d) + c * d for t, d in zip(tokens, decodes))
    if ms is not None:
        rec["predicted_s"] = ms / 1e3
        rec["predicted_tok_s"] = args.requests * (args.prompt + args.output) / (ms / 1e3)
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--kv-tokens", type=int, default=684251,
                    help="KV-cache capacity in tokens (default: Mixtral-8x7B, float8 KV, one H200, as measured)")
    ap.add_argument("--block-size", type=int, default=16, help="tokens per KV page")
    ap.add_argument("--dense-batch", type=int, default=2048, help="tokens per iteration")
    ap.add_argument("--max-num-seqs", type=int, default=4096, help="most running requests")
    ap.add_argument("--requests", type=int, default=512, help="requests in the run")
    ap.add_argument("--prompt", type=int, default=1024, help="prompt tokens per request")
    ap.add_argument("--output", type=int, default=512, help="generated tokens per request")
    ap.add_argument("--decode-len-prior", type=float, default=256.0,
                    help="predicted decode length before any request finished (the engine's default)")
    ap.add_argument("--warmup-requests", type=int, default=6,
                    help="short requests run first, as nanoflow bench's warm-up does (dense batch / prompt + 4)")
    ap.add_argument("--warmup-output", type=int, default=16, help="generated tokens per warm-up request")
    ap.add_argument("--step-model", type=float, nargs=3, metavar=("A", "B", "C"), default=None,
                    help="predict GPU time with a step model fitted to a measured run's per-step trace: "
                         "A + B * prefill tokens + C * decode tokens (ms)")
    ap.add_argument("--step-fit", default="",
                    help="predict GPU time with the fit scripts/step_model.py --output wrote (its 'fit': a + b * "
                         "padded + c * prefill + d * decode ms, padded = the step's CUDA-graph bucket); overrides "
                         "--step-model")
    ap.add_argument("--fit-scale", type=float, nargs=2, metavar=("FIXED", "PER_TOKEN"), default=(1.0, 1.0),
                    help="multiply --step-fit's constant term by FIXED and its per-token terms by PER_TOKEN: a fit "
                         "of a half-depth model on an H100 predicts the full model on an H200 with PER_TOKEN 2 "
                         "(twice the layers, same compute) and FIXED 2 * 3.35 / 4.8 = 1.4 (twice the layers, "
                         "the step's fixed cost taken as memory-bound, on 4.8 against 3.35 TB/s)")
    ap.add_argument("--buckets", default="engine", choices=["engine", "halvings"],
                    help="the CUDA-graph sizes a step is padded to under --step-fit: the engine's token_buckets, or "
                         "the halvings of the dense size that runs before session 9 used")
    ap.add_argument("--rules", default="sum,peak",
                    help="comma-separated: sum (every request's final length at once), peak (the peak over time, "
                         "the engine's rule)")
    ap.add_argument("--admission-pace", type=float, default=ADMISSION_PACE,
                    help="the engine's admission pacing (--admission-pace of nanoflow run-offline/serve/bench), e.g. "
                         "1.05; 0 = off, the engine's default")
    ap.add_argument("--prefill-cap", type=int, default=0,
                    help="admission pacing, an experiment the engine does not have: at most this many prefill "
                         "tokens per iteration (0: none, as the engine)")
    ap.add_argument("--output-file", default="", help="write the JSON record here (default: print only)")
    args = ap.parse_args(argv)
    records = [simulate(args, rule) for rule in args.rules.split(",")]
    report = {"command": "python scripts/sim_admission.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "workload": f"constant:{args.prompt}:{args.output}", "requests": args.requests,
              "kv_tokens": args.kv_tokens, "dense_batch": args.dense_batch, "records": records}
    for r in records:
        pred = f", predicted {r['predicted_s']:.1f} s = {r['predicted_tok_s']:,.0f} tok/s" if "predicted_s" in r else ""
        print(f"{r['rule']:>5} rule: {r['iterations']} iterations, {r['mean_tokens_per_iteration']:.0f} tokens per "
              f"iteration, {r['full_iterations']} full, {r['stalled_iterations']} without prefill while requests "
              f"wait, {r['preemptions']} preemptions{pred}")
    if args.output_file:
        Path(args.output_file).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
