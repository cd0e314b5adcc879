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


def test_run_offline_kv_offload_reuses_rounds_and_keeps_outputs(tmp_path, capsys):
    """`--kv-offload` on a synthetic multi-round trace: rounds after the first are stitched onto the model's real
    answers and reuse the earlier rounds' KV (fewer prefill tokens computed); every output equals what the plain
    engine generates, round by round, for the same prompts (the prompts the offload run sent are in its output)."""
    from nanoflow import LLM, SamplingParams

    model = save_tiny_llama(tmp_path / "model")
    out = tmp_path / "out.jsonl"
    common = ["--model", model, "--device", "cpu", "--dtype", "float32", "--max-model-len", "200",
              "--kv-cache-tokens", "4096", "--dense-batch-size", "64", "--ignore-eos"]
    rc = main(["run-offline", *common, "--dataset", "multiround:sharegpt", "--num-requests", "9",
               "--output", str(out), "--kv-offload", "--kv-host-gib", "0.25"])
    assert rc == 0
    captured = capsys.readouterr().out
    summary = json.loads(captured[captured.index("{"):])
    assert summary["requests"] == 9 and summary["errors"] == 0
    assert summary["kv_reused_tokens"] > 0
    assert summary["prefill_tokens_computed"] == summary["prompt_tokens"] - summary["kv_reused_tokens"]
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    # stitched: some round's prompt starts with an earlier row's prompt + generated answer
    sent = [r["prompt_token_ids"] for r in rows]
    answers = [r["prompt_token_ids"] + r["token_ids"] for r in rows]
    assert any(p[:len(a)] == a for p in sent for a in answers if len(p) > len(a))
    with LLM(model, device="cpu", dtype="float32", max_model_len=200, kv_cache_tokens=4096,
             dense_batch_size=64) as plain:
        ref = plain.generate(sent, [SamplingParams(max_tokens=len(r["token_ids"]), temperature=0, ignore_eos=True)
                                    for r in rows], use_tqdm=False)
    assert [o.token_ids for o in ref] == [r["token_ids"] for r in rows]


def test_batch_invariant_flag_is_checked_before_loading(tmp_path, capsys, monkeypatch):
    """--batch-invariant reaches EngineArgs; what cannot go with it (a CPU without the Triton interpreter, another
    decode kernel) ends the command with a one-line error and exit status 2, before any weights load."""
    import argparse

    from nanoflow.engine.offline import add_engine_args, engine_kwargs
    from nanoflow.serve.cli import configure_parser, engine_args

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = save_tiny_llama(tmp_path / "m")
    common = ["run-offline", "--model", model, "--device", "cpu", "--num-requests", "1", "--batch-invariant"]
    assert main(common) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
    assert main([*common, "--decode-variant", "row"]) == 2
    assert "decode-attention kernel" in capsys.readouterr().err
    p = argparse.ArgumentParser()
    add_engine_args(p)
    assert engine_kwargs(p.parse_args(["--batch-invariant"]))["batch_invariant"] is True
    assert engine_args(configure_parser(argparse.ArgumentParser()).parse_args(["--batch-invariant"])).batch_invariant


def test_run_offline_sampling_flags_reach_the_engine(tmp_path, capsys):
    """--logprobs writes each token's logprob and alternatives, and --frequency-penalty / --repetition-penalty give
    what LLM.generate gives with the same SamplingParams; a bad value stops the command before loading."""
    from nanoflow import LLM, SamplingParams

    model = save_tiny_llama(tmp_path / "model", std=0.2)
    data = tmp_path / "prompts.jsonl"
    prompts = [[1, 2, 3, 4], [5, 6, 7, 5, 6, 7]]
    data.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in prompts))
    out = tmp_path / "out.jsonl"
    common = ["run-offline", "--model", model, "--device", "cpu", "--dtype", "float32", "--dataset", str(data),
              "--output", str(out), "--max-tokens", "6", "--ignore-eos", "--kv-cache-tokens", "2048"]
    assert main([*common, "--logprobs", "2", "--frequency-penalty", "1.0", "--repetition-penalty", "1.5"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, logprobs=2, frequency_penalty=1.0,
                            repetition_penalty=1.5)
    with LLM(model, device="cpu", dtype="float32", kv_cache_tokens=2048) as llm:
        ref = llm.generate(prompts, params, use_tqdm=False)
    assert [r["token_ids"] for r in rows] == [o.token_ids for o in ref]
    for row, o in zip(rows, ref):
        assert [e["token_id"] for e in row["logprobs"]] == row["token_ids"]
        assert [e["logprob"] for e in row["logprobs"]] == pytest.approx([e.logprob for e in o.logprobs])
        assert all(len(e["top"]) == 2 for e in row["logprobs"])
    capsys.readouterr()
    assert main([*common, "--presence-penalty", "3"]) == 2
    assert "--presence-penalty" in capsys.readouterr().err
