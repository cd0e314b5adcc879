"""``nanoflow serve --tp 2`` under torchrun (CPU, gloo), driven by the official ``openai`` client.

Rank 0 serves HTTP, rank 1 follows its forwards. Reference: transformers' greedy loop on the same weights. The tiny
LLaMA (4 heads, 2 KV heads, vocab 128) is saved with a word-level tokenizer whose tokens are ``w0`` ... ``w127``, so
the server's text output reads back as token ids. SIGTERM goes to the serving rank: it drains, stops its follower,
and the launcher exits 0.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
pytest.importorskip("openai")
pytest_plugins = ["serve_harness"]

from serve_harness import REPO, free_port, wait_for_health  # noqa: E402
from tiny_models import hf_greedy, save_tiny_llama  # noqa: E402

BIN = Path(sys.executable).parent
MAX_TOKENS = 10
PROMPTS = [[5, 17, 99, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [64, 32]]


def _save_with_tokenizer(path: Path) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    save_tiny_llama(path, std=0.2)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(path)
    return str(path)


def _hf_logprobs(path: str, prompt: list[int], generated: list[int]) -> list[float]:
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + generated])).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(generated)[:, None])[:, 0].tolist()


def _hf_prompt_logprobs(path: str, prompt: list[int]) -> list[float]:
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([prompt])).logits[0, :-1], -1)
    return lp.gather(1, torch.tensor(prompt[1:])[:, None])[:, 0].tolist()


def _hf_frequency_greedy(path: str, prompt: list[int], frequency: float) -> list[int]:
    import torch

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out: list[int] = []
    with torch.no_grad():
        for _ in range(MAX_TOKENS):
            logits = model(torch.tensor([prompt + out])).logits[0, -1]
            for tok in set(out):
                logits[tok] -= frequency * out.count(tok)
            out.append(int(logits.argmax()))
    return out


def _ids(text: str) -> list[int]:
    return [int(m) for m in re.findall(r"w(\d+)", text)]


@pytest.mark.slow
def test_serve_tp2_under_torchrun_with_the_openai_client(tmp_path: Path) -> None:
    from openai import BadRequestError, OpenAI

    model = _save_with_tokenizer(tmp_path / "m")
    ref, _ = hf_greedy(model, PROMPTS, MAX_TOKENS)
    assert len({tuple(r) for r in ref}) == len(ref)  # distinct continuations: the comparison can tell them apart
    port = free_port()
    log_path = tmp_path / "serve.log"
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           **{k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}}
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "nanoflow.cli", "serve",
           "--model", model, "--device", "cpu", "--tp", "2", "--dense-batch-size", "32", "--kv-cache-tokens", "1024",
           "--host", "127.0.0.1", "--port", str(port)]
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for_health(f"http://127.0.0.1:{port}", 240, proc)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        got = [client.completions.create(model=model, prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                         extra_body={"ignore_eos": True}) for p in PROMPTS]
        assert [_ids(r.choices[0].text) for r in got] == ref
        assert all(r.usage.completion_tokens == MAX_TOKENS for r in got)
        # streamed, and a text prompt through the tokenizer
        stream = client.completions.create(model=model, prompt=" ".join(f"w{i}" for i in PROMPTS[0]),
                                           max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                           extra_body={"ignore_eos": True})
        assert _ids("".join(c.choices[0].text for c in stream if c.choices)) == ref[0]
        # logprobs come from rank 0's gathered logits: transformers' log_softmax at each greedy token
        lp = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=MAX_TOKENS, temperature=0,
                                       logprobs=2, extra_body={"ignore_eos": True}).choices[0].logprobs
        assert [_ids(t)[0] for t in lp.tokens] == ref[1]
        assert lp.token_logprobs == pytest.approx(_hf_logprobs(model, PROMPTS[1], ref[1]), abs=1e-4)
        assert all(len(top) == 2 and top[tok] == pytest.approx(v) for tok, v, top in
                   zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
        # prompt logprobs (echo): every rank runs the LM head over the prompt rows (it gathers across ranks)
        echo = client.completions.create(model=model, prompt=PROMPTS[1] + ref[1][:3], max_tokens=1, temperature=0,
                                         logprobs=0, echo=True, extra_body={"ignore_eos": True}).choices[0].logprobs
        full = _hf_prompt_logprobs(model, PROMPTS[1] + ref[1][:3])
        assert echo.token_logprobs[0] is None
        assert echo.token_logprobs[1:len(full) + 1] == pytest.approx(full, abs=1e-4)
        # penalties are applied on rank 0 too: OpenAI's frequency penalty over the generated tokens
        pen = client.completions.create(model=model, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0,
                                        frequency_penalty=1.5, extra_body={"ignore_eos": True}).choices[0].text
        assert _ids(pen) == _hf_frequency_greedy(model, PROMPTS[0], 1.5) != ref[0]
        # a request the model cannot serve fails alone; the next one is served
        with pytest.raises(BadRequestError, match="vocabulary"):
            client.completions.create(model=model, prompt=[3, 500], max_tokens=2)
        again = client.completions.create(model=model, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0,
                                          extra_body={"ignore_eos": True})
        assert _ids(again.choices[0].text) == ref[2]
        # SIGTERM to the serving rank (uvicorn names its pid): it drains, ends its follower, torchrun exits 0
        pid = int(re.search(r"Started server process \[(\d+)\]", log_path.read_text()).group(1))
        os.kill(pid, signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    text = log_path.read_text()
    assert "Traceback" not in text, text[-4000:]
    assert "rank 1/2 joined" in text and "rank 0/2 joined" in text  # two ranks really served
