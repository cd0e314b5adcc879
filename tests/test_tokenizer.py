"""Tokenizer wrapper and incremental detokenizer, checked against transformers' tokenizer of the same files."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from nanoflow.models.tokenizer import (
    IncrementalDetokenizer,
    Tokenizer,
    TokenizerLoadError,
    load_tokenizer,
)

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world! How are you today?",
    "Grüße aus München, déjà vu.",
    "你好，世界！这是一个测试。",
    "emoji: 😀🎉 family 👩‍👩‍👧 flag 🇩🇪 done",
    "<|im_start|>user\nHi there<|im_end|>\n",
]


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    pytest.importorskip("gguf")
    from nanoflow.models.gguf_loader import default_gguf_path
    from nanoflow.models.loader import WeightLoadError

    try:
        return default_gguf_path()
    except WeightLoadError as e:
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def tok(gguf_path: Path) -> Tokenizer:
    t = load_tokenizer(gguf_path)
    assert t is not None
    return t


@pytest.fixture(scope="module")
def hf_tok(gguf_path: Path):
    return transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)


@pytest.fixture(scope="module")
def sp_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny sentencepiece (LLaMA-2 style, byte fallback) tokenizer folder without a chat template."""
    spm = pytest.importorskip("sentencepiece")
    pytest.importorskip("google.protobuf")  # transformers needs it to read tokenizer.model
    folder = tmp_path_factory.mktemp("sp")
    corpus = ["Hello world, this is a test.", "The quick brown fox jumps over the lazy dog.", "Grüße aus München"] * 50
    options = dict(vocab_size=330, model_type="bpe", byte_fallback=True, character_coverage=1.0, minloglevel=2)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(folder / "tokenizer"), unk_id=0, bos_id=1, eos_id=2, **options
    )
    (folder / "tokenizer.vocab").unlink()
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    return folder


def test_gguf_tokenizer_matches_transformers(tok: Tokenizer, hf_tok) -> None:
    assert (tok.bos_token_id, tok.eos_token_ids, tok.vocab_size) == (1, (2,), 49152)
    for text in TEXTS:
        for special in (True, False):
            ids = tok.encode(text, add_special_tokens=special)
            assert ids == hf_tok.encode(text, add_special_tokens=special)
            for skip in (True, False):
                assert tok.decode(ids, skip_special_tokens=skip) == hf_tok.decode(ids, skip_special_tokens=skip)
        assert tok.decode(tok.encode(text), skip_special_tokens=False) == text
    assert tok.decode(tok.encode(TEXTS[-1])) == "user\nHi there\n"  # specials dropped by default


def test_gguf_tokenizer_cache(gguf_path: Path, hf_tok, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                              caplog: pytest.LogCaptureFixture) -> None:
    """The GGUF tokenizer is converted once, then loaded from the cache; the cached copy is the converted one (ids
    of every text and every single-id decode as transformers' own conversion), and a damaged entry is replaced."""
    monkeypatch.setenv("NANOFLOW_CACHE", str(tmp_path))
    conversions = []
    real = transformers.AutoTokenizer.from_pretrained

    def spy(*args, **kwargs):
        conversions.append("gguf_file" in kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", spy)

    def check(t: Tokenizer | None) -> None:
        assert t is not None and (t.bos_token_id, t.eos_token_ids, t.vocab_size) == (1, (2,), 49152)
        for text in TEXTS:
            for special in (True, False):
                assert t.encode(text, add_special_tokens=special) == hf_tok.encode(text, add_special_tokens=special)
        assert [t.decode([i], skip_special_tokens=False) for i in range(0, 49152, 7)] == [
            hf_tok.decode([i], skip_special_tokens=False) for i in range(0, 49152, 7)]
        messages = [{"role": "user", "content": "What is 2+2?"}]
        assert t.apply_chat_template(messages) == hf_tok.apply_chat_template(messages, tokenize=False,
                                                                             add_generation_prompt=True)

    check(load_tokenizer(gguf_path))
    [entry] = (tmp_path / "tokenizers").iterdir()
    assert conversions == [True] and (entry / "tokenizer.json").is_file()
    check(load_tokenizer(gguf_path))
    assert conversions == [True, False]  # loaded from the cache, not converted
    (entry / "tokenizer.json").write_text("{ truncated")
    check(load_tokenizer(gguf_path))
    assert conversions == [True, False, False, True] and "ignoring the cached tokenizer" in caplog.text
    check(load_tokenizer(gguf_path))
    assert conversions[-1] is False and [p.name for p in (tmp_path / "tokenizers").iterdir()] == [entry.name]


def test_gguf_chat_template(tok: Tokenizer) -> None:
    assert tok.has_chat_template
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}])
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids[0] == tok.encode("<|im_start|>", add_special_tokens=False)[0] and len(ids) < 40


def _stream(tok: Tokenizer, prompt: list[int], generated: list[int], chunks: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tok, prompt)
    deltas, i = [], 0
    for size in chunks:
        deltas.append(detok.add(generated[i : i + size]))
        i += size
    deltas.append(detok.flush())
    assert detok.text == "".join(deltas)
    return deltas


@pytest.mark.parametrize("text", TEXTS[:4])
def test_incremental_detokenizer_multibyte(tok: Tokenizer, text: str) -> None:
    prompt = tok.encode("Say something:")
    generated = tok.encode(text, add_special_tokens=False)
    full = tok.decode(generated)
    one_by_one = _stream(tok, prompt, generated, [1] * len(generated))
    assert "".join(one_by_one) == full
    assert not any("\ufffd" in d for d in one_by_one), "a split UTF-8 character was emitted before completion"
    if any(ord(c) > 0xFFFF for c in text):  # emoji are several byte tokens: some steps must wait
        assert "" in one_by_one[:-1]
    rng = random.Random(0)
    chunks = [rng.randint(1, 4) for _ in generated]
    assert "".join(_stream(tok, prompt, generated, chunks)) == full


def test_sentencepiece_folder_fallback_template_and_spaces(sp_folder: Path) -> None:
    tok = load_tokenizer(sp_folder)
    ref = transformers.AutoTokenizer.from_pretrained(sp_folder)
    assert tok is not None and not tok.has_chat_template
    assert tok.eos_token_ids == (2, 7)  # tokenizer EOS united with generation_config.json's
    text = "Hello 😀 world 你好, Grüße"
    assert tok.encode(text) == ref.encode(text)
    assert tok.decode(tok.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)
    prompt = tok.encode("The quick")
    generated = tok.encode(" brown fox 😀 said 你好", add_special_tokens=False)
    deltas = _stream(tok, prompt, generated, [1] * len(generated))
    # Streaming keeps the leading spaces that decoding the generated ids alone would strip.
    expected = tok.decode(prompt + generated)[len(tok.decode(prompt)) :]
    assert "".join(deltas) == expected
    assert not any("\ufffd" in d for d in deltas)
    chat = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert chat == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    no_prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert no_prompt == "<|im_start|>user\nHi<|im_end|>\n"


def test_load_tokenizer_sources(tmp_path: Path, sp_folder: Path) -> None:
    assert load_tokenizer(None) is None
    assert load_tokenizer("llama-3-8b") is None  # built-in short name: config only
    (tmp_path / "config.json").write_text("{}")
    assert load_tokenizer(tmp_path) is None  # a folder without tokenizer files
    assert load_tokenizer(tmp_path / "config.json") is None  # a config.json path means its folder
    with pytest.raises(TokenizerLoadError, match="neither a model folder nor a .gguf file"):
        load_tokenizer(sp_folder / "tokenizer_config.json")
    with pytest.raises(TokenizerLoadError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("not json")
    with pytest.raises(TokenizerLoadError, match=str(tmp_path)):
        load_tokenizer(tmp_path)
