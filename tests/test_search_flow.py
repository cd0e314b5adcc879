"""The search's pipeline end to end on a CPU: profile a tiny model's ops, build the problem, solve, run the spec.

Timings on a CPU mean little; what is checked is that the profile covers every (op, size), that the searched spec
validates against the model's graph, and that the engine generates the same tokens with it as without.
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from tiny_models import save_tiny_llama  # noqa: E402

from nanoflow.config import EngineArgs  # noqa: E402
from nanoflow.engine.engine import Engine  # noqa: E402
from nanoflow.scheduler.request import SamplingParams  # noqa: E402
from nanoflow.search.problem import problem_from_graph  # noqa: E402
from nanoflow.search.profiler import profile_ops  # noqa: E402
from nanoflow.search.stage1 import solve_stage1  # noqa: E402
from nanoflow.search.stage2 import solve_stage2  # noqa: E402


def _tiny(tmp_path) -> str:
    return save_tiny_llama(tmp_path)


def _tokens(engine: Engine) -> list[list[int]]:
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (9, 40, 70)]
    outs = [engine.add_request(p, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)) for p in prompts]
    engine.run_until_done()
    return [o.token_ids for o in outs]


def test_profile_search_and_run(tmp_path):
    path = _tiny(tmp_path / "model")
    args = EngineArgs(model=path, device="cpu", dtype="float32", dense_batch_size=64, kv_cache_tokens=4096)
    engine = Engine(args)
    profile = profile_ops(engine, [16, 32, 48, 64], decode_rows=8, ctx=40, chunk=32, reps=2,
                          path=tmp_path / "profile.json")
    graph = engine.model.graphs[0]
    assert set(profile["ops"]) == set(graph.names)
    assert all(set(v) == {"16", "32", "48", "64"} for v in profile["ops"].values())
    assert (tmp_path / "profile.json").is_file()
    assert engine.blocks.num_used_blocks == 0  # profiling gave its pages back
    problem = problem_from_graph(graph, 64, profile)
    s1 = solve_stage1(problem, max_split=2, time_limit_s=10)
    s2 = solve_stage2(problem, s1, time_limit_s=10)
    s2.spec.validate(graph)
    # Whole forwards of both candidates on the profiled batch (what `nanoflow search` compares to its prediction);
    # the engine is left as it was.
    from nanoflow.search.verify import compare, measure_layer_ms

    executor = engine.runner.executor
    measured = measure_layer_ms(engine, {"sequential": None, "stage2": s2.spec}, decode_rows=8, ctx=40, chunk=32,
                                reps=1)
    assert set(measured) == {"sequential", "stage2"} and all(v > 0 for v in measured.values())
    assert engine.runner.executor is executor and engine.blocks.num_used_blocks == 0
    report = compare({"sequential": problem.sequential_ms, "stage2": s2.makespan_ms}, measured)
    assert report["stage2"]["error"] == pytest.approx(s2.makespan_ms / measured["stage2"] - 1)
    baseline = _tokens(engine)
    searched = Engine(EngineArgs(**{**args.__dict__, "pipeline": None}))
    from nanoflow.graphs.executor import Executor

    searched.runner.executor = Executor(searched.model.graphs, s2.spec)
    assert _tokens(searched) == baseline


def test_engine_auto_pipeline_prefers_a_cached_searched_spec(tmp_path, monkeypatch):
    from nanoflow.graphs.pipeline import PipelineSpec

    monkeypatch.setenv("NANOFLOW_CACHE", str(tmp_path / "cache"))
    path = _tiny(tmp_path / "model")
    args = EngineArgs(model=path, device="cpu", dtype="float32", dense_batch_size=64, kv_cache_tokens=2048,
                      pipeline="auto")
    preset = Engine(args).runner.executor.spec
    assert preset is not None and preset.name != "searched-test"  # no cache yet: the hand preset
    engine = Engine(EngineArgs(**{**args.__dict__, "pipeline": None}))
    spec = PipelineSpec.nano_batch_only(engine.model.graphs[0], 64, 2)
    spec = PipelineSpec(**{**spec.__dict__, "name": "searched-test"})
    out = tmp_path / "cache" / "pipelines" / "model-d64-constant_8_8-tp1.json"
    out.parent.mkdir(parents=True)
    spec.save(out)
    assert Engine(args).runner.executor.spec.name == "searched-test"


def test_fp8_kv_specs_are_cached_apart(tmp_path, monkeypatch):
    """``nanoflow search --kv-cache-dtype fp8`` writes its spec under its own name (its decode attention reads half
    the bytes); the engine's cache lookup finds it for an fp8 cache only."""
    import argparse

    from nanoflow.search.cli import _default_output, cached_pipeline

    monkeypatch.setenv("NANOFLOW_CACHE", str(tmp_path))
    args = argparse.Namespace(model="llama-3-8b", dense_batch=2048, workload="constant:1024:512", tp=1,
                              kv_cache_dtype="fp8")
    fp8 = _default_output(args)
    auto = _default_output(argparse.Namespace(**{**vars(args), "kv_cache_dtype": "auto"}))
    assert fp8.name == "llama-3-8b-d2048-constant_1024_512-kvfp8-tp1.json" != auto.name
    fp8.parent.mkdir(parents=True)
    fp8.write_text("{}")
    assert cached_pipeline("llama-3-8b", 2048, 1, "fp8") == fp8
    assert cached_pipeline("llama-3-8b", 2048, 1) is None
    auto.write_text("{}")
    assert cached_pipeline("llama-3-8b", 2048, 1) == auto and cached_pipeline("llama-3-8b", 2048, 1, "fp8") == fp8


def test_specs_searched_with_a_named_decode_kernel_are_cached_apart(tmp_path, monkeypatch):
    """A spec searched with ``--decode-variant cuda`` was timed with that kernel: it is cached under its own name and
    only an engine asking for the same kernel picks it up; an ``auto`` engine keeps finding the ``auto`` spec."""
    import argparse
    import os

    from nanoflow.search.cli import _default_output, cached_pipeline

    monkeypatch.setenv("NANOFLOW_CACHE", str(tmp_path))
    base = dict(model="llama-3-8b", dense_batch=2048, workload="constant:1024:512", tp=1, kv_cache_dtype="fp8")
    auto = _default_output(argparse.Namespace(**base, decode_variant="auto"))
    cuda = _default_output(argparse.Namespace(**base, decode_variant="cuda"))
    flat = _default_output(argparse.Namespace(**{**base, "kv_cache_dtype": "auto"}, decode_variant="row_flat"))
    assert auto.name == "llama-3-8b-d2048-constant_1024_512-kvfp8-tp1.json"
    assert cuda.name == "llama-3-8b-d2048-constant_1024_512-kvfp8-deccuda-tp1.json"
    assert flat.name == "llama-3-8b-d2048-constant_1024_512-decrow_flat-tp1.json"
    cuda.parent.mkdir(parents=True)
    cuda.write_text("{}")
    assert cached_pipeline("llama-3-8b", 2048, 1, "fp8", "cuda") == cuda
    assert cached_pipeline("llama-3-8b", 2048, 1, "fp8") is None  # the engine's default asks for auto
    auto.write_text("{}")
    flat.write_text("{}")
    os.utime(cuda, (cuda.stat().st_atime, cuda.stat().st_mtime + 10))  # the newest file must not win across tags
    assert cached_pipeline("llama-3-8b", 2048, 1, "fp8") == auto
    assert cached_pipeline("llama-3-8b", 2048, 1, "fp8", "cuda") == cuda
    assert cached_pipeline("llama-3-8b", 2048, 1, "auto", "row_flat") == flat
    assert cached_pipeline("llama-3-8b", 2048, 1) is None


def test_search_cli_from_a_saved_profile(tmp_path, monkeypatch, capsys):
    """`nanoflow search --profile FILE` on a CPU: solves, writes a valid spec with the search's figures and a Gantt
    PNG; without a GPU nothing is measured, so the choice rests on the prediction."""
    import json

    from nanoflow.cli import main
    from nanoflow.graphs.pipeline import PipelineSpec

    monkeypatch.setenv("NANOFLOW_CACHE", str(tmp_path / "cache"))
    path = _tiny(tmp_path / "model")
    engine = Engine(EngineArgs(model=path, device="cpu", dtype="float32", dense_batch_size=64, kv_cache_tokens=4096))
    profile_ops(engine, [16, 32, 48, 64], decode_rows=8, ctx=40, chunk=32, reps=2, path=tmp_path / "profile.json")
    out = tmp_path / "searched.json"
    rc = main(["search", "--model", path, "--profile", str(tmp_path / "profile.json"), "--dense-batch", "64",
               "--step", "16", "--time-limit", "10", "--max-split", "2", "--output", str(out)])
    assert rc == 0
    summary = json.loads(capsys.readouterr().out)
    spec = PipelineSpec.load(out)
    spec.validate(engine.model.graphs[0])
    assert spec.meta["chosen_by"] == "predicted" and "verify" not in spec.meta["search"]
    assert summary["chosen"] == spec.meta["chosen"] and out.with_suffix(".png").is_file()
    predicted = min(summary["stage2_ms"], summary["sequential_ms"])
    assert predicted == pytest.approx(summary["stage2_ms" if spec.meta["chosen"] == "stage2" else "sequential_ms"])


def test_search_takes_the_engines_decode_options():
    """The GPU profile is made with the decode kernel options the engine will run (bench's --decode-options)."""
    from nanoflow.cli import build_parser

    argv = ["search", "--kv-cache-dtype", "fp8", "--decode-options", "block_n=128,prefetch=1"]
    args = build_parser().parse_args(argv)
    assert args.decode_options == {"block_n": 128, "prefetch": 1} and args.kv_cache_dtype == "fp8"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["search", "--decode-options", "tiles=4"])
