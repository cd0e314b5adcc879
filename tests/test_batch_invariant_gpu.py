"""Batch-invariant kernels on a GPU at LLaMA-3-8B shapes (marked ``gpu``; run by scripts/device/batch_invariant_run.sh).

Each kernel's rows are bitwise the same when the batch is cut where nano-batches cut it; cuBLAS's are checked too
and reported (not asserted: whether a given cut changes its bits is cuBLAS's business), which is why the mode exists.
"""

from __future__ import annotations

import pytest
import torch

from nanoflow.ops import batch_invariant as bi

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

CUTS = (640, 1000, 1333)  # inside 2,048 rows, not multiples of any tile


def _cut_rows(fn, x: torch.Tensor, cut: int) -> torch.Tensor:
    return torch.cat([fn(x[:cut]), fn(x[cut:])])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("n,k", [(6144, 4096), (4096, 14336)])  # qkv, down
def test_gemm_rows_keep_their_bits_across_cuts(dtype, n, k, record_property):
    g = torch.Generator(device="cuda").manual_seed(n + k)
    x = torch.randn(2048, k, device="cuda", generator=g).to(dtype)
    w = (torch.randn(n, k, device="cuda", generator=g) / k ** 0.5).to(dtype)
    whole = bi.matmul(x, w)
    ref = torch.mm(x.double(), w.double().t())
    err = ((whole.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5)
    cublas = torch.mm(x, w.t())
    cublas_changed = []
    for cut in CUTS:
        assert torch.equal(_cut_rows(lambda a: bi.matmul(a, w), x, cut), whole), f"cut {cut}"
        cublas_changed.append(not torch.equal(_cut_rows(lambda a: torch.mm(a, w.t()), x, cut), cublas))
    assert torch.equal(bi.matmul(x[777:778], w), whole[777:778])  # one row alone
    record_property("cublas_rows_changed_by_cuts", cublas_changed)
    print(f"{dtype} {n}x{k}: max rel err {err:.2e}; cuBLAS bits changed by cuts {CUTS}: {cublas_changed}")


def test_norm_rows_keep_their_bits_across_cuts():
    g = torch.Generator(device="cuda").manual_seed(1)
    h, r = (torch.randn(2048, 4096, device="cuda", generator=g).bfloat16() for _ in range(2))
    w = torch.randn(4096, device="cuda", generator=g).bfloat16()
    out, res = bi.add_rms_norm(h, r, w, 1e-5)
    from nanoflow.ops.norm import add_rms_norm

    ref, ref_res = add_rms_norm(h, r, w, 1e-5)
    assert torch.equal(res, ref_res)
    assert (out.float() - ref.float()).abs().max().item() <= 0.05 * ref.float().abs().max().item()
    for cut in CUTS:
        parts = [bi.add_rms_norm(h[a:b], r[a:b], w, 1e-5) for a, b in ((0, cut), (cut, 2048))]
        assert torch.equal(torch.cat([p[0] for p in parts]), out)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
@pytest.mark.parametrize("ctx,q_len,cut", [(0, 1024, 337), (512, 1024, 700)])
def test_prefill_rows_keep_their_bits_when_a_chunk_is_cut(kv_dtype, ctx, q_len, cut):
    from nanoflow.ops.attention.prefill import prefill_attention

    g = torch.Generator(device="cuda").manual_seed(ctx + cut)
    heads, hkv, d, page = 32, 8, 128, 16
    pages = (ctx + q_len) // page + 1
    k = torch.randn(pages + 1, page, hkv, d, device="cuda", generator=g).to(kv_dtype)
    v = torch.randn(pages + 1, page, hkv, d, device="cuda", generator=g).to(kv_dtype)
    table = (torch.randperm(pages, device="cuda", generator=g) + 1).to(torch.int32)
    q = torch.randn(q_len, heads, d, device="cuda", generator=g).bfloat16()
    i32 = dict(dtype=torch.int32, device="cuda")

    def run(starts, lens, ctxs):
        out = torch.empty_like(q)
        prefill_attention(q, k, v, out, torch.tensor(starts, **i32), torch.tensor(lens, **i32),
                          torch.tensor(ctxs, **i32), table[None].expand(len(lens), -1).contiguous(),
                          d ** -0.5, max(lens), batch_invariant=True)
        return out

    whole = run([0], [q_len], [ctx])
    assert torch.equal(run([0, cut], [cut, q_len - cut], [ctx, ctx + cut]), whole)


@pytest.mark.parametrize("kv_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_decode_rows_keep_their_bits_on_every_grid(kv_dtype):
    from nanoflow.graphs.forward_batch import DecodeMeta
    from nanoflow.ops.attention.backends import TritonAttention

    g = torch.Generator(device="cuda").manual_seed(7)
    heads, hkv, d, page, rows = 32, 8, 128, 16, 300
    lens = torch.randint(1, 1500, (rows,), device="cuda", generator=g).to(torch.int32)
    max_pages = 1500 // page + 1
    k = torch.randn(rows * max_pages + 1, page, hkv, d, device="cuda", generator=g).to(kv_dtype)
    v = torch.randn(rows * max_pages + 1, page, hkv, d, device="cuda", generator=g).to(kv_dtype)
    tables = (torch.randperm(rows * max_pages, device="cuda", generator=g) + 1).to(torch.int32).view(rows, -1)
    q = torch.randn(rows, heads, d, device="cuda", generator=g).bfloat16()
    att = TritonAttention(d ** -0.5, page, batch_invariant=True)
    outs = []
    for lo, hi, programs in ((0, rows, None), (0, rows, 264), (0, 123, 100), (123, rows, None)):
        meta = DecodeMeta(rows=hi - lo, block_tables=tables[lo:hi], seq_lens=lens[lo:hi], max_programs=programs)
        out = torch.empty_like(q[lo:hi])
        att.decode(q[lo:hi], k, v, meta, out)
        outs.append((lo, hi, out))
    whole = outs[0][2]
    for lo, hi, out in outs[1:]:
        assert torch.equal(out, whole[lo:hi]), (lo, hi)


def _engine_tokens(folder: str, batch_invariant: bool, groups: list[list[list[int]]]) -> list[list[list[int]]]:
    """Greedy tokens of each group of prompts, the groups run one after another on one engine."""
    from nanoflow import LLM, SamplingParams

    llm = LLM(folder, load_format="dummy", dtype="bfloat16", device="cuda", dense_batch_size=2048,
              kv_cache_tokens=200_000, batch_invariant=batch_invariant)
    try:
        params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
        return [[o.token_ids for o in llm.generate(g, params, use_tqdm=False)] for g in groups]
    finally:
        llm.shutdown()


def test_engine_request_alone_gets_the_tokens_it_gets_in_a_batch(tmp_path):
    """A 4-layer model of LLaMA-3-8B's shapes with random weights (nearly tied logits): 96 requests of 100-1,500
    prompt tokens together (chunked prefill, mixed decode and prefill batches), then four of them alone. In
    batch-invariant mode each gets the same tokens alone and in the batch; the default kernels' count is printed."""
    import json

    from nanoflow.config import builtin_config_path

    cfg = json.loads(builtin_config_path("llama-3-8b").read_text())
    cfg["num_hidden_layers"] = 4
    folder = tmp_path / "llama-3-8b-4l"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, 128_000, (int(n),), generator=g).tolist()
               for n in torch.randint(100, 1500, (96,), generator=g)]
    picks = [0, 17, 50, 95]
    groups = [prompts] + [[prompts[i]] for i in picks]
    results = {}
    for invariant in (True, False):
        batched, *alone = _engine_tokens(str(folder), invariant, groups)
        results[invariant] = [batched[i] == a[0] for i, a in zip(picks, alone)]
    print(f"alone == batched, batch-invariant: {results[True]}; default kernels: {results[False]}")
    assert all(results[True])
