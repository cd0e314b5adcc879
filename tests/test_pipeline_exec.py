"""The executor with several nano-batches gives the same tokens as the sequential baseline.

On a CPU the nano-ops run one after another in the spec's issue order — the same kernels, split into nano-batches,
and the same dependency and metadata code (straddling prefill chunks, per-range attention metadata) the GPU uses.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

transformers = pytest.importorskip("transformers")

from tiny_models import save_tiny_llama  # noqa: E402

from nanoflow.config import EngineArgs, ModelSpec  # noqa: E402
from nanoflow.engine.builder import ModelSource  # noqa: E402
from nanoflow.engine.engine import Engine  # noqa: E402
from nanoflow.graphs.pipeline import NanoOpSpec, PipelineSpec, load_preset  # noqa: E402
from nanoflow.models.loader import load_weights  # noqa: E402
from nanoflow.models.registry import model_class  # noqa: E402
from nanoflow.scheduler.request import SamplingParams  # noqa: E402

DENSE = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))
    spec = ModelSpec.load(path)
    weights = load_weights(spec, path, load_format="safetensors", dtype=torch.float32, device="cpu", progress=False)
    return spec, weights, str(path)


def _generate(tiny, pipeline) -> list[list[int]]:
    spec, weights, path = tiny
    parts = {"model": model_class(spec.architecture)(spec, weights), "tokenizer": None, "dtype": torch.float32,
             "source": ModelSource(spec, path, "safetensors", "tiny")}
    args = EngineArgs(model=path, device="cpu", dtype="float32", dense_batch_size=DENSE, kv_cache_tokens=2048)
    engine = Engine(args, parts=parts)
    if pipeline is not None:  # a spec object straight into the runner's executor (what --pipeline loads)
        from nanoflow.graphs.executor import Executor

        engine.runner.executor = Executor(engine.model.graphs, pipeline)
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (7, 30, 45, 90, 3)]
    outs = [engine.add_request(p, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)) for p in prompts]
    engine.run_until_done()
    return [o.token_ids for o in outs]


@pytest.fixture(scope="module")
def baseline(tiny):
    return _generate(tiny, None)


@pytest.mark.parametrize("preset", ["llama-8b-overlap", "llama-8b-nanobatch"])
def test_presets_match_baseline(tiny, baseline, preset):
    spec = load_preset(preset).rescaled(DENSE)
    assert _generate(tiny, spec) == baseline


@st.composite
def random_specs(draw):
    """Valid specs: each op cut at random multiples of 16, issued op by op (graph order), one stream."""
    ops = ["attn_norm", "qkv", "rope_kv", "decode_attn", "prefill_attn", "o_proj", "ffn_norm", "gate_up", "act",
           "down"]
    nano = []
    for op in ops:
        cuts = sorted(draw(st.sets(st.sampled_from(range(16, DENSE, 16)), max_size=3)))
        bounds = [0, *cuts, DENSE]
        nano += [NanoOpSpec(op, lo, hi, 0) for lo, hi in zip(bounds, bounds[1:])]
    return PipelineSpec(name="random", dense_batch_size=DENSE, nano_ops=tuple(nano), extra_edges=(), num_streams=1,
                        meta={})


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=random_specs())
def test_random_specs_match_baseline(tiny, baseline, spec):
    assert _generate(tiny, spec) == baseline


def test_token_buckets_fine_then_coarse():
    from nanoflow.graphs.cuda_graph import token_buckets

    assert token_buckets(2048) == [2048, 1792, 1536, 1280, 1024, 896, 768, 640, 512, 384, 256, 128]
    assert token_buckets(256) == [256, 128]
    assert token_buckets(300) == [300, 256, 128]  # the dense size itself is always a bucket
    assert token_buckets(100) == [100]
    sizes = token_buckets(4096)
    assert sizes[0] == 4096 and sizes[-1] == 128 and sizes == sorted(set(sizes), reverse=True)
    # padding never exceeds one step: 128 rows up to 1,024 tokens, 256 above
    for n in range(1, 4097):
        padded = min(s for s in sizes if s >= n)
        assert padded - n < (128 if n <= 1024 else 256)
