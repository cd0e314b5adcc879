"""``nanoflow run-offline``: generate for a whole dataset and write one JSON line per request.

With no flags it runs the embedded SmolLM2-135M-Instruct (GPU if present, else CPU) on the bundled sample prompts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from nanoflow.engine.flags import add_engine_args, engine_kwargs
from nanoflow.engine.kv_flags import add_kv_offload_args

__all__ = ["add_engine_args", "add_parser", "engine_kwargs", "run"]


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("run-offline", help="generate for a dataset (the batch runner)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_engine_args(p)
    p.add_argument("--dataset", default="sample",
                   help="JSONL ({'prompt'} or {'prompt_token_ids'} per line), ShareGPT/LMSYS JSON, LMSYS parquet, "
                        "Splitwise CSV, 'constant:IN:OUT', 'splitwise', 'lmsys', 'sharegpt', or 'sample' (bundled)")
    p.add_argument("--num-requests", type=int, default=None, help="use at most this many requests")
    p.add_argument("--output", default="outputs.jsonl", help="where to write one JSON line per request")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="output tokens per request (default: the dataset's lengths, else 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0 = off)")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly max tokens (throughput runs)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="OpenAI's presence penalty, -2..2: subtracted from every generated token's logit")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="OpenAI's frequency penalty, -2..2: subtracted per occurrence in the output")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="vLLM's / transformers' repetition penalty, (0, 10], 1 = off: > 1 discourages tokens of "
                        "the prompt and output")
    p.add_argument("--logprobs", type=int, default=None,
                   help="write each generated token's logprob and this many alternatives (0-20) into the output rows "
                        "(field logprobs: token_id, logprob, top)")
    add_kv_offload_args(p, "the rounds of a multi-round dataset (e.g. multiround:splitwise), run one round "
                           "after another; a round whose prompt extends the previous one by a stand-in answer gets "
                           "the model's real answer instead, as in a live chat; the summary counts the prompt tokens "
                           "reused",
                        host_gib=16.0)
    p.add_argument("--chat", default="auto", choices=["auto", "yes", "no"],
                   help="wrap text prompts in the tokenizer's chat template as a user turn; auto = when the "
                        "tokenizer has one (instruct models)")
    return p


def run(args: argparse.Namespace) -> int:
    from nanoflow.engine.llm import LLM
    from nanoflow.scheduler.request import SamplingParams

    try:  # the sampling flags, checked before any weights load
        SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                       presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                       repetition_penalty=args.repetition_penalty, logprobs=args.logprobs)
    except ValueError as e:
        print(f"nanoflow run-offline: --{str(e).split(' ')[0].replace('_', '-')}: {e}", file=sys.stderr)
        return 2

    with LLM(**engine_kwargs(args)) as llm:
        return _run(args, llm)


def _run(args: argparse.Namespace, llm: Any) -> int:
    from nanoflow.data import load_dataset
    from nanoflow.scheduler.request import SamplingParams

    vocab = llm.engine.spec.vocab_size
    # Synthetic traces are drawn to fit the context; rows of a file are kept as given, so an over-long prompt comes
    # back as an error line in the output (one line per request) instead of vanishing.
    synthetic = not Path(args.dataset).exists()
    data = load_dataset(args.dataset, num_requests=args.num_requests, seed=args.seed, vocab_size=vocab,
                        tokenizer=llm.tokenizer, max_len=llm.engine.max_model_len if synthetic else None)
    for row in data.skipped:
        print(f"skipped {args.dataset}:{row.line}: {row.reason}", file=sys.stderr)
    tok = llm.tokenizer
    chat = tok is not None and (args.chat == "yes" or (args.chat == "auto" and tok.has_chat_template))
    prompts: list[Any] = []
    params = []
    for item in data.items:
        prompt: Any = item.prompt if item.prompt is not None else item.prompt_token_ids
        if chat and isinstance(prompt, str):
            prompt = tok.apply_chat_template([{"role": "user", "content": prompt}])
        prompts.append(prompt)
        params.append(SamplingParams(max_tokens=args.max_tokens or item.max_tokens or 64,
                                     temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                     ignore_eos=args.ignore_eos, presence_penalty=args.presence_penalty,
                                     frequency_penalty=args.frequency_penalty,
                                     repetition_penalty=args.repetition_penalty, logprobs=args.logprobs,
                                     conversation_id=item.conversation_id if args.kv_offload else None))
    t0 = time.perf_counter()
    outputs = _generate_by_round(llm, data.items, prompts, params) if args.kv_offload else llm.generate(prompts, params)
    wall = time.perf_counter() - t0
    out_path = Path(args.output)
    with out_path.open("w") as f:
        for o in outputs:
            row = {"request_id": o.request_id, "prompt": o.prompt, "text": o.text, "token_ids": o.token_ids,
                   "finish_reason": o.finish_reason, "error": o.error}
            if args.kv_offload:  # the prompt actually sent (stitched onto earlier answers)
                row["prompt_token_ids"] = list(o.prompt_token_ids)
            if o.logprobs is not None:
                row["logprobs"] = [{"token_id": e.token_id, "logprob": e.logprob, "top": [list(t) for t in e.top]}
                                   for e in o.logprobs]
            f.write(json.dumps(row) + "\n")
    prompt_tokens = sum(len(o.prompt_token_ids) for o in outputs)
    gen_tokens = sum(len(o.token_ids) for o in outputs)
    errors = sum(o.finish_reason == "error" for o in outputs)
    summary = {"requests": len(outputs), "errors": errors, "skipped_rows": len(data.skipped),
               "prompt_tokens": prompt_tokens, "generated_tokens": gen_tokens, "wall_s": round(wall, 3),
               "total_tokens_per_s": round((prompt_tokens + gen_tokens) / wall, 1) if wall > 0 else None,
               "output": str(out_path), "model": llm.engine.model_name, "device": str(llm.engine.device)}
    if args.kv_offload:
        reused = llm.engine.stats_reused_tokens
        summary.update(kv_reused_tokens=reused, prefill_tokens_computed=prompt_tokens - reused,
                       prefill_saved_fraction=round(reused / prompt_tokens, 4) if prompt_tokens else 0.0)
    print(json.dumps(summary, indent=2))
    return 0


def _generate_by_round(llm: Any, items: list[Any], prompts: list[Any], params: list[Any]) -> list[Any]:
    """Generate round by round (every conversation's round r before any round r + 1), so each round can reuse the
    KV its conversation's previous round left behind. A token-id prompt that extends its conversation's previous
    dataset prompt by a stand-in answer of that round's ``max_tokens`` tokens (how synthetic multi-round traces
    are built) gets the previous round's actual prompt + generated answer in its place. Outputs in dataset order."""
    outputs: list[Any] = [None] * len(items)
    last: dict[str, tuple[list[int], int, list[int]]] = {}  # conversation -> (dataset prompt, its max_tokens, sent)
    for r in sorted({item.round for item in items}):
        batch = [i for i, item in enumerate(items) if item.round == r]
        sent = []
        for i in batch:
            item, prompt = items[i], prompts[i]
            prev = last.get(item.conversation_id) if item.conversation_id is not None else None
            if prev is not None and isinstance(prompt, list) and item.prompt_token_ids is not None:
                ds_prompt, stand_in, actual = prev
                cut = len(ds_prompt) + stand_in
                if len(prompt) > cut and prompt[:len(ds_prompt)] == ds_prompt:
                    prompt = actual + prompt[cut:]
            sent.append(prompt)
        for i, out in zip(batch, llm.generate(sent, [params[i] for i in batch])):
            outputs[i] = out
            item = items[i]
            if item.conversation_id is not None and item.prompt_token_ids is not None and out.error is None:
                actual = list(out.prompt_token_ids) + list(out.token_ids)
                last[item.conversation_id] = (item.prompt_token_ids, item.max_tokens or 0, actual)
    return outputs
