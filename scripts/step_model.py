"""Fit a per-step GPU time model to the per-step trace of a ``nanoflow bench`` record and predict what other CUDA
graph token buckets would cost, on the CPU from a GPU run's JSON.

    python scripts/step_model.py benchmarks/results/2026-12-02-s8-bench-fp8kv-gcfreeze-h200-llama3-8b.json

The model: ``step ms = a + b * padded tokens + c * prefill tokens + d * decode tokens`` (least squares over the
run's steps; steps over ``--max-ms`` are left out as stalls), where ``padded tokens`` is the bucket the step ran
(the engine's ``token_buckets`` when the record captured that many graphs, else the halvings of the dense size
that runs before session 9 used). Prints and writes (``--output``) the fit and, for each candidate bucket set, the
GPU time it predicts for the same steps; ``scripts/sim_admission.py --step-fit`` reads that file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from nanoflow.graphs.cuda_graph import halving_buckets, token_buckets


def padded(tokens: np.ndarray, sizes: list[int]) -> np.ndarray:
    ordered = sorted(sizes)
    return np.array([next((s for s in ordered if s >= n), n) for n in tokens])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("record", help="a nanoflow bench JSON (its first record with a per-step trace is used)")
    ap.add_argument("--max-ms", type=float, default=300.0, help="leave steps longer than this out of the fit")
    ap.add_argument("--output", default="", help="write the fit and predictions here as JSON")
    args = ap.parse_args(argv)
    records = json.loads(Path(args.record).read_text())
    rec = next((r for r in records if (r.get("iterations_timed") or {}).get("trace")), None)
    if rec is None:
        print(f"{args.record}: no record has a per-step trace (iterations_timed.trace)", file=sys.stderr)
        return 2
    trace = rec["iterations_timed"]["trace"]
    tok, dec, ms = (np.asarray(trace[k], dtype=float) for k in ("tokens", "decode_tokens", "step_ms"))
    dense = int(rec.get("dense_batch") or tok.max())
    # The sizes the run captured: the engine's token_buckets since session 9, the halvings before.
    engine = token_buckets(dense)
    ran = engine if rec.get("graphs_captured") == len(engine) else halving_buckets(dense)
    ok = ms < args.max_ms

    def design(sizes: list[int]) -> np.ndarray:
        return np.c_[np.ones(len(tok)), padded(tok, sizes), tok - dec, dec]

    coef, *_ = np.linalg.lstsq(design(ran)[ok], ms[ok], rcond=None)
    rms = float(np.sqrt(np.mean((design(ran)[ok] @ coef - ms[ok]) ** 2)))
    plain, *_ = np.linalg.lstsq(design(ran)[ok][:, [0, 2, 3]], ms[ok], rcond=None)
    rms_plain = float(np.sqrt(np.mean((design(ran)[ok][:, [0, 2, 3]] @ plain - ms[ok]) ** 2)))
    base = float((design(ran) @ coef).sum() / 1e3)
    candidates = {
        "as run": ran,
        "halvings": halving_buckets(dense),
        "halvings and midpoints": sorted({*halving_buckets(dense), *(s * 3 // 4 for s in halving_buckets(dense)
                                          if s * 3 // 4 >= 128)}, reverse=True),
        "the engine's (token_buckets)": token_buckets(dense),
        "every 128": list(range(128, dense + 1, 128)),
        "every 64": list(range(64, dense + 1, 64)),
    }
    report = {"record": args.record, "model": rec.get("model"), "mode": rec.get("mode"),
              "measured_gpu_busy_s": rec["iterations_timed"].get("gpu_busy_s"),
              "fit": {"ms": "a + b*padded + c*prefill + d*decode", "a": coef[0], "b_padded": coef[1],
                      "c_prefill": coef[2], "d_decode": coef[3], "rms_ms": rms,
                      "rms_ms_without_padded_term": rms_plain, "steps_fitted": int(ok.sum())},
              "predicted_gpu_s": {}}
    print(f"{rec.get('model')} {rec.get('mode')}: ms = {coef[0]:.2f} + {coef[1]:.4f} padded + {coef[2]:.4f} prefill + "
          f"{coef[3]:.4f} decode (rms {rms:.2f} ms; {rms_plain:.2f} without the padded term)")
    for name, sizes in candidates.items():
        sizes = sorted({*sizes, dense}, reverse=True)
        pred = float((design(sizes) @ coef).sum() / 1e3)
        report["predicted_gpu_s"][name] = {"sizes": sizes, "seconds": pred, "vs_as_run": pred / base - 1}
        print(f"  {name:42s} {len(sizes):2d} sizes: {pred:7.1f} s ({(pred / base - 1) * 100:+.1f}%)")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
