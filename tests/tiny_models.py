"""Tiny random Hugging Face checkpoints for CPU tests (saved with ``save_pretrained``, loaded by our loader)."""

from __future__ import annotations

from pathlib import Path

import torch


def save_tiny_llama(path: Path, std: float = 0.1, seed: int = 0, **overrides: int) -> str:
    """A 2-layer GQA LLaMA (vocab 128, hidden 32) with weights of ``std`` so greedy choices are not ties."""
    import transformers

    cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=256)
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    model.save_pretrained(path)
    return str(path)


def hf_greedy(path: str, prompts: list[list[int]], new_tokens: int) -> tuple[list[list[int]], list[torch.Tensor]]:
    """transformers' greedy continuation of each prompt (exactly ``new_tokens``, EOS ignored) and its last-prompt-token
    logits: the independent reference of the model tests."""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs, logits = [], []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=0)
            logits.append(model(ids).logits[0, -1].float())
        outs.append(gen[0, len(p):].tolist())
    return outs, logits


def step_logits(engine, prompts: list[list[int]], max_tokens: int) -> dict[str, list[torch.Tensor]]:
    """Run ``prompts`` greedily through ``engine`` (request ids r0, r1, ...) and return each request's logits at every
    step it sampled, as the runner's forward returned them."""
    from nanoflow.scheduler.request import SamplingParams

    seen: dict[str, list[torch.Tensor]] = {}
    forward = engine.runner.forward

    def recording(batch):
        logits = forward(batch)
        for rid, row in zip(batch.sample_request_ids, logits):
            seen.setdefault(rid, []).append(row.clone())
        return logits

    engine.runner.forward = recording
    for i, p in enumerate(prompts):
        engine.add_request(p, SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True),
                           request_id=f"r{i}")
    engine.run_until_done()
    engine.runner.forward = forward
    return seen
