"""The per-iteration summary of a timed run, on hand-made step lists whose figures are worked out here."""

from __future__ import annotations

import pytest

from nanoflow.bench.iterations import plot_iterations, summarize


def test_summary_of_a_ramp_steady_and_tail_run():
    dense = 8
    # 2 ramp steps (prefill only, full), 4 steady full steps (slower: decode), 2 partial tail steps after idle gaps.
    tokens = [8, 8, 8, 8, 8, 8, 3, 1]
    decode = [0, 0, 3, 3, 4, 4, 3, 1]
    step_ms = [10.0, 10.0, 20.0, 20.0, 22.0, 24.0, 6.0, 4.0]
    gap_ms = [0.0, 0.0, 0.0, 0.5, 0.0, 0.0, 2.0, 3.0]
    s = summarize(tokens, decode, step_ms, gap_ms, dense)
    assert s["steps"] == 8
    assert s["gpu_busy_s"] == pytest.approx(116.0 / 1e3)
    assert s["gpu_idle_s"] == pytest.approx(5.5 / 1e3)
    assert s["full_steps"] == 6 and s["tokens_in_full_steps"] == 48 and s["tokens_in_partial_steps"] == 4
    assert s["partial_steps_s"] == pytest.approx((6.0 + 2.0 + 4.0 + 3.0) / 1e3)
    assert s["full_step_ms_median"] == pytest.approx(20.0)  # median of 10, 10, 20, 20, 22, 24
    assert s["full_step_tok_s"] == pytest.approx(8 / 20.0 * 1e3)
    assert s["full_step_ms_first_quarter"] == pytest.approx(10.0)  # quarter = 1 step
    assert s["full_step_ms_last_quarter"] == pytest.approx(24.0)
    assert s["full_step_decode_tokens_median"] == 3
    assert s["trace"]["step_ms"] == step_ms and s["trace"]["tokens"] == tokens


def test_no_full_step_and_mismatched_lists():
    s = summarize([3, 2], [3, 2], [1.0, 1.0], [0.0, 0.0], dense_batch=8)
    assert s["full_steps"] == 0 and "full_step_ms_median" not in s
    with pytest.raises(ValueError, match="differ in length"):
        summarize([1, 2], [1], [1.0, 1.0], [0.0, 0.0], dense_batch=8)


def test_plot_writes_a_png(tmp_path):
    it = summarize([8, 8, 3], [2, 3, 3], [10.0, 12.0, 5.0], [0.0, 0.1, 1.0], dense_batch=8)
    records = [{"mode": "non-overlap", "throughput_tok_s": 1234.0, "wall_s": 0.03, "iterations_timed": it},
               {"mode": "failed", "error": "x"}]
    path = tmp_path / "run-iterations.png"
    plot_iterations(records, path)
    assert path.stat().st_size > 1000


class _FakeEvent:
    """Stands in for ``torch.cuda.Event``: ``record()`` reads a clock the test advances."""

    clock = [0.0]

    def __init__(self, enable_timing: bool = False) -> None:
        self.t = None

    def record(self) -> None:
        self.t = _FakeEvent.clock[0]

    def elapsed_time(self, end: _FakeEvent) -> float:
        return end.t - self.t


def test_timer_wraps_execute_and_measures_steps_and_gaps(monkeypatch):
    import types

    import torch

    from nanoflow.bench.iterations import IterationTimer

    monkeypatch.setattr(torch.cuda, "Event", _FakeEvent)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    _FakeEvent.clock[0] = 0.0
    durations = iter([5.0, 7.0, 2.0])

    class Runner:
        def execute(self, plan, sampling):
            _FakeEvent.clock[0] += next(durations)  # the step's GPU time
            return plan.num_tokens

    runner = Runner()
    original = runner.execute
    plans = [types.SimpleNamespace(num_tokens=n, num_decode_tokens=d) for n, d in ((8, 2), (8, 3), (4, 4))]
    with IterationTimer(runner) as timer:
        assert runner.execute(plans[0], None) == 8
        assert runner.execute(plans[1], None) == 8
        _FakeEvent.clock[0] += 1.5  # the GPU waits 1.5 ms for the CPU before the last step
        runner.execute(plans[2], None)
    assert runner.execute == original and "execute" not in vars(runner)  # unwrapped again
    s = timer.summary(dense_batch=8)
    assert s["trace"]["step_ms"] == [5.0, 7.0, 2.0]
    assert s["trace"]["gap_ms"] == [0.0, 0.0, 1.5]
    assert s["full_steps"] == 2 and s["full_step_ms_median"] == pytest.approx(6.0)


@pytest.mark.parametrize("n", [1, 5, 33, 1000, 1065])
def test_plan_sample_stays_bounded_and_finds_the_middle(n):
    from nanoflow.bench.throughput import PlanSample

    sample = PlanSample(cap=32)
    for i in range(n):
        sample.add(i)
    assert len(sample.kept) <= 32
    assert sample.kept == list(range(0, n, sample.stride))  # evenly spaced from the first plan
    assert abs(sample.middle() - n // 2) <= sample.stride


def test_step_model_script_recovers_a_known_model(tmp_path):
    """scripts/step_model.py on a synthetic trace made from a known step model with a padded-size term."""
    import importlib.util
    import json
    from pathlib import Path

    import numpy as np

    path = Path(__file__).resolve().parents[1] / "scripts" / "step_model.py"
    spec = importlib.util.spec_from_file_location("step_model", path)
    sm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sm)
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 2049, 400)
    decode = np.minimum(tokens, rng.integers(0, 700, 400))
    pad = sm.padded(tokens, sm.halving_buckets(2048))
    step_ms = 4.0 + 0.02 * pad + 0.003 * (tokens - decode) + 0.03 * decode
    rec = {"model": "m", "mode": "non-overlap", "dense_batch": 2048,
           "iterations_timed": {"gpu_busy_s": float(step_ms.sum() / 1e3),
                                "trace": {"tokens": tokens.tolist(), "decode_tokens": decode.tolist(),
                                          "step_ms": step_ms.tolist()}}}
    (tmp_path / "r.json").write_text(json.dumps([rec]))
    assert sm.main([str(tmp_path / "r.json"), "--output", str(tmp_path / "fit.json")]) == 0
    fit = json.loads((tmp_path / "fit.json").read_text())
    assert abs(fit["fit"]["b_padded"] - 0.02) < 1e-6 and fit["fit"]["rms_ms"] < 1e-6
    pred = fit["predicted_gpu_s"]
    assert abs(pred["as run"]["seconds"] - step_ms.sum() / 1e3) < 1e-6  # no graphs_captured: the halvings
    seconds = [pred[k]["seconds"] for k in ("every 64", "the engine's (token_buckets)", "halvings")]
    assert seconds == sorted(seconds) and seconds[0] < seconds[2]


def test_compare_tokens_counts_identical_outputs_and_first_differences():
    from nanoflow.bench.throughput import compare_tokens

    ref = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 1]]
    got = [[1, 2, 3], [4, 0, 6], [0, 8, 9], [1, 1, 2]]  # differ at 1, at 0, and one is longer (differs at 2)
    assert compare_tokens(ref, got) == {"requests": 4, "identical": 1, "differ": 3, "first_difference_min": 0,
                                        "first_difference_median": 1}
    assert compare_tokens(ref, ref) == {"requests": 4, "identical": 4, "differ": 0}
    with pytest.raises(ValueError, match="same workload"):
        compare_tokens(ref, got[:2])


def test_compare_with_earlier_keeps_the_first_mode_as_reference():
    from nanoflow.bench.throughput import compare_with_earlier

    outputs: dict = {}
    assert compare_with_earlier(outputs, "non-overlap", [[1, 2], [3, 4]]) == {}
    assert compare_with_earlier(outputs, "nano-batch", [[1, 2], [3, 5]]) == {
        "tokens_vs_reference": {"reference": "non-overlap", "requests": 2, "identical": 1, "differ": 1,
                                "first_difference_min": 1, "first_difference_median": 1}}
    fields = compare_with_earlier(outputs, "overlap-preset", [[1, 2], [3, 5]])
    assert fields["tokens_vs_reference"]["identical"] == 1
    assert fields["tokens_vs_modes"] == {"nano-batch": {"requests": 2, "identical": 2, "differ": 0}}
    assert list(outputs) == ["non-overlap", "nano-batch", "overlap-preset"]


def test_run_record_counts_only_this_modes_recompile_give_ups(monkeypatch):
    """``recompile_limit_hits`` in a mode's record is the give-ups since that mode's engine was built, not the
    process's total (a mode run after one that hit the limit must not be flagged for it)."""
    from types import SimpleNamespace

    from torch._dynamo.utils import counters

    from nanoflow.bench.throughput import run_record
    from nanoflow.graphs.glue import recompile_limit_hits

    reason = "Dynamo recompile limit exceeded (test)"
    monkeypatch.setitem(counters["unimplemented"], reason, counters["unimplemented"].get(reason, 0) + 3)
    before = recompile_limit_hits()  # an earlier mode gave up 3x
    graphs = SimpleNamespace(replays=5, eager_runs=0, capture_seconds=1.0, captured=[1, 2])
    engine = SimpleNamespace(stats_iterations=5, stats_sched_s=0.0, stats_launch_s=0.0, dense_batch_size=64,
                             kv_tokens=1024, stats_preemptions=0, runner=SimpleNamespace(graphs=graphs),
                             scheduler=SimpleNamespace(admission_pace=0.0))
    out = SimpleNamespace(prompt_token_ids=[1, 2], token_ids=[3], finish_reason="length")
    assert run_record(engine, [out], [([1, 2], 1)], 1.0, 0.0, 0.0, before)["recompile_limit_hits"] == 0
    counters["unimplemented"][reason] += 2  # this mode gives up twice
    assert run_record(engine, [out], [([1, 2], 1)], 1.0, 0.0, 0.0, before)["recompile_limit_hits"] == 2
