"""The Triton grouped GEMM under Triton's CPU interpreter, checked against per-expert float64 products.

Each case draws fresh random data and a fresh split of the rows over the experts (zero-row experts, uneven counts,
one expert taking everything, rows past ``offsets[E]``). Output rows the kernel does not own are poisoned with NaN
and must stay NaN. The whole MoE block with the kernel in place is checked against the float64 loop-over-experts
reference too.
"""

from __future__ import annotations

import zlib

from interpreted import fresh_interpreter_test, import_interpreted, interpret_env, is_interpreted  # noqa: F401

(gg,) = import_interpreted("nanoflow.ops.grouped_gemm")

import pytest  # noqa: E402
import torch  # noqa: E402
from grouped_ref import offsets_of, reference, rel_err  # noqa: E402

from nanoflow.ops import moe  # noqa: E402

IN_PROCESS = is_interpreted(gg._grouped_gemm_kernel, gg.tile_dot)
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported compiled; covered by the subprocess run")
test_whole_file_in_fresh_interpreter = fresh_interpreter_test(__file__, IN_PROCESS)
TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def seeded(*case: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


COUNTS = {
    "uneven_with_empty": [5, 0, 23, 1, 0, 17],
    "one_expert_all": [0, 0, 41, 0],
    "all_full_tiles": [16, 32, 16],
    "single_expert": [37],
    "one_row_each": [1, 1, 1, 1, 1, 1, 1, 1],
}


@in_process
@pytest.mark.parametrize("name", sorted(COUNTS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
def test_grouped_gemm_matches_float64(name: str, dtype: torch.dtype, tma: bool):
    """Both load paths: pointer loads, and TMA descriptors (whose tiles read across expert and tensor ends)."""
    counts = COUNTS[name]
    config = gg.GemmConfig(16, 16, 16, tma=tma)
    gen = seeded(name, dtype)
    e, n, k = len(counts), 40, 56  # N and K are not multiples of the 16-wide interpreter tiles
    routed = sum(counts)
    m = routed + 3  # trailing rows past offsets[E] must be neither read nor written
    x = torch.randn(m, k, generator=gen).to(dtype)
    x[routed:] = float("nan")
    w = torch.randn(e, n, k, generator=gen).to(dtype)
    scale = torch.rand(m, generator=gen) + 0.5
    for row_scale in (None, scale):
        out = torch.full((m, n), float("nan"), dtype=dtype)
        gg.grouped_gemm(x, offsets_of(counts), w, out=out, row_scale=row_scale, config=config)
        ref = reference(x, counts, w, row_scale)
        assert rel_err(out[:routed], ref) < TOL[dtype], (name, dtype, row_scale is not None)
        assert out[routed:].isnan().all()


@in_process
@pytest.mark.parametrize("config", [gg.GemmConfig(16, 32, 32), gg.GemmConfig(32, 16, 16),
                                    gg.GemmConfig(16, 32, 16, tma=True),
                                    gg.GemmConfig(16, 32, 16, tma=True, warp_specialize=True),
                                    # grouped tile order; 6 m-blocks bound in groups of 4 (the last group partial)
                                    gg.GemmConfig(16, 16, 16, group_m=4), gg.GemmConfig(16, 16, 16, group_m=1),
                                    gg.GemmConfig(16, 16, 16, tma=True, group_m=4)])
def test_strided_rows_and_other_tiles(config: gg.GemmConfig):
    """Row strides larger than K (a column slice of a wider buffer) and other tile shapes give the same result."""
    counts = [9, 0, 30, 2]
    gen = seeded("strided", config)
    e, n, k = len(counts), 24, 48
    wide = torch.randn(sum(counts), k + 8, generator=gen)
    x = wide[:, 4:4 + k]
    w = torch.randn(e, n, k, generator=gen)
    out_wide = torch.full((sum(counts), n + 5), float("nan"))
    out = out_wide[:, :n]
    gg.grouped_gemm(x, offsets_of(counts), w, out=out, config=config)
    assert rel_err(out, reference(x, counts, w, None)) < 1e-3
    assert out_wide[:, n:].isnan().all()


@in_process
def test_random_splits():
    """Fresh random splits (many experts, most rows on a few) against the reference."""
    for trial in range(3):
        gen = seeded("random", trial)
        e = int(torch.randint(2, 9, (1,), generator=gen))
        probs = torch.rand(e, generator=gen) ** 3
        ids = torch.multinomial(probs, int(torch.randint(1, 70, (1,), generator=gen)), True, generator=gen)
        counts = torch.bincount(ids, minlength=e).tolist()
        x = torch.randn(sum(counts), 32, generator=gen)
        w = torch.randn(e, 20, 32, generator=gen)
        out = gg.grouped_gemm(x, offsets_of(counts), w)
        assert rel_err(out, reference(x, counts, w, None)) < 1e-3, counts


@in_process
def test_moe_block_with_kernel_matches_float64(monkeypatch: pytest.MonkeyPatch):
    """route -> sort -> grouped GEMMs (this kernel) -> combine equals the float64 loop-over-experts block."""
    gen = seeded("moe-block")
    t, h, inter, e, top_k = 29, 32, 48, 6, 2
    x = torch.randn(t, h, generator=gen)
    router = torch.randn(e, h, generator=gen)
    w13 = torch.randn(e, 2 * inter, h, generator=gen) / h**0.5
    w2 = torch.randn(e, h, inter, generator=gen) / inter**0.5
    monkeypatch.setattr(moe, "grouped_mm", lambda a, off, b, out, row_scale=None, backend=None: gg.grouped_gemm(
        a, off, b, out=out, row_scale=row_scale))
    weights, experts = moe.route(x @ router.t(), top_k)
    scratch = moe.MoEScratch(torch.empty(t * top_k, h), torch.empty(t * top_k, 2 * inter),
                             torch.empty(t * top_k, inter), torch.empty(t * top_k, h))
    out = moe.experts_forward(x, weights, experts, w13, w2, torch.empty(t, h), scratch)
    ref = moe.moe_reference(x, router, w13, w2, top_k, dtype=torch.float64)
    assert rel_err(out, ref) < 1e-3


@in_process
def test_wrapper_rejects_bad_inputs():
    x, w = torch.randn(8, 16), torch.randn(2, 12, 16)
    off = offsets_of([3, 5])
    with pytest.raises(gg.GroupedGemmError, match="int32"):
        gg.grouped_gemm(x, off.long(), w)
    with pytest.raises(gg.GroupedGemmError, match="same K"):
        gg.grouped_gemm(x, off, torch.randn(2, 12, 8))
    with pytest.raises(gg.GroupedGemmError, match="share one of"):
        gg.grouped_gemm(x, off, w.half())
    with pytest.raises(gg.GroupedGemmError, match="out must be"):
        gg.grouped_gemm(x, off, w, out=torch.empty(8, 13))
    with pytest.raises(gg.GroupedGemmError, match="unit stride"):
        gg.grouped_gemm(torch.randn(16, 8).t(), off, torch.randn(2, 12, 16))
    with pytest.raises(gg.GroupedGemmError, match="row_scale"):
        gg.grouped_gemm(x, off, w, row_scale=torch.ones(8, dtype=torch.float64))
    tma = gg.GemmConfig(16, 16, 16, tma=True)
    with pytest.raises(gg.GroupedGemmError, match="multiples of 16 bytes"):
        gg.grouped_gemm(torch.randn(8, 19)[:, :16], off, w, config=tma)
    with pytest.raises(gg.GroupedGemmError, match="no gap"):
        gg.grouped_gemm(x, off, torch.randn(2, 16, 16)[:, :12], config=tma)
    with pytest.raises(gg.GroupedGemmError, match="warp_specialize needs"):
        gg.grouped_gemm(x, off, w, config=gg.GemmConfig(16, 16, 16, tma=False, warp_specialize=True))
    with pytest.raises(gg.GroupedGemmError, match="16-byte boundary"):
        gg.grouped_gemm(torch.randn(8 * 16 + 1)[1:].view(8, 16), off, w, config=tma)
    with pytest.raises(gg.GroupedGemmError, match="group_m must be >= 0"):
        gg.grouped_gemm(x, off, w, config=gg.GemmConfig(16, 16, 16, group_m=-1))


def test_tile_bound_covers_every_split():
    """max_m_tiles bounds sum_e cdiv(count_e, block_m) for every split of m rows (checked exhaustively, small m)."""
    import itertools

    for m in range(0, 9):
        for e in range(1, 4):
            for split in itertools.product(range(m + 1), repeat=e):
                if sum(split) == m:
                    for bm in (1, 2, 3, 4, 16):
                        assert sum(-(-c // bm) for c in split) <= gg.max_m_tiles(m, e, bm)
