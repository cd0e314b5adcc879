#!/usr/bin/env python3
"""GPU correctness: a LLaMA-3-8B-shaped model with dummy bf16 weights against transformers on the same weights.

Reports the relative error of last-token logits and greedy-token agreement; writes $OUT/check_vs_hf.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from _common import report_header


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="llama-3-8b", help="built-in short name")
    ap.add_argument("--lens", default="17,200,513,1000", help="prompt lengths")
    args = ap.parse_args()
    from nanoflow.bench.peer import hf_model
    from nanoflow.config import EngineArgs, builtin_config_path
    from nanoflow.engine.builder import load_parts
    from nanoflow.engine.engine import Engine

    dev = torch.device("cuda")
    ea = EngineArgs(model=args.model, load_format="dummy", dtype="bfloat16", device="cuda", dense_batch_size=2048,
                    kv_cache_tokens=65536, max_model_len=4096)
    parts = load_parts(ea, dev)
    spec = parts["model"].spec
    lens = [int(x) for x in args.lens.split(",")]
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, spec.vocab_size, (n,), generator=g).tolist() for n in lens]
    results = {"model": args.model, **report_header()}
    for graphs in (False, True):
        eng = Engine(EngineArgs(**{**ea.__dict__, "cuda_graphs": graphs}), parts=parts)
        ours = eng.prompt_logits(prompts)
        results[f"graphs_{graphs}"] = ours
        del eng
    hf = hf_model(str(builtin_config_path(args.model)), spec, parts["model"].weights, attn="sdpa")
    errs = []
    with torch.no_grad():
        refs16 = [hf(torch.tensor([p], device=dev)).logits[0, -1].float() for p in prompts]
        # float32 reference on the same weights: both bf16 engines are judged against it.
        hf = hf.float()
        refs32 = [hf(torch.tensor([p], device=dev)).logits[0, -1].float() for p in prompts]
    for i, p in enumerate(prompts):
        ref, ref16 = refs32[i], refs16[i]
        got = results["graphs_False"][i]

        def rel(a: torch.Tensor, ref: torch.Tensor = ref) -> float:
            return ((a - ref).norm() / ref.norm()).item()

        errs.append({"len": len(p), "ours_vs_fp32": rel(got), "ours_graph_vs_fp32": rel(results["graphs_True"][i]),
                     "hf_bf16_vs_fp32": rel(ref16), "ours_vs_hf_bf16": ((got - ref16).norm() / ref16.norm()).item(),
                     "argmax_equal_fp32": int(got.argmax()) == int(ref.argmax())})
    out = {k: v for k, v in results.items() if not k.startswith("graphs_")}
    out["logits"] = errs
    for e in errs:
        print(f"len {e['len']:5d}: vs fp32: ours {e['ours_vs_fp32']:.2e} (graph {e['ours_graph_vs_fp32']:.2e}), "
              f"HF bf16 {e['hf_bf16_vs_fp32']:.2e}; ours vs HF bf16 {e['ours_vs_hf_bf16']:.2e}; "
              f"argmax = fp32 argmax: {e['argmax_equal_fp32']}")
    path = os.path.join(os.environ.get("OUT", "."), "check_vs_hf.json")
    with open(path, "w") as f:
        json.dump(out, f, indent=2)


if __name__ == "__main__":
    t = time.time()
    main()
    print(f"done in {time.time() - t:.0f} s")
