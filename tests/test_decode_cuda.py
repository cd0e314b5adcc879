"""The hand-written CUDA decode kernel (``variant="cuda"``): its input checks everywhere, its results on a GPU.

The GPU cases run where CUDA is present (the lent machine: ``python -m pytest tests/test_decode_cuda.py``); they
scatter each row over shuffled pages, poison what the kernel must not read (page 0, the tail of each last page) or
write (rows of length 0) with NaN, and compare with the float64 oracle.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

from nanoflow.ops.attention import decode_cuda as dc
from nanoflow.ops.attention.decode import decode_attention
from nanoflow.ops.attention.reference import AttentionInputError, decode_attention_ref
from nanoflow.ops.attention.split_kv import decode_workspace
from nanoflow.ops.kv_store import FP8

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the kernel is CUDA C++)")


def _case(lengths, group, kv_heads, page, seed, device="cuda", q_slice=False):
    gen = torch.Generator().manual_seed(seed)
    d = 128
    pages = [math.ceil(n / page) for n in lengths]
    blocks = 1 + sum(pages) + 2
    k = torch.randn(blocks, page, kv_heads, d, generator=gen)
    v = torch.randn(blocks, page, kv_heads, d, generator=gen)
    perm = (torch.randperm(blocks - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(lengths), max(pages) + 1, dtype=torch.int32)
    for row, (n, count) in enumerate(zip(lengths, pages, strict=True)):
        ids = [perm.pop() for _ in range(count)]
        table[row, :count] = torch.tensor(ids, dtype=torch.int32)
        if count and n % page:  # never read: the kernel must not let these reach the output
            k[ids[-1], n % page:] = float("nan")
            v[ids[-1], n % page:] = float("nan")
    k[0] = v[0] = float("nan")
    heads = group * kv_heads
    if q_slice:  # q and out as column slices of wider buffers (a fused QKV row, say)
        q = torch.randn(len(lengths), heads + 2 * kv_heads, d, generator=gen)[:, :heads]
        out = torch.full((len(lengths), heads + 3, d), float("nan"))[:, 1:heads + 1]
    else:
        q = torch.randn(len(lengths), heads, d, generator=gen)
        out = torch.full((len(lengths), heads, d), float("nan"))
    lens = torch.tensor(lengths, dtype=torch.int32)
    to = dict(device=device)
    return (q.to(torch.bfloat16).to(**to), k.to(FP8).to(**to), v.to(FP8).to(**to), table.to(**to), lens.to(**to),
            out.to(torch.bfloat16).to(**to))


CASES = [
    # lengths, group, kv_heads, page, num_splits, max_programs, q_slice, num_stages
    ([0, 1, 15, 16, 17, 100, 513, 1030], 4, 8, 16, 1, None, False, None),
    ([3000, 1, 47, 600], 4, 2, 16, 1, None, True, 2),  # > 32 pages: the page ids are reloaded mid-row
    ([3000, 33, 700, 0, 64], 8, 2, 32, 3, None, False, 8),
    ([5, 250, 1000], 1, 4, 64, 1, 5, True, 3),  # a bounded grid: warps loop over the items
    ([129, 2048, 16, 31], 3, 4, 16, 2, 7, False, 6),
    ([1, 2, 3], 6, 1, 16, 16, None, False, 4),  # more splits than tiles
]


@gpu
@pytest.mark.parametrize("lengths,group,kv_heads,page,num_splits,max_programs,q_slice,num_stages", CASES)
def test_cuda_decode_matches_reference(lengths, group, kv_heads, page, num_splits, max_programs, q_slice,
                                       num_stages):
    q, k, v, table, lens, out = _case(lengths, group, kv_heads, page, zlib.crc32(repr(lengths).encode()),
                                      q_slice=q_slice)
    ws = decode_workspace(len(lengths), q.shape[1], 128, num_splits, q.device) if num_splits > 1 else None
    decode_attention(q, k, v, table, lens, out, 128**-0.5, num_splits=num_splits, workspace=ws,
                     max_programs=max_programs, num_stages=num_stages, variant="cuda")
    ref = decode_attention_ref(q, k.to(torch.bfloat16), v.to(torch.bfloat16), table, lens, 128**-0.5)
    owned = lens.cpu() > 0
    got = out.double().cpu()
    assert not got[owned].isnan().any(), "an owned row was not (fully) written"
    torch.testing.assert_close(got[owned], ref.cpu()[owned], atol=2e-2, rtol=2e-2)
    assert got[~owned].isnan().all(), "a row of length 0 was written"


@gpu
@pytest.mark.parametrize("kv_evict", ["", "evict_last"])
def test_cuda_decode_l2_hints_keep_results(kv_evict):
    q, k, v, table, lens, out = _case([300, 17], 4, 2, 16, 11)
    decode_attention(q, k, v, table, lens, out, 0.1, kv_evict=kv_evict, variant="cuda")
    ref = decode_attention_ref(q, k.to(torch.bfloat16), v.to(torch.bfloat16), table, lens, 0.1)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


@gpu
def test_cuda_decode_is_captured_by_cuda_graphs():
    q, k, v, table, lens, out = _case([40, 700, 1], 4, 2, 16, 7)
    ws = decode_workspace(3, q.shape[1], 128, 2, q.device)
    graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        decode_attention(q, k, v, table, lens, out, 0.1, num_splits=2, workspace=ws, variant="cuda")  # builds
        with torch.cuda.graph(graph, stream=stream):
            decode_attention(q, k, v, table, lens, out, 0.1, num_splits=2, workspace=ws, variant="cuda")
    q.copy_(torch.randn_like(q))
    lens.copy_(torch.tensor([33, 650, 1], dtype=torch.int32))  # within each row's pages
    graph.replay()
    torch.cuda.synchronize()
    ref = decode_attention_ref(q, k.to(torch.bfloat16), v.to(torch.bfloat16), table, lens, 0.1)
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=2e-2)


def test_cuda_decode_rejects_what_it_cannot_run():
    q, k, v, table, lens, out = _case([20, 5], 4, 2, 16, 1, device="cpu")
    with pytest.raises(AttentionInputError, match="CUDA devices only"):
        decode_attention(q, k, v, table, lens, out, 0.1, variant="cuda")
    with pytest.raises(AttentionInputError, match="fixed tile"):
        decode_attention(q, k, v, table, lens, out, 0.1, variant="cuda", block_n=32)
    with pytest.raises(AttentionInputError, match="num_stages in"):
        dc.decode_cuda(_on_cuda(q), k, v, table, lens, out, 0.1, 1, None, None, 16, 4, num_stages=5)
    # The scope checks, on CPU tensors dressed as what each check reads.
    check = dc.check_cuda_inputs
    with pytest.raises(AttentionInputError, match="float8"):
        check(_on_cuda(q), k.to(torch.bfloat16), v, out, 16, 4)
    with pytest.raises(AttentionInputError, match="multiple of 16"):
        check(_on_cuda(q), k, v, out, 8, 4)
    with pytest.raises(AttentionInputError, match="at most 8"):
        check(_on_cuda(q), k, v, out, 16, 16)
    with pytest.raises(AttentionInputError, match="bfloat16 query"):
        check(_on_cuda(q.float()), k, v, out, 16, 4)


class _FakeCuda(torch.Tensor):
    """A CPU tensor whose ``device`` reads as CUDA: lets the scope checks after the device check run on a CPU."""

    @property
    def device(self):  # noqa: D102
        return torch.device("cuda", 0)


def _on_cuda(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(_FakeCuda)


def test_find_nvcc_says_what_to_install(monkeypatch):
    monkeypatch.delenv("NANOFLOW_NVCC", raising=False)
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.setattr(dc.shutil, "which", lambda name: None)
    monkeypatch.setattr(dc.os.path, "isfile", lambda path: False)
    with pytest.raises(AttentionInputError, match="CUDA toolkit"):
        dc.find_nvcc()


def test_build_command_targets_the_gpu_architecture():
    cmd = dc.build_command("/x/nvcc", "90", "/tmp/lib.so")
    assert cmd[0] == "/x/nvcc" and "-gencode=arch=compute_90,code=sm_90" in cmd and cmd[-1] == str(dc.SOURCE)
    assert dc.SOURCE.exists()


def test_auto_variant_picks_cuda_only_where_it_applies(monkeypatch):
    """``decode_variant="auto"``: the CUDA kernel for a float8 cache it can serve and build, else the split kernel."""
    from nanoflow.ops.attention.backends import resolve_decode_variant

    built = []
    monkeypatch.setattr(dc, "load_library", lambda device: built.append(device))
    fp8 = _on_cuda(torch.zeros(4, 16, 2, 128, dtype=dc.FP8))
    assert resolve_decode_variant("auto", fp8, fp8, 16, 16) == "cuda" and len(built) == 1
    assert resolve_decode_variant("split", fp8, fp8, 16, 16) == "split"  # a named variant stays
    assert resolve_decode_variant("auto", fp8, fp8, 16, 16, {"block_n": 64}) == "split"  # Triton tiles asked for
    bf16 = _on_cuda(torch.zeros(4, 16, 2, 128, dtype=torch.bfloat16))
    assert resolve_decode_variant("auto", bf16, bf16, 16, 16) == "split"  # not a float8 cache
    assert resolve_decode_variant("auto", fp8, fp8, 32, 16) == "split"  # 16 query heads per kv head
    assert resolve_decode_variant("auto", fp8, fp8, 16, 8) == "split"  # pages of 8 tokens
    assert resolve_decode_variant("auto", fp8, fp8, 16, 16, q_dtype=torch.float16) == "split"  # a float16 model
    assert resolve_decode_variant("auto", fp8, fp8, 16, 16, {"num_stages": 5}) == "split"  # no such ring depth
    assert resolve_decode_variant("auto", fp8, fp8, 16, 16, {"num_stages": 6}) == "cuda"
    assert len(built) == 2
    cpu = torch.zeros(4, 16, 2, 128, dtype=dc.FP8)
    assert resolve_decode_variant("auto", cpu, cpu, 16, 16) == "split"
    assert len(built) == 2

    def no_nvcc(device):
        raise AttentionInputError("nvcc was not found")

    monkeypatch.setattr(dc, "load_library", no_nvcc)
    assert resolve_decode_variant("auto", fp8, fp8, 16, 16) == "split"
