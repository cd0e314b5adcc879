"""`nanoflow run-offline` on a JSONL file: outputs in order, a malformed row skipped with its line number, an
over-long prompt failing alone, and the summary's counts."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("transformers")

from tiny_models import save_tiny_llama  # noqa: E402

from nanoflow.cli import main  # noqa: E402


def test_run_offline_jsonl(tmp_path, capsys):
    model = save_tiny_llama(tmp_path / "model")
    data = tmp_path / "prompts.jsonl"
    rows = ['{"prompt_token_ids": [1, 2, 3, 4]}', "{not json", '{"prompt_token_ids": [5, 6, 7], "max_tokens": 3}',
            json.dumps({"prompt_token_ids": [9] * 300}), '{"prompt_token_ids": [8, 8]}']
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "out.jsonl"
    rc = main(["run-offline", "--model", model, "--device", "cpu", "--dtype", "float32", "--dataset", str(data),
               "--output", str(out), "--max-tokens", "4", "--ignore-eos", "--max-model-len", "200",
               "--kv-cache-tokens", "2048", "--dense-batch-size", "32"])
    assert rc == 0
    captured = capsys.readouterr()
    assert "prompts.jsonl:2" in captured.err  # the malformed row, by line number
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [len(x["token_ids"]) for x in lines] == [4, 4, 0, 4]  # --max-tokens overrides the row's 3
    assert [x["finish_reason"] for x in lines] == ["length", "length", "error", "length"]
    assert "300" in lines[2]["error"]
    summary = json.loads(captured.out[captured.out.index("{"):])
    assert summary["requests"] == 4 and summary["errors"] == 1 and summary["skipped_rows"] == 1
