"""Batch-invariant mode under Triton's CPU interpreter: each row's bits do not depend on the batch.

The kernels: a row of the GEMM and of the norm is bitwise the same computed alone, in any slice of the batch, or in
the whole batch, and close to a float64 reference; prefill attention gives the same bits whether a request's chunk
is one segment or is cut in two (the second half reading the first from the pages); decode gives the same bits on
the split and the persistent kernel. The engine: nano-batch pipelines give logits bitwise equal to the sequential
baseline at every step, and a request alone gets the logits it gets among others.
"""

from __future__ import annotations

import zlib

from interpreted import fresh_interpreter_test, import_interpreted, interpret_env, is_interpreted  # noqa: F401

bi, prefill_mod, decode_mod = import_interpreted(
    "nanoflow.ops.batch_invariant", "nanoflow.ops.attention.prefill", "nanoflow.ops.attention.decode")

import pytest  # noqa: E402
import torch  # noqa: E402

from nanoflow.ops.attention.reference import AttentionInputError, prefill_attention_ref  # noqa: E402
from nanoflow.ops.norm import add_rms_norm  # noqa: E402

IN_PROCESS = is_interpreted(bi._matmul_kernel, bi._add_rms_norm_kernel, prefill_mod._prefill_kernel,
                            decode_mod._decode_split_kernel)
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported compiled; covered by the subprocess run")
test_whole_file_in_fresh_interpreter = fresh_interpreter_test(__file__, IN_PROCESS)


def seeded(*case: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,n,k,bias", [(37, 40, 72, True), (64, 48, 32, False), (1, 17, 20, False)])
def test_matmul_rows_do_not_depend_on_the_batch(dtype, m, n, k, bias):
    g = seeded(dtype, m, n, k, bias)
    x = torch.randn(m, k, generator=g).to(dtype)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if bias else None
    whole = bi.matmul(x, w, b)
    ref = x.double() @ w.double().T + (b.double() if bias else 0)
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    assert torch.allclose(whole.double(), ref, rtol=tol, atol=tol * k ** 0.5)
    for cut in sorted({1, m // 3, m // 2, m - 1} - {0, m}):
        parts = torch.cat([bi.matmul(x[:cut], w, b), bi.matmul(x[cut:], w, b)])
        assert torch.equal(parts, whole), f"rows changed when the batch was cut at {cut}"
    alone = torch.cat([bi.matmul(x[i:i + 1], w, b) for i in range(m)])
    assert torch.equal(alone, whole)


@in_process
def test_matmul_writes_into_strided_views_and_rejects_bad_shapes():
    g = seeded("views")
    x = torch.randn(10, 24, generator=g)
    w = torch.randn(12, 24, generator=g)
    buf = torch.full((16, 12), float("nan"))
    bi.linear_into(x[3:9], w, None, buf[2:8])
    assert torch.equal(buf[2:8], bi.matmul(x, w)[3:9])
    assert torch.isnan(buf[:2]).all() and torch.isnan(buf[8:]).all()
    with pytest.raises(bi.BatchInvariantError, match="weight"):
        bi.matmul(x, torch.randn(12, 23))
    with pytest.raises(bi.BatchInvariantError, match="out must be"):
        bi.linear_into(x, w, None, torch.empty(10, 11))
    with pytest.raises(bi.BatchInvariantError, match="bias"):
        bi.matmul(x, w, torch.randn(5))


@in_process
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_rows_do_not_depend_on_the_batch(dtype):
    g = seeded("norm", dtype)
    h, r = (torch.randn(23, 80, generator=g).to(dtype) for _ in range(2))
    w = torch.randn(80, generator=g).to(dtype)
    out, res = bi.add_rms_norm(h, r, w, 1e-5)
    ref_out, ref_res = add_rms_norm(h, r, w, 1e-5)
    tol = 1e-5 if dtype == torch.float32 else 4e-2
    assert torch.allclose(res.float(), ref_res.float(), rtol=tol, atol=tol)
    assert torch.allclose(out.float(), ref_out.float(), rtol=tol, atol=tol)
    for cut in (1, 7, 22):
        parts = [bi.add_rms_norm(h[a:b], r[a:b], w, 1e-5) for a, b in ((0, cut), (cut, 23))]
        assert torch.equal(torch.cat([p[0] for p in parts]), out)
        assert torch.equal(torch.cat([p[1] for p in parts]), res)
    with pytest.raises(bi.BatchInvariantError, match="weight"):
        bi.add_rms_norm(h, r, w[:79], 1e-5)


def _paged(total: int, block_size: int, hkv: int, d: int, gen: torch.Generator):
    pages = -(-total // block_size)
    k = torch.randn(pages + 2, block_size, hkv, d, generator=gen)
    v = torch.randn(pages + 2, block_size, hkv, d, generator=gen)
    table = (torch.randperm(pages + 1, generator=gen)[:pages] + 1).to(torch.int32)
    return k, v, table


@in_process
@pytest.mark.parametrize("ctx,q_len,cut", [(0, 40, 13), (5, 37, 16), (20, 30, 29)])
def test_prefill_rows_do_not_depend_on_the_chunk_cut(ctx, q_len, cut):
    """A chunk of ``q_len`` tokens after ``ctx`` context, as one segment or as two (``cut`` tokens, then the rest
    with ``ctx + cut`` context), as two nano-batches would run it: the same bits for every query."""
    g = seeded("prefill", ctx, q_len, cut)
    heads, hkv, d, bs = 4, 2, 16, 8
    k, v, table = _paged(ctx + q_len, bs, hkv, d, g)
    q = torch.randn(q_len, heads, d, generator=g)
    i32 = dict(dtype=torch.int32)

    def run(q_start, lens, ctxs, rows):
        out = torch.full((rows, heads, d), float("nan"))
        prefill_mod.prefill_attention(
            q, k, v, out,
            torch.tensor(q_start, **i32), torch.tensor(lens, **i32), torch.tensor(ctxs, **i32),
            table[None].expand(len(lens), -1).contiguous(), 0.25, max(lens), batch_invariant=True)
        return out

    whole = run([0], [q_len], [ctx], q_len)
    ref = prefill_attention_ref(q, k, v, torch.tensor([0], **i32), torch.tensor([q_len], **i32),
                                torch.tensor([ctx], **i32), table[None], 0.25)
    assert torch.allclose(whole, ref.float(), atol=1e-4)
    split = run([0, cut], [cut, q_len - cut], [ctx, ctx + cut], q_len)
    assert torch.equal(split, whole)
    with pytest.raises(AttentionInputError, match="batch_invariant"):
        prefill_mod.prefill_attention(q, k, v, whole, torch.tensor([0], **i32), torch.tensor([q_len], **i32),
                                      torch.tensor([ctx], **i32), table[None], 0.25, q_len, block_m=32,
                                      batch_invariant=True)


@in_process
def test_invariant_decode_agrees_on_the_split_and_persistent_kernels():
    from nanoflow.graphs.forward_batch import DecodeMeta
    from nanoflow.ops.attention.backends import TritonAttention

    g = seeded("decode")
    heads, hkv, d, bs = 4, 2, 16, 8
    lens = [5, 40, 17]
    k, v, table = _paged(sum(lens) + 8, bs, hkv, d, g)
    tables = torch.stack([table] * len(lens))
    q = torch.randn(len(lens), heads, d, generator=g)
    att = TritonAttention(0.25, bs, batch_invariant=True)
    outs = []
    for programs in (None, 2, 5):
        meta = DecodeMeta(rows=len(lens), block_tables=tables, seq_lens=torch.tensor(lens, dtype=torch.int32))
        meta.num_splits, meta.max_programs = 4, programs  # a graph's workspace split count is ignored
        out = torch.empty_like(q)
        att.decode(q, k, v, meta, out)
        outs.append(out)
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    alone = torch.empty_like(q[1:2])
    meta = DecodeMeta(rows=1, block_tables=tables[1:2], seq_lens=torch.tensor(lens[1:2], dtype=torch.int32))
    att.decode(q[1:2], k, v, meta, alone)
    assert torch.equal(alone, outs[0][1:2])
    with pytest.raises(ValueError, match="batch_invariant"):
        TritonAttention(0.25, bs, decode_variant="row", batch_invariant=True)


# ---- the engine ------------------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")

DENSE = 64


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_models import save_tiny_llama

    from nanoflow.config import ModelSpec
    from nanoflow.models.loader import load_weights

    path = save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-bi"), hidden_size=64, intermediate_size=96,
                           num_attention_heads=4, num_key_value_heads=2)
    spec = ModelSpec.load(path)
    weights = load_weights(spec, path, load_format="safetensors", dtype=torch.float32, device="cpu", progress=False)
    return spec, weights, str(path)


def _step_logits(tiny, pipeline, prompts, batch_invariant=True) -> dict[str, list[torch.Tensor]]:
    """Each request's logits at every step it sampled, with ``pipeline`` (None = sequential) in the executor."""
    from tiny_models import step_logits

    from nanoflow.config import EngineArgs
    from nanoflow.engine.builder import ModelSource
    from nanoflow.engine.engine import Engine
    from nanoflow.graphs.executor import Executor
    from nanoflow.models.registry import model_class

    spec, weights, path = tiny
    parts = {"model": model_class(spec.architecture)(spec, weights), "tokenizer": None, "dtype": torch.float32,
             "source": ModelSource(spec, path, "safetensors", "tiny")}
    args = EngineArgs(model=path, device="cpu", dtype="float32", dense_batch_size=DENSE, kv_cache_tokens=1024,
                      batch_invariant=batch_invariant)
    engine = Engine(args, parts=parts)
    if pipeline is not None:
        engine.runner.executor = Executor(engine.model.graphs, pipeline)
    return step_logits(engine, prompts, max_tokens=4)


def _prompts() -> list[list[int]]:
    g = seeded("prompts")
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in (7, 45, 30, 3)]


@in_process
def test_engine_nano_batches_give_bitwise_equal_logits(tiny):
    from nanoflow.graphs.pipeline import load_preset

    prompts = _prompts()
    base = _step_logits(tiny, None, prompts)
    for preset in ("llama-8b-overlap", "llama-8b-nanobatch"):
        got = _step_logits(tiny, load_preset(preset).rescaled(DENSE), prompts)
        assert got.keys() == base.keys()
        for rid in base:
            assert len(got[rid]) == len(base[rid])
            assert all(torch.equal(a, b) for a, b in zip(got[rid], base[rid])), f"{preset}: {rid} differs"
    alone = _step_logits(tiny, None, prompts[1:2])["r0"]
    assert all(torch.equal(a, b) for a, b in zip(alone, base["r1"])), "a request alone got other logits"


def test_batch_invariant_options_are_checked():
    from nanoflow.config import ConfigError, EngineArgs

    with pytest.raises(ConfigError, match="decode"):
        EngineArgs(batch_invariant=True, extra={"decode_variant": "row"})
    with pytest.raises(ConfigError, match="tp <= 2"):
        EngineArgs(batch_invariant=True, tp=4)
    EngineArgs(batch_invariant=True, extra={"decode_variant": "auto"})


@in_process
def test_runner_refuses_another_decode_kernel(tiny):
    from nanoflow.graphs.runner import ModelRunner
    from nanoflow.models.registry import model_class

    spec, weights, _ = tiny
    model = model_class(spec.architecture)(spec, weights)
    with pytest.raises(ValueError, match="fixes the decode kernel"):
        ModelRunner(model, 8, 16, DENSE, 64, decode_variant="row", batch_invariant=True)
    runner = ModelRunner(model, 8, 16, DENSE, 64, decode_variant="auto", batch_invariant=True)
    assert runner.attention.decode_variant == "split" and runner.attention.num_splits == 1
