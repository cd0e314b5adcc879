#!/usr/bin/env python3
"""GPU correctness of tensor parallelism: TP=2 (NCCL, CUDA graphs, async scheduling) against TP=1 on the same weights.

The model is a small LLaMA-3-70B-shaped config (GQA ratio 8, FFN ratio 3.5, rope theta 5e5, the 128,256 vocab)
with random weights saved by transformers. Three steps (scripts/device/tp_bench.sh runs them):

    python tp_check.py prepare --dir D                                   # model + prompts
    python tp_check.py run --dir D --dtype float32 --out D/tp1_float32.pt    # TP=1
    torchrun --standalone --nproc-per-node 2 tp_check.py run --dir D --dtype float32 --out D/tp2_float32.pt
    python tp_check.py compare --dir D --json $OUT/tp_check.json         # exit 1 if float32 tokens differ

A run records last-token logits of a few prompts (``Engine.prompt_logits``) and greedy tokens of all prompts.
float32 must agree token for token; bfloat16 (different reduction order over the ranks) is reported, not required.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from _common import report_header

NUM_PROMPTS = 48
MAX_TOKENS = 32
LOGIT_PROMPTS = 4


def prepare(d: Path, tiny: bool) -> None:
    """``tiny``: a 2-layer, hidden-64 model with short prompts, to smoke-test this script on a CPU."""
    import transformers

    d.mkdir(parents=True, exist_ok=True)
    size = (dict(vocab_size=1001, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
            if tiny else dict(vocab_size=128256, hidden_size=1024, intermediate_size=3584, num_hidden_layers=4,
                              num_attention_heads=16))
    cfg = transformers.LlamaConfig(**size, num_key_value_heads=2, max_position_embeddings=8192, rope_theta=500000.0,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():  # peaked logits, so greedy choices are not decided by rounding noise
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
    model.to(torch.bfloat16).save_pretrained(d / "model")
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(4, 60 if tiny else 700, (8 if tiny else NUM_PROMPTS,), generator=g).tolist()
    with open(d / "prompts.jsonl", "w") as f:
        for n in lens:
            ids = torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()
            f.write(json.dumps({"prompt_token_ids": ids}) + "\n")
    print(f"prepared {d}: {len(lens)} prompts, lengths {min(lens)}..{max(lens)}")


def run(d: Path, dtype: str, pipeline: str | None, out: Path, cuda_graphs: bool, device: str) -> None:
    from nanoflow import LLM, SamplingParams

    world = int(os.environ.get("WORLD_SIZE", "1"))
    llm = LLM(str(d / "model"), tp=world, dtype=dtype, device=device, dense_batch_size=2048, kv_cache_tokens=65536,
              max_model_len=2048, pipeline=pipeline, cuda_graphs=cuda_graphs)
    # Ranks > 0 never get here: LLM(...) follows rank 0 and exits when rank 0 is done.
    prompts = [json.loads(line)["prompt_token_ids"] for line in open(d / "prompts.jsonl")]
    logits = llm.engine.prompt_logits(prompts[:LOGIT_PROMPTS]).float().cpu()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True), use_tqdm=False)
    wall = time.perf_counter() - t0
    torch.save({"logits": logits, "tokens": [o.token_ids for o in outs], "wall_s": wall, "tp": world,
                "dtype": dtype, "pipeline": pipeline, "cuda_graphs": cuda_graphs}, out)
    print(f"tp={world} {dtype} pipeline={pipeline}: {len(outs)} requests in {wall:.2f} s -> {out}")


def _agreement(a: dict, b: dict) -> dict:
    same = sum(x == y for x, y in zip(a["tokens"], b["tokens"]))
    first = [next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), None) for x, y in zip(a["tokens"], b["tokens"])]
    diff = (a["logits"] - b["logits"]).abs()
    scale = b["logits"].abs().max().item()
    return {"sequences_equal": same, "sequences": len(b["tokens"]),
            "first_divergence": [f for f in first if f is not None],
            "logits_max_abs_diff": diff.max().item(), "logits_max_rel_diff": diff.max().item() / max(scale, 1e-12),
            "argmax_equal": bool((a["logits"].argmax(-1) == b["logits"].argmax(-1)).all())}


def compare(d: Path, json_out: Path | None) -> int:
    runs = {p.stem: torch.load(p) for p in sorted(d.glob("tp*.pt"))}
    device = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name()}" if torch.cuda.is_available() else "cpu"
    report: dict = {**report_header(device), "runs": {k: {"wall_s": v["wall_s"], "tp": v["tp"], "dtype": v["dtype"],
                                                          "pipeline": v["pipeline"]} for k, v in runs.items()}}
    ok = True
    for name, run_ in runs.items():
        if run_["tp"] == 1:
            continue
        ref_name = f"tp1_{run_['dtype']}"
        if ref_name not in runs:
            continue
        agree = _agreement(run_, runs[ref_name])
        report[f"{name}_vs_{ref_name}"] = agree
        exact = agree["sequences_equal"] == agree["sequences"] and agree["argmax_equal"]
        if run_["dtype"] == "float32" and not exact:
            ok = False
        print(f"{name} vs {ref_name}: {agree['sequences_equal']}/{agree['sequences']} sequences equal, logits max "
              f"abs diff {agree['logits_max_abs_diff']:.3g} (rel {agree['logits_max_rel_diff']:.3g})")
    report["pass"] = ok
    text = json.dumps(report, indent=2)
    if json_out is not None:
        json_out.write_text(text)
    print(text)
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("step", choices=["prepare", "run", "compare"])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/tp_check"))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--pipeline", default=None, help="pipeline preset or spec JSON (default: sequential)")
    ap.add_argument("--no-cuda-graphs", action="store_true")
    ap.add_argument("--device", default="cuda", help="cuda, or cpu with --tiny to smoke-test this script")
    ap.add_argument("--tiny", action="store_true", help="prepare: a tiny model and short prompts")
    ap.add_argument("--out", type=Path, default=None, help="run: where to save tokens and logits (rank 0)")
    ap.add_argument("--json", type=Path, default=None, help="compare: also write the report here")
    args = ap.parse_args()
    if args.step == "prepare":
        prepare(args.dir, args.tiny)
        return 0
    if args.step == "run":
        out = args.out or args.dir / f"tp{os.environ.get('WORLD_SIZE', '1')}_{args.dtype}.pt"
        run(args.dir, args.dtype, args.pipeline, out, not args.no_cuda_graphs, args.device)
        return 0
    return compare(args.dir, args.json)


if __name__ == "__main__":
    sys.exit(main())
