"""Presence, frequency and repetition penalties against an independent greedy loop over transformers' forward.

The reference applies transformers' own ``RepetitionPenaltyLogitsProcessor`` (over prompt + generated tokens) and
then OpenAI's documented formula ``logit -= frequency * count + presence * (count > 0)`` over the generated tokens.
"""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from tiny_models import save_tiny_llama

from nanoflow.engine.llm import LLM
from nanoflow.scheduler.request import SamplingParams

transformers = pytest.importorskip("transformers")

PROMPTS = [[5, 17, 99, 3, 5, 17], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13], [64, 32, 7], [9, 9, 9, 9]]
PENALTIES = [dict(presence_penalty=1.5), dict(frequency_penalty=1.2), dict(repetition_penalty=1.8),
             dict(presence_penalty=-0.5, frequency_penalty=0.7, repetition_penalty=1.3)]
N = 12


def _reference(model, prompt: list[int], presence=0.0, frequency=0.0, repetition=1.0) -> list[int]:
    rep = transformers.RepetitionPenaltyLogitsProcessor(repetition) if repetition != 1.0 else None
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(N):
            logits = model(torch.tensor([ids])).logits[0, -1].float()
            if rep is not None:
                logits = rep(torch.tensor([ids]), logits[None])[0]
            for tok, count in Counter(out).items():
                logits[tok] -= frequency * count + presence
            out.append(int(logits.argmax()))
            ids.append(out[-1])
    return out


@pytest.mark.parametrize("async_scheduling", [True, False])
def test_penalised_greedy_matches_the_reference(tmp_path, async_scheduling) -> None:
    path = save_tiny_llama(tmp_path / "m", std=0.2)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    params = [SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, **pen) for pen in PENALTIES]
    plain = SamplingParams(max_tokens=N, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=N, temperature=0.8, seed=3, ignore_eos=True, frequency_penalty=1.0)
    with LLM(path, device="cpu", dtype="float32", dense_batch_size=16, kv_cache_tokens=512,
             async_scheduling=async_scheduling) as llm:
        outs = llm.generate([*PROMPTS, PROMPTS[0], PROMPTS[1]], [*params, plain, sampled], use_tqdm=False)
    names = {"presence_penalty": "presence", "frequency_penalty": "frequency", "repetition_penalty": "repetition"}
    for prompt, pen, out in zip(PROMPTS, PENALTIES, outs):
        ref = _reference(model, prompt, **{names[k]: v for k, v in pen.items()})
        assert out.token_ids == ref, pen
        assert ref != _reference(model, prompt), pen  # the penalty changed the outcome: the check means something
    assert outs[4].token_ids == _reference(model, PROMPTS[0])  # an unpenalised request beside them is untouched
    assert len(outs[5].token_ids) == N


def test_penalty_values_are_checked() -> None:
    for kw in (dict(presence_penalty=2.5), dict(frequency_penalty=-3), dict(repetition_penalty=0),
               dict(repetition_penalty=11), dict(presence_penalty="1")):
        with pytest.raises(ValueError, match=next(iter(kw))):
            SamplingParams(**kw)
    assert not SamplingParams().penalized and SamplingParams(repetition_penalty=1.1).penalized


def test_logit_bias_matches_the_reference(tmp_path) -> None:
    """OpenAI's logit_bias: the reference adds the bias to transformers' logits before the argmax. A +100 bias
    forces its token; a -100 bias bans the token plain greedy would pick; a bias beside a frequency penalty adds to
    it; a bias naming a token outside the vocabulary fails that request alone."""
    path = save_tiny_llama(tmp_path / "m", std=0.2)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    plain = _reference(model, PROMPTS[1])
    cases = [{7: 100.0}, {plain[0]: -100.0, plain[1]: -100.0}, {3: 2.5, 11: -1.0, 40: 4.0}]

    def reference(prompt, bias, frequency=0.0):
        ids, out = list(prompt), []
        with torch.no_grad():
            for _ in range(N):
                logits = model(torch.tensor([ids])).logits[0, -1].float()
                for tok, count in Counter(out).items():
                    logits[tok] -= frequency * count
                for tok, b in bias.items():
                    logits[tok] += b
                out.append(int(logits.argmax()))
                ids.append(out[-1])
        return out

    params = [SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, logit_bias=b) for b in cases]
    params.append(SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, logit_bias=cases[2],
                                 frequency_penalty=0.8))
    params.append(SamplingParams(max_tokens=N, temperature=0, ignore_eos=True, logit_bias={10_000: 1.0}))
    with LLM(path, device="cpu", dtype="float32", dense_batch_size=16, kv_cache_tokens=512) as llm:
        outs = llm.generate([PROMPTS[1]] * 5, params, use_tqdm=False)
    assert outs[0].token_ids == [7] * N
    assert outs[1].token_ids == reference(PROMPTS[1], cases[1]) and outs[1].token_ids[0] != plain[0]
    assert outs[2].token_ids == reference(PROMPTS[1], cases[2]) != plain
    assert outs[3].token_ids == reference(PROMPTS[1], cases[2], frequency=0.8)
    assert outs[4].finish_reason == "error" and "logit_bias" in outs[4].error
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 101})
