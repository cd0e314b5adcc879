"""Dataset loading: every file format on small hand-written files, skipped-row locations, synthetic statistics
against the paper's Table 4, multi-round structure, determinism, and the bundled prompt sample."""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from nanoflow.data import (
    DEFAULT_SYNTHETIC_REQUESTS,
    DatasetError,
    DatasetItem,
    SkippedRow,
    load_dataset,
    sample_lengths,
    summarize_lengths,
)


class WordTokenizer:
    """A stand-in tokenizer: one token per whitespace word, so expected lengths can be counted by hand."""

    def encode(self, text: str) -> list[int]:
        return list(range(len(text.split())))


def write_lines(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_jsonl_plain_rows_and_skipped_line_numbers(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "reqs.jsonl", [
        '{"prompt": "hello there", "max_tokens": 16}',        # 1 ok
        '{"prompt_token_ids": [5, 6, 7]}',                    # 2 ok, max_tokens unknown
        '{"prompt": "broken"',                                 # 3 bad JSON
        "",                                                    # 4 blank: ignored, not an error
        '{"text": "no prompt key"}',                           # 5 missing prompt
        '{"prompt": 42}',                                      # 6 wrong type
        '{"prompt": "   "}',                                   # 7 empty prompt
        '{"prompt": "use output_len", "output_len": 8}',      # 8 ok via alias
        '{"prompt": "x", "max_tokens": true}',                 # 9 bool is not a count
        '{"prompt_token_ids": [1, "2"]}',                     # 10 non-int id
        '["a", "list"]',                                       # 11 not an object
        '{"prompt": "a", "prompt_token_ids": [1]}',           # 12 both given
        '{"prompt": "zero budget", "max_tokens": 0}',         # 13 max_tokens < 1
        '{"prompt_token_ids": []}',                           # 14 empty ids
        '{"prompt": "last", "max_tokens": 4.0}',              # 15 ok: integral float accepted
    ])
    result = load_dataset(str(path))
    assert result.items == [
        DatasetItem("hello there", None, 16),
        DatasetItem(None, [5, 6, 7], None),
        DatasetItem("use output_len", None, 8),
        DatasetItem("last", None, 4),
    ]
    assert [row.line for row in result.skipped] == [3, 5, 6, 7, 9, 10, 11, 12, 13, 14]
    assert all(isinstance(row, SkippedRow) and row.reason for row in result.skipped)
    assert "JSON" in result.skipped[0].reason
    assert "empty prompt" in result.skipped[3].reason
    assert "jsonl" in result.source


def test_jsonl_token_ids_checked_against_vocab_and_invalid_utf8(tmp_path: Path) -> None:
    path = tmp_path / "ids.jsonl"
    path.write_bytes(b'{"prompt_token_ids": [0, 9]}\n{"prompt_token_ids": [10]}\n{"prompt": "\xff\xfe"}\n'
                     b'{"prompt_token_ids": [-1]}\n')
    result = load_dataset(path, vocab_size=10)
    assert result.items == [DatasetItem(None, [0, 9], None)]
    assert [row.line for row in result.skipped] == [2, 3, 4]
    assert "UTF-8" in result.skipped[1].reason


def test_num_requests_truncates_file_reading(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "many.jsonl", [json.dumps({"prompt": f"p{i}"}) for i in range(50)])
    result = load_dataset(str(path), num_requests=7)
    assert [item.prompt for item in result.items] == [f"p{i}" for i in range(7)]


def test_sharegpt_json_array(tmp_path: Path) -> None:
    answer = "one two three four five six seven eight nine ten"  # 10 words -> round(13.0) = 13 tokens
    rows = [
        {"id": "a1", "conversations": [
            {"from": "system", "value": "be nice"},
            {"from": "human", "value": "first question"},
            {"from": "gpt", "value": answer},
            {"from": "human", "value": "second question"},
            {"from": "gpt", "value": "x"},
        ]},
        {"id": "b2", "conversations": [{"from": "gpt", "value": "only the model speaks"}]},  # index 1: no human
        {"conversation": [{"from": "human", "value": "no reply yet"}]},
        "not an object",                                                                      # index 3
        {"conversations": "not a list"},                                                      # index 4
        {"conversations": [{"from": "human", "value": "short"}, {"from": "gpt", "value": "a b"}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(rows), encoding="utf-8")
    result = load_dataset(str(path))
    assert result.items == [
        DatasetItem("first question", None, 13, "a1"),
        DatasetItem("no reply yet", None, None),
        DatasetItem("short", None, 3),  # 2 words * 1.3 = 2.6 -> 3
    ]
    assert [row.line for row in result.skipped] == [1, 3, 4]
    # With a tokenizer, the reply is measured in its tokens (here: words).
    with_tok = load_dataset(str(path), tokenizer=WordTokenizer())
    assert [item.max_tokens for item in with_tok.items] == [10, None, 2]


def test_lmsys_jsonl_rows(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "lmsys.jsonl", [
        json.dumps({"conversation_id": "c1", "conversation": [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "It is four."}]}),
        json.dumps({"conversation_id": "c2", "conversation": [{"role": "user", "content": ""}]}),
        json.dumps({"conversation_id": "c3", "conversation": [
            {"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue"}]}),
    ])
    result = load_dataset(str(path), tokenizer=WordTokenizer())
    assert result.items == [DatasetItem("What is 2+2?", None, 3, "c1"), DatasetItem("Name a colour.", None, 1, "c3")]
    assert result.skipped == [SkippedRow(2, "conversation has no non-empty human/user turn")]


def test_lmsys_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({
        "conversation_id": ["p1", "p2", "p3"],
        "conversation": [
            [{"role": "user", "content": "Tell me a joke."}, {"role": "assistant", "content": "Why did the chicken"}],
            [{"role": "assistant", "content": "no user"}],
            [{"role": "user", "content": "Bye"}, {"role": "assistant", "content": "Goodbye friend"}],
        ],
    })
    path = tmp_path / "lmsys.parquet"
    pq.write_table(table, path)
    result = load_dataset(str(path), tokenizer=WordTokenizer())
    assert result.items == [DatasetItem("Tell me a joke.", None, 4, "p1"), DatasetItem("Bye", None, 2, "p3")]
    assert [row.line for row in result.skipped] == [1]


def test_parquet_without_pyarrow_says_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1 not really")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # a None entry makes `import pyarrow` raise ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DatasetError, match="pip install pyarrow"):
        load_dataset(str(path))


def test_splitwise_trace_csv(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "trace.csv", [
        "TIMESTAMP,ContextTokens,GeneratedTokens",
        "2023-11-16 18:15:46.6805900,374,44",
        "2023-11-16 18:15:50.9951690,abc,10",   # line 3: not a number
        "2023-11-16 18:15:51.0000000,12,0",     # line 4: zero output
        "2023-11-16 18:15:52.0000000,7,3",
    ])
    result = load_dataset(str(path), vocab_size=50, seed=1)
    assert [len(item.prompt_token_ids or []) for item in result.items] == [374, 7]
    assert [item.max_tokens for item in result.items] == [44, 3]
    assert all(0 <= t < 50 for item in result.items for t in item.prompt_token_ids or [])
    assert [row.line for row in result.skipped] == [3, 4]
    with pytest.raises(DatasetError, match="vocab_size"):
        load_dataset(str(path))


def test_trace_csv_without_required_columns(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bad.csv", ["a,b", "1,2"])
    with pytest.raises(DatasetError, match="ContextTokens"):
        load_dataset(str(path), vocab_size=10)


def test_format_detected_from_content(tmp_path: Path) -> None:
    jsonl_as_txt = write_lines(tmp_path / "reqs.txt", ['{"prompt": "a"}', '{"prompt": "b"}'])
    assert [i.prompt for i in load_dataset(str(jsonl_as_txt)).items] == ["a", "b"]
    jsonl_as_json = write_lines(tmp_path / "reqs.json", ['{"prompt": "a"}', '{"prompt": "b"}'])
    assert len(load_dataset(str(jsonl_as_json))) == 2
    array_as_dat = tmp_path / "rows.dat"
    array_as_dat.write_text(json.dumps([{"prompt": "q"}]))
    assert load_dataset(str(array_as_dat)).items == [DatasetItem("q", None, None)]
    broken_array = tmp_path / "broken.json"
    broken_array.write_text('[{"prompt": "q"},')
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_dataset(str(broken_array))


def test_max_len_skips_file_rows_that_do_not_fit(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "r.jsonl", [
        '{"prompt_token_ids": [1, 2, 3], "max_tokens": 5}',    # 8 tokens: fits
        '{"prompt_token_ids": [1, 2, 3], "max_tokens": 6}',    # 9 tokens: too long
        '{"prompt": "four words in here", "max_tokens": 4}',  # 8 with the word tokenizer
        '{"prompt": "four words in here", "max_tokens": 5}',  # 9
    ])
    result = load_dataset(str(path), max_len=8, tokenizer=WordTokenizer())
    assert len(result.items) == 2
    assert [row.line for row in result.skipped] == [2, 4]
    assert "max_len=8" in result.skipped[0].reason


def test_constant_spec() -> None:
    result = load_dataset("constant:16:4", num_requests=10, vocab_size=7)
    assert len(result) == 10
    assert all(len(i.prompt_token_ids or []) == 16 and i.max_tokens == 4 for i in result.items)
    assert all(0 <= t < 7 for i in result.items for t in i.prompt_token_ids or [])
    assert len(load_dataset("constant:2:2", vocab_size=7)) == DEFAULT_SYNTHETIC_REQUESTS
    with pytest.raises(DatasetError, match="vocab_size"):
        load_dataset("constant:16:4")
    with pytest.raises(DatasetError, match="max_len"):
        load_dataset("constant:16:4", vocab_size=7, max_len=10)


@pytest.mark.parametrize("name, target", [
    ("splitwise", (1155, 1109, 211, 163)),
    ("lmsys", (102, 169, 222, 210)),
    ("sharegpt", (246, 547, 322, 244)),
])
def test_table4_statistics(name: str, target: tuple[int, int, int, int]) -> None:
    ins, outs = sample_lengths(name, 400_000, seed=3)
    assert ins.min() >= 1 and outs.min() >= 1
    got = (ins.mean(), ins.std(), outs.mean(), outs.std())
    for value, expected in zip(got, target):
        assert abs(value - expected) <= 0.10 * expected, (name, got, target)


def test_synthetic_spec_uses_the_same_lengths_and_is_deterministic() -> None:
    result = load_dataset("lmsys", num_requests=300, seed=5, vocab_size=1000)
    ins, outs = sample_lengths("lmsys", 300, seed=5)
    assert [len(i.prompt_token_ids or []) for i in result.items] == ins.tolist()
    assert [i.max_tokens for i in result.items] == outs.tolist()
    again = load_dataset("lmsys", num_requests=300, seed=5, vocab_size=1000)
    assert again.items == result.items
    other = load_dataset("lmsys", num_requests=300, seed=6, vocab_size=1000)
    assert other.items != result.items
    with pytest.raises(DatasetError, match="vocab_size"):
        load_dataset("sharegpt")


def test_max_suffix_caps_prompt_plus_output() -> None:
    result = load_dataset("sharegpt:max=512", num_requests=2000, vocab_size=100)
    totals = np.array([len(i.prompt_token_ids or []) + (i.max_tokens or 0) for i in result.items])
    assert totals.max() <= 512
    assert totals.min() >= 2
    with pytest.raises(DatasetError, match="give one of them"):
        load_dataset("sharegpt:max=512", vocab_size=100, max_len=1024)
    ins, outs = sample_lengths("splitwise", 1000, max_len=3)  # tiny cap: redraws rarely fit, clipping finishes
    assert (ins + outs).max() <= 3 and ins.min() >= 1 and outs.min() >= 1


def test_multiround_structure() -> None:
    result = load_dataset("multiround:lmsys", num_requests=100, vocab_size=500, seed=2)
    assert len(result) == 100
    rounds = [item.round for item in result.items]
    assert rounds == sorted(rounds), "items are ordered round-major"
    by_conv: dict[str, list[DatasetItem]] = {}
    for item in result.items:
        assert item.conversation_id is not None
        by_conv.setdefault(item.conversation_id, []).append(item)
    counts = [len(turns) for turns in by_conv.values()]
    assert all(3 <= c <= 5 for c in counts[:-1]) and 1 <= counts[-1] <= 5
    for turns in by_conv.values():
        assert [t.round for t in turns] == list(range(len(turns)))
        for prev, cur in itertools.pairwise(turns):
            prev_ids, cur_ids = prev.prompt_token_ids or [], cur.prompt_token_ids or []
            assert cur_ids[: len(prev_ids)] == prev_ids, "a round extends the previous round's prompt"
            # ... by the previous answer (max_tokens long) plus at least one new user token.
            assert len(cur_ids) - len(prev_ids) >= (prev.max_tokens or 0) + 1
    assert load_dataset("multiround:lmsys", num_requests=100, vocab_size=500, seed=2).items == result.items
    capped = load_dataset("multiround:sharegpt:max=1024", num_requests=60, vocab_size=500)
    assert max(len(i.prompt_token_ids or []) + (i.max_tokens or 0) for i in capped.items) <= 1024


def test_bundled_sample() -> None:
    result = load_dataset("sample")
    prompts = [item.prompt for item in result.items]
    assert len(prompts) >= 190
    assert not result.skipped
    assert len(set(prompts)) == len(prompts)
    assert all(isinstance(p, str) and p.strip() for p in prompts)
    assert len(load_dataset("sample", num_requests=5)) == 5


@pytest.mark.parametrize("spec", ["no/such/file.jsonl", "constant:abc:1", "lmsys:max=", "bogus"])
def test_bad_spec_lists_accepted_forms(spec: str) -> None:
    with pytest.raises(DatasetError, match="accepted dataset specs"):
        load_dataset(spec, vocab_size=10)


def test_bad_arguments() -> None:
    with pytest.raises(DatasetError, match="num_requests"):
        load_dataset("sample", num_requests=0)
    with pytest.raises(DatasetError, match="encode"):
        load_dataset("sample", tokenizer=object())
    with pytest.raises(DatasetError, match="exactly one"):
        DatasetItem("text", [1], None)
    with pytest.raises(DatasetError, match="exactly one"):
        DatasetItem(None, None, None)


def test_summarize_lengths_hand_computed() -> None:
    items = [DatasetItem(None, [1, 2, 3], 2), DatasetItem(None, [1], None), DatasetItem("a b c d", None, 6)]
    summary = summarize_lengths(items)
    assert summary["num_items"] == 3
    assert summary["num_prompt_len"] == 2 and summary["prompt_len_mean"] == 2.0 and summary["prompt_len_std"] == 1.0
    assert summary["num_max_tokens"] == 2 and summary["max_tokens_mean"] == 4.0 and summary["max_tokens_std"] == 2.0
    with_tok = summarize_lengths(items, tokenizer=WordTokenizer())  # lengths 3, 1, 4
    assert with_tok["num_prompt_len"] == 3 and with_tok["prompt_len_mean"] == pytest.approx(8 / 3)
    empty = summarize_lengths([])
    assert empty["prompt_len_mean"] is None and empty["max_tokens_std"] is None
