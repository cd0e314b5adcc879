"""``SamplingParams(logprobs=k)``: each generated token's log-probability and the top-k alternatives.

Reference: transformers' forward over the prompt plus the tokens NanoFlow generated, ``log_softmax`` of its logits
(the model's own distribution, before temperature: vLLM's default "raw" logprobs), on a tiny random LLaMA in fp32.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_tiny_llama

from nanoflow.engine.llm import LLM
from nanoflow.scheduler.request import MAX_LOGPROBS, SamplingParams

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 99, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [64, 32, 7]]
N = 8


def _reference(path: str, prompt: list[int], generated: list[int]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0]
    return torch.log_softmax(logits[len(prompt) - 1: len(prompt) - 1 + len(generated)].float(), dim=-1)


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_logprobs_match_transformers(tmp_path, async_scheduling) -> None:
    path = save_tiny_llama(tmp_path / "m", std=0.2)
    params = [SamplingParams(max_tokens=N, temperature=0, logprobs=3, ignore_eos=True),
              SamplingParams(max_tokens=N, temperature=1.0, seed=7, logprobs=0, ignore_eos=True),
              SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)]
    with LLM(path, device="cpu", dtype="float32", dense_batch_size=16, kv_cache_tokens=512,
             async_scheduling=async_scheduling) as llm:
        outs = llm.generate(PROMPTS, params, use_tqdm=False)
    greedy, sampled, plain = outs
    assert plain.logprobs is None
    for out, k in ((greedy, 3), (sampled, 0)):
        assert len(out.logprobs) == len(out.token_ids) == N
        ref = _reference(path, PROMPTS[outs.index(out)], out.token_ids)
        for j, (tok, entry) in enumerate(zip(out.token_ids, out.logprobs)):
            assert entry.token_id == tok and entry.text_offset == 0  # no tokenizer: no text
            assert entry.logprob == pytest.approx(float(ref[j, tok]), abs=1e-4)
            assert len(entry.top) == k
            if k:
                values, ids = ref[j].topk(k)
                assert [i for i, _ in entry.top] == ids.tolist()
                assert [lp for _, lp in entry.top] == pytest.approx(values.tolist(), abs=1e-4)
                assert entry.top[0][0] == tok  # greedy: the chosen token is the most likely
    assert min(e.logprob for e in sampled.logprobs) < max(e.logprob for e in greedy.logprobs)  # sampled, not argmax


def test_logprobs_out_of_range_are_refused() -> None:
    for bad in (-1, MAX_LOGPROBS + 1, 2.0, True):
        with pytest.raises(ValueError, match="logprobs must be an integer"):
            SamplingParams(logprobs=bad)
    assert SamplingParams(logprobs=MAX_LOGPROBS).logprobs == MAX_LOGPROBS


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_prompt_logprobs_match_transformers(tmp_path, async_scheduling) -> None:
    """``prompt_logprobs=k``: every prompt token's logprob given the ones before it, also when a long prompt is
    prefilled in chunks over several steps (dense batch 16, a 45-token prompt) beside other requests."""
    path = save_tiny_llama(tmp_path / "m", std=0.2)
    prompts = [PROMPTS[0], list(range(3, 48)), PROMPTS[2]]
    params = [SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2, ignore_eos=True),
              SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=0, logprobs=1, ignore_eos=True),
              SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)]
    with LLM(path, device="cpu", dtype="float32", dense_batch_size=16, kv_cache_tokens=512,
             async_scheduling=async_scheduling) as llm:
        outs = llm.generate(prompts, params, use_tqdm=False)
    assert outs[2].prompt_logprobs is None
    for prompt, out, k in zip(prompts, outs, (2, 0)):
        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            ref = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
        got = out.prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None and all(e is not None for e in got[1:])
        for j in range(1, len(prompt)):
            assert got[j].token_id == prompt[j]
            assert got[j].logprob == pytest.approx(float(ref[j - 1, prompt[j]]), abs=1e-4)
            values, ids = ref[j - 1].topk(k) if k else (torch.empty(0), torch.empty(0, dtype=torch.long))
            assert [i for i, _ in got[j].top] == ids.tolist()
            assert [lp for _, lp in got[j].top] == pytest.approx(values.tolist(), abs=1e-4)
    assert len(outs[1].logprobs) == 3  # generated-token logprobs beside prompt ones
