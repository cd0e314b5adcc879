"""Resource knobs: how a nano-op's share becomes a decode grid or a GEMM SM target, and the share sweep override."""

from __future__ import annotations

from dataclasses import replace
from unittest import mock

import pytest
import torch

from nanoflow.bench.throughput import mode_args
from nanoflow.config import ConfigError, EngineArgs
from nanoflow.graphs import resources
from nanoflow.graphs.nanoop import ResourceKind
from nanoflow.graphs.pipeline import PipelineSpecError, load_preset
from nanoflow.graphs.resources import ResourceConfig, decode_programs, gemm_carveout, sm_target
from tests.test_pipeline_spec import llama_graph

CUDA = torch.device("cuda", 0)


@pytest.fixture
def h200(monkeypatch):
    monkeypatch.setattr(resources, "sm_count", lambda device: 132)


def test_partition_bounds_both_sides(h200):
    cfg = ResourceConfig(knob="partition", ctas_per_sm=1)
    assert decode_programs(0.25, CUDA, cfg) == 33  # one program per SM of its quarter
    assert gemm_carveout(0.75, CUDA, cfg) == 132 - 99  # the GEMM targets 99 SMs, leaving 33
    assert gemm_carveout(1.0, CUDA, cfg) is None  # an unpartitioned GEMM keeps every SM
    assert gemm_carveout(0.01, CUDA, cfg) == 132 - cfg.min_gemm_sms
    assert decode_programs(1.0, CUDA, cfg) is None


def test_other_knobs_leave_gemms_alone(h200):
    for knob in ("grid", "green", "none"):
        assert gemm_carveout(0.5, CUDA, ResourceConfig(knob=knob)) is None
    assert decode_programs(0.5, CUDA, ResourceConfig(knob="grid")) == 132
    assert decode_programs(0.5, CUDA, ResourceConfig(knob="none")) is None
    assert decode_programs(0.5, torch.device("cpu"), ResourceConfig(knob="partition")) is None
    with pytest.raises(ValueError, match="partition"):
        ResourceConfig(knob="sms")


def test_sm_target_sets_and_restores_the_carveout():
    calls = []
    with mock.patch.object(torch._C, "_set_sm_carveout_experimental", side_effect=calls.append), \
            mock.patch.object(torch._C, "_get_sm_carveout_experimental", return_value=None), \
            mock.patch.object(torch.backends.cuda, "preferred_blas_library", return_value="prev") as blas:
        with sm_target(40):
            assert calls == [40]
        assert calls == [40, None]
        assert blas.call_args_list[-2:] == [mock.call("cublaslt"), mock.call("prev")]
    with sm_target(None):  # no target: nothing touched (the CPU build has no cuBLASLt at all)
        pass


def test_memory_share_override_keeps_partitioned_pairs_summing_to_one():
    graph = llama_graph()
    spec = load_preset("llama-8b-overlap").for_graph(graph)
    swept = spec.with_memory_share(0.25, graph)
    swept.validate(graph)
    for before, after in zip(spec.nano_ops, swept.nano_ops):
        if before.share >= 1.0:
            assert after.share == before.share
        elif graph.op(before.op).kind is ResourceKind.MEMORY:
            assert after.share == 0.25
        else:
            assert after.share == 0.75
    with pytest.raises(PipelineSpecError, match=r"\(0, 1\)"):
        spec.with_memory_share(1.0, graph)


def test_bench_modes_name_their_knob():
    args = EngineArgs(model="x")
    assert mode_args(args, "overlap-preset-partition", None).resource_knob == "partition"
    assert mode_args(args, "overlap-searched-partition", "s.json").resource_knob == "partition"
    assert mode_args(args, "overlap-searched", "s.json").resource_knob == "none"
    assert mode_args(args, "overlap-searched-grid", "mixtral-decode-split").resource_knob == "grid"
    with pytest.raises(ValueError, match="unknown mode"):
        mode_args(args, "overlap-presets", None)
    # admission pacing is off by default; the non-overlap-paced mode turns only it on (1.05, or --admission-pace)
    assert args.admission_pace == 0.0 and mode_args(args, "overlap-preset", None).admission_pace == 0.0
    paced = mode_args(args, "non-overlap-paced", None)
    assert paced.admission_pace == 1.05 and paced == replace(mode_args(args, "non-overlap", None), admission_pace=1.05)
    assert mode_args(replace(args, admission_pace=1.2), "non-overlap-paced", None).admission_pace == 1.2
    for bad in (-1.0, float("nan"), "1.05", True):
        with pytest.raises(ConfigError, match="admission_pace"):
            EngineArgs(model="x", admission_pace=bad)


def test_bench_decode_options_flag():
    import argparse

    from nanoflow.bench.cli import decode_options

    assert decode_options("block_n=128, num_warps=8,num_stages=3") == {"block_n": 128, "num_warps": 8, "num_stages": 3}
    for bad in ("block_n", "block_n=x", "warps=4"):
        with pytest.raises(argparse.ArgumentTypeError, match="KEY=INT"):
            decode_options(bad)


def test_bench_passes_alternate_the_mode_order(capsys):
    """--passes N runs the modes N times, every other pass reversed (A B B A), so no mode is always first."""
    from nanoflow.bench.cli import mode_runs, print_pass_means
    from nanoflow.config import ConfigError

    assert mode_runs("non-overlap, overlap-preset", ["auto"]) == [("non-overlap", "auto", 1),
                                                                  ("overlap-preset", "auto", 1)]
    order = [(m, p) for m, _, p in mode_runs("a,b", ["auto"], 3)]
    assert order == [("a", 1), ("b", 1), ("b", 2), ("a", 2), ("a", 3), ("b", 3)]
    assert [(m, b) for m, b, _ in mode_runs("a", ["triton", "auto"], 2)] == [("a", "triton"), ("a", "auto"),
                                                                            ("a", "auto"), ("a", "triton")]
    with pytest.raises(ConfigError, match="passes"):
        mode_runs("a", ["auto"], 0)
    with pytest.raises(ConfigError, match="no mode"):
        mode_runs(" , ", ["auto"])
    records = [{"mode": "a", "label": "a-pass1", "throughput_tok_s": 100.0, "pct_optimal": 50.0},
               {"mode": "b", "label": "b-pass1", "throughput_tok_s": 90.0, "pct_optimal": 45.0},
               {"mode": "b", "label": "b-pass2", "throughput_tok_s": 110.0, "pct_optimal": 55.0},
               {"mode": "a", "label": "a-pass2", "error": "boom"}]
    means = print_pass_means(records)
    assert means == {"a": {"passes": 1, "throughput_tok_s": 100.0, "pct_optimal": 50.0},
                     "b": {"passes": 2, "throughput_tok_s": 100.0, "pct_optimal": 50.0}}
    assert "mean of 2 passes (90, 110)" in capsys.readouterr().out


def test_result_records_take_the_commit_from_the_environment(monkeypatch):
    from nanoflow.bench import git_commit

    monkeypatch.setenv("NANOFLOW_COMMIT", "abc1234")
    assert git_commit() == "abc1234"
    monkeypatch.delenv("NANOFLOW_COMMIT")
    assert git_commit()  # the checkout's HEAD here, or "unknown"
