"""``gpu_memory_utilization``: the KV cache sized by a probe run (engine/memory_profile.py).

The GPU's memory reading is injected (CPU machine); what is checked is that the probe really reaches the engine's
peaks (a full dense batch, a decode step of ``max_num_seqs`` rows, a long chunked prefill), that the budget follows
the documented formula from the reading, and that bad values are refused where they enter.
"""

from __future__ import annotations

import pytest
import torch
from tiny_models import save_tiny_llama

from nanoflow.cli import main
from nanoflow.config import ConfigError, EngineArgs
from nanoflow.engine import memory_profile as mp

GiB = 2**30


def test_budget_is_utilization_of_total_less_what_is_not_kv() -> None:
    kv_bytes, tokens = mp.kv_budget(0.9, total=80 * GiB, in_use=20 * GiB, probe_kv_bytes=2 * GiB,
                                    per_token=128 * 1024, min_tokens=4096)
    assert kv_bytes == int(0.9 * 80 * GiB) - 18 * GiB
    assert tokens == kv_bytes // (128 * 1024)
    with pytest.raises(ConfigError, match="Raise --gpu-memory-utilization"):
        mp.kv_budget(0.3, total=80 * GiB, in_use=30 * GiB, probe_kv_bytes=GiB, per_token=128 * 1024,
                     min_tokens=4096)


def test_probe_requests_fill_a_dense_batch_and_max_num_seqs_rows() -> None:
    reqs = mp.probe_requests(dense=2048, max_seqs=1024, max_len=8192, vocab=32000)
    assert len(reqs) == 1025 and all(n == 2 for _, n in reqs)
    assert sum(len(ids) for ids, _ in reqs[:-1]) >= 2048  # the first step is a full dense batch of prefill
    assert len(reqs[-1][0]) == 3072  # then a long prompt, chunked over its own context
    assert all(0 <= t < 32000 for ids, _ in reqs for t in ids)
    assert len(mp.probe_requests(256, 256, 200, 128)[-1][0]) == 198  # capped by the context
    with pytest.raises(ConfigError, match="max-model-len"):
        mp.probe_requests(2048, 4, 100, 128)


def test_probe_reaches_the_peaks_and_the_cache_follows_the_reading(tmp_path, monkeypatch) -> None:
    from nanoflow.engine import engine as engine_mod
    from nanoflow.engine.builder import load_parts

    model = save_tiny_llama(tmp_path / "m")
    args = EngineArgs(model=model, device="cpu", dtype="float32", dense_batch_size=64, max_num_seqs=32,
                      max_model_len=200, gpu_memory_utilization=0.5)
    parts = load_parts(args, torch.device("cpu"))
    plans, built = [], []
    run = engine_mod.Engine.run_until_done

    def recording(self, *a, **kw):
        built.append(self)
        self.plan_hook = plans.append
        return run(self, *a, **kw)

    monkeypatch.setattr(engine_mod.Engine, "run_until_done", recording)
    readings = []

    def memory_info(device):
        readings.append(built[-1].runner.kv_cache is not None)  # measured while the probe's cache is alive
        return 3 * GiB, 10 * GiB

    prof = mp.profile_kv_cache(args, parts, torch.device("cpu"), memory_info)
    assert readings == [True]
    assert built[0].runner.kv_cache is None  # the probe was closed
    assert max(p.num_tokens for p in plans) == 64  # a full dense batch
    assert max(p.num_decode_tokens for p in plans) == 32  # a decode step of max_num_seqs rows
    assert any(p.num_prefill_tokens and p.prefill[0].start > 0 for p in plans)  # a prefill chunk over its context
    per_token = parts["model"].spec.kv_bytes_per_token(elem_bytes=4)
    assert prof.probe_kv_bytes == built[0].kv_tokens // 16 * 16 * per_token + 16 * per_token  # + the null block
    assert prof.kv_bytes == int(0.5 * 10 * GiB) - (3 * GiB - prof.probe_kv_bytes)
    assert prof.kv_tokens == prof.kv_bytes // per_token
    assert prof.summary()["non_kv_gib"] == pytest.approx((3 * GiB - prof.probe_kv_bytes) / GiB, abs=1e-3)


def test_bad_values_are_refused_where_they_enter(tmp_path, capsys) -> None:
    for bad in (0, 1.5, -0.1, "0.9", True):
        with pytest.raises(ConfigError, match="gpu_memory_utilization"):
            EngineArgs(gpu_memory_utilization=bad)
    with pytest.raises(ConfigError, match="not both"):
        EngineArgs(gpu_memory_utilization=0.9, kv_cache_tokens=4096)
    with pytest.raises(ConfigError, match="kv-cache-tokens"):
        EngineArgs(gpu_memory_utilization=0.9, tp=2)
    with pytest.raises(SystemExit):
        main(["run-offline", "--gpu-memory-utilization", "1.5"])
    assert "fraction in (0, 1]" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["serve", "--gpu-memory-utilization", "0.9", "--kv-cache-tokens", "4096"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["bench", "--gpu-memory-utilization", "0.9", "--kv-cache-tokens", "4096"])
    assert "not allowed with argument" in capsys.readouterr().err


def test_on_a_cpu_the_default_capacity_applies(tmp_path, caplog) -> None:
    from nanoflow.engine.engine import Engine

    model = save_tiny_llama(tmp_path / "m")
    engine = Engine(EngineArgs(model=model, device="cpu", dtype="float32", gpu_memory_utilization=0.9))
    try:
        assert engine.kv_tokens == 32768 and engine.memory_profile is None
        assert "sizes a GPU's KV cache" in caplog.text
    finally:
        engine.close()
