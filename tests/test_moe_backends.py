"""The grouped GEMM's backends (``nanoflow.ops.moe.grouped_mm``): ``torch`` (``torch._grouped_mm``) against
per-expert float64 products, ``auto``'s pick and its cache, and the names users can give.

The GPU tests (skipped without CUDA) also capture both backends in a CUDA graph and replay it on a new routing.
"""

from __future__ import annotations

import pytest
import torch
from grouped_ref import offsets_of, reference, rel_err

from nanoflow.config import ConfigError, EngineArgs
from nanoflow.ops import moe

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
has_grouped_mm = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")


def inputs(counts: list[int], n: int, k: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    m = sum(counts)
    x = torch.randn(m, k, generator=gen).to(dtype).to(device)
    w = (torch.randn(len(counts), n, k, generator=gen) / k**0.5).to(dtype).to(device)
    scale = torch.rand(m, generator=gen).to(device)
    return x, w, scale


@pytest.fixture(autouse=True)
def _fresh_choices(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(moe, "_choices", {})


@has_grouped_mm
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("counts", [[5, 0, 23, 1, 0, 17], [0, 0, 41, 0], [16, 32, 16]])
def test_torch_backend_matches_float64(counts: list[int], dtype: torch.dtype, tol: float):
    x, w, scale = inputs(counts, 24, 32, dtype)
    off = offsets_of(counts)
    for s in (None, scale):
        got = moe.grouped_mm(x, off, w, out=torch.full((x.shape[0], 24), float("nan"), dtype=dtype), row_scale=s,
                             backend="torch")
        assert got.dtype == dtype and got.shape == (x.shape[0], 24)
        assert rel_err(got, reference(x, counts, w, s)) < tol


@has_grouped_mm
def test_experts_forward_with_torch_backend_matches_moe_reference():
    gen = torch.Generator().manual_seed(3)
    t, h, inter, e, top_k = 29, 32, 48, 6, 2
    x = torch.randn(t, h, generator=gen)
    router = torch.randn(e, h, generator=gen)
    w13 = torch.randn(e, 2 * inter, h, generator=gen) / h**0.5
    w2 = torch.randn(e, h, inter, generator=gen) / inter**0.5
    weights, experts = moe.route(x @ router.t(), top_k)
    rows = t * top_k
    # The torch backend leaves the two GEMM scratch views alone: poison them, the result must not read them.
    scratch = moe.MoEScratch(torch.empty(rows, h), torch.full((rows, 2 * inter), float("nan")),
                             torch.empty(rows, inter), torch.full((rows, h), float("nan")))
    out = moe.experts_forward(x, weights, experts, w13, w2, torch.empty(t, h), scratch, backend="torch")
    assert rel_err(out, moe.moe_reference(x, router, w13, w2, top_k, dtype=torch.float64)) < 1e-5


def _backend_of(fn) -> str:
    """Which backend a timed closure of ``_auto_backend`` runs."""
    return "torch" if "grouped_mm_torch" in fn.__code__.co_names else "triton"


@has_grouped_mm
def test_auto_times_each_shape_once_and_keeps_the_faster(monkeypatch: pytest.MonkeyPatch):
    x, w, _ = inputs([8, 8, 8, 8], 16, 32, torch.float32)
    calls: list[str] = []

    def fake_time(fn, reps: int = 5) -> float:
        calls.append(_backend_of(fn))
        return {"torch": 1.0, "triton": 2.0}[calls[-1]]

    monkeypatch.setattr(moe, "_time_ms", fake_time)
    monkeypatch.setattr("nanoflow.ops.grouped_gemm.grouped_gemm", lambda *a, **k: None)  # no Triton on a CPU
    assert moe._auto_backend(x, w, False) == "torch"
    assert calls == ["torch", "triton", "triton", "torch", "torch", "triton"]  # 3 rounds, alternating order
    assert moe._auto_backend(x, w, False) == "torch"  # cached: not timed again
    assert moe._auto_backend(x[:30], w, False) == "torch"  # 30 rows fall in the same 256-row bucket
    assert len(calls) == 6
    assert moe._auto_backend(x, w, True) == "torch"  # the row-scaled GEMM is its own shape
    assert len(calls) == 12
    picks = moe.grouped_mm_choices()
    assert [(p["rows"], p["n"], p["k"], p["experts"], p["row_scale"], p["backend"]) for p in picks] == [
        (256, 16, 32, 4, False, "torch"), (256, 16, 32, 4, True, "torch")]
    assert picks[0]["ms"] == {"torch": 1.0, "triton": 2.0}


def test_auto_falls_back_to_triton_when_torch_cannot_run(monkeypatch: pytest.MonkeyPatch):
    x, w, _ = inputs([4, 4], 16, 32, torch.float32)

    def no_grouped_mm(*args, **kwargs):
        raise RuntimeError("grouped gemm is not supported for this dtype")

    monkeypatch.setattr(torch, "_grouped_mm", no_grouped_mm)
    monkeypatch.setattr("nanoflow.ops.grouped_gemm.grouped_gemm", lambda *a, **k: None)
    timed: list[str] = []
    monkeypatch.setattr(moe, "_time_ms", lambda fn, reps=5: timed.append(_backend_of(fn)) or 5.0)
    assert moe._auto_backend(x, w, False) == "triton"
    assert set(timed) == {"triton"}
    assert moe.grouped_mm_choices()[0]["ms"] == {"torch": None, "triton": 5.0}


def test_auto_times_a_routing_like_split_not_an_even_one():
    """``typical_offsets`` against a sampled random top-2 routing: the same total, sorted counts, and a spread like
    the sampled one (an even split would put every expert exactly on a tile boundary)."""
    gen = torch.Generator().manual_seed(0)
    tokens, experts, top_k = 2048, 8, 2
    sampled = []
    for _ in range(200):  # each token picks top_k distinct experts uniformly, as a random router does
        picks = torch.rand(tokens, experts, generator=gen).topk(top_k, dim=1).indices
        sampled.append(torch.bincount(picks.flatten(), minlength=experts).sort().values.float())
    mean_sorted = torch.stack(sampled).mean(0)
    offsets = moe.typical_offsets(tokens * top_k, experts)
    counts = torch.tensor([b - a for a, b in zip(offsets, offsets[1:])], dtype=torch.float32)
    assert offsets[0] == 0 and offsets[-1] == tokens * top_k and counts.tolist() == sorted(counts.tolist())
    assert (counts - mean_sorted).abs().max() < 10  # within 10 rows of the sampled order statistics (spread ~20)
    assert counts.max() > 512  # some expert over the 512-row boundary, as in a real step of 2,048 tokens
    for rows, e in ((0, 8), (5, 8), (7, 8), (1, 1), (100, 3)):
        o = moe.typical_offsets(rows, e)
        assert len(o) == e + 1 and o[0] == 0 and o[-1] == rows and all(b >= a for a, b in zip(o, o[1:]))
    with pytest.raises(moe.MoEInputError, match="rows >= 0"):
        moe.typical_offsets(-1, 8)


def test_backend_names_are_checked_where_they_enter():
    x, w, _ = inputs([4], 8, 16, torch.float32)
    with pytest.raises(moe.MoEInputError, match="auto, triton, torch"):
        moe.grouped_mm(x, offsets_of([4]), w, out=torch.empty(4, 8), backend="cutlass")
    with pytest.raises(moe.MoEInputError, match="auto, triton, torch"):
        moe.resolve_backend(x, w, False, backend="fast")
    with pytest.raises(ConfigError, match="moe_backend 'fast'"):
        EngineArgs(model="mixtral-8x7b", extra={"moe_backend": "fast"})
    with pytest.raises(ConfigError, match="decode_variant 'flash'.*auto, split"):
        EngineArgs(model="mixtral-8x7b", extra={"decode_variant": "flash"})


@cuda
@pytest.mark.parametrize("backend", ["torch", "triton", "auto"])
def test_backends_on_gpu_match_float64_and_replay_in_a_cuda_graph(backend: str):
    n, k = 256, 512
    counts = [300, 0, 17, 191, 0, 4, 0, 0]
    x, w, scale = inputs(counts, n, k, torch.bfloat16, "cuda")
    off = offsets_of(counts, "cuda")
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device="cuda")
    got = moe.grouped_mm(x, off, w, out=out, row_scale=scale, backend=backend)  # eager (auto times here)
    assert rel_err(got, reference(x, counts, w, scale)) < 1e-2
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = moe.grouped_mm(x, off, w, out=out, row_scale=scale, backend=backend)
    new = [0, 100, 0, 0, 412, 0, 0, 0]  # a new routing with the same rows, written into the captured inputs
    x2, _, scale2 = inputs(new, n, k, torch.bfloat16, "cuda", seed=1)
    x.copy_(x2)
    scale.copy_(scale2)
    off.copy_(offsets_of(new, "cuda"))
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(captured, reference(x2, new, w, scale2)) < 1e-2
    if backend == "auto":
        assert moe.grouped_mm_choices()[0]["backend"] in ("torch", "triton")


def test_bench_flag_takes_a_list_of_backends():
    import argparse

    from nanoflow.bench.cli import moe_backends

    assert moe_backends("triton, auto,triton") == ["triton", "auto"]
    with pytest.raises(argparse.ArgumentTypeError, match="auto, triton, torch"):
        moe_backends("triton,cublas")


@cuda
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_experts_forward_on_gpu_matches_float64(backend: str):
    """The routed experts on the GPU, the routing weights applied in the down GEMM (triton) or the combine (torch),
    against float64 products over the same routing."""
    gen = torch.Generator().manual_seed(7)
    t, h, inter, e, top_k = 300, 256, 512, 8, 2
    x = torch.randn(t, h, generator=gen).bfloat16().cuda()
    router = torch.randn(e, h, generator=gen).bfloat16().cuda()
    w13 = (torch.randn(e, 2 * inter, h, generator=gen) / h**0.5).bfloat16().cuda()
    w2 = (torch.randn(e, h, inter, generator=gen) / inter**0.5).bfloat16().cuda()
    weights, experts = moe.route((x @ router.t()).float(), top_k)
    rows = t * top_k
    scratch = moe.MoEScratch(*(torch.empty(rows, width, dtype=torch.bfloat16, device="cuda")
                               for width in (h, 2 * inter, inter, h)))
    out = moe.experts_forward(x, weights, experts, w13, w2, torch.empty_like(x), scratch, backend=backend)
    # float64 over the same routing (a reference that routes itself could flip near-tied choices)
    xd, ref = x.double().cpu(), torch.zeros(t, h, dtype=torch.float64)
    for ex in range(e):
        token, choice = torch.nonzero(experts.cpu() == ex, as_tuple=True)
        g = xd[token] @ w13[ex].double().cpu().t()
        y = (torch.nn.functional.silu(g[:, :inter]) * g[:, inter:]) @ w2[ex].double().cpu().t()
        ref.index_add_(0, token, y * weights.cpu()[token, choice, None].double())
    assert rel_err(out.cpu(), ref) < 2e-2


def test_torch_backend_without_grouped_mm_says_what_to_use(monkeypatch: pytest.MonkeyPatch):
    x, w, _ = inputs([4], 8, 16, torch.float32)
    monkeypatch.delattr(torch, "_grouped_mm")
    with pytest.raises(moe.MoEInputError, match="triton or auto"):
        moe.grouped_mm(x, offsets_of([4]), w, out=torch.empty(4, 8), backend="torch")
    monkeypatch.setattr(moe, "_time_ms", lambda fn, reps=5: 1.0)
    monkeypatch.setattr("nanoflow.ops.grouped_gemm.grouped_gemm", lambda *a, **k: None)
    assert moe._auto_backend(x, w, False) == "triton"
