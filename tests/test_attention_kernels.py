"""Paged attention kernels under Triton's CPU interpreter, checked against float64 references.

Every case draws fresh random data, scatters each sequence over shuffled (non-contiguous) pages, poisons with NaN
everything a kernel must not read (the null page 0, the unused tail of each last page) and everything it must not
write (output rows of skipped rows/segments and rows outside the sliced views), then checks that owned rows match the
reference and all other rows are still NaN. The reference itself is checked against torch SDPA once.
"""

from __future__ import annotations

import math
import zlib

from interpreted import fresh_interpreter_test, import_interpreted, interpret_env, is_interpreted  # noqa: F401

decode_mod, prefill_mod, split_mod, softmax_mod, tile_mod = import_interpreted(
    "nanoflow.ops.attention.decode", "nanoflow.ops.attention.prefill", "nanoflow.ops.attention.split_kv",
    "nanoflow.ops.attention.online_softmax", "nanoflow.ops.tile_dot")

import pytest  # noqa: E402
import torch  # noqa: E402

from nanoflow.ops.attention.reference import (  # noqa: E402
    AttentionInputError,
    decode_attention_ref,
    prefill_attention_ref,
)

IN_PROCESS = is_interpreted(decode_mod._decode_split_kernel, prefill_mod._prefill_kernel,
                            split_mod._decode_reduce_kernel, softmax_mod.attend_tile, tile_mod.tile_dot)
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported compiled; covered by the subprocess run")
test_whole_file_in_fresh_interpreter = fresh_interpreter_test(__file__, IN_PROCESS)

decode_attention = decode_mod.decode_attention
decode_workspace = split_mod.decode_workspace
prefill_attention = prefill_mod.prefill_attention


TOL = {torch.float32: 1e-3, torch.bfloat16: 2e-2, torch.float16: 5e-3}


def seeded(*case: object) -> torch.Generator:
    """A generator seeded from the test case, so each case draws different (but reproducible) data."""
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def paged_kv(lengths: list[int], block_size: int, hkv: int, d: int, dtype: torch.dtype, gen: torch.Generator,
             kv_dtype: torch.dtype | None = None):
    """Random K/V pages (stored as ``kv_dtype``, default ``dtype``); row r's tokens live on shuffled pages of
    ``table[r]``. Unread memory is NaN."""
    pages = [math.ceil(n / block_size) for n in lengths]
    num_blocks = 1 + sum(pages) + 2
    k = torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype)
    v = torch.randn(num_blocks, block_size, hkv, d, generator=gen).to(dtype)
    perm = (torch.randperm(num_blocks - 1, generator=gen) + 1).tolist()
    table = torch.zeros(len(lengths), max(pages, default=0) + 1, dtype=torch.int32)
    for row, (n, count) in enumerate(zip(lengths, pages, strict=True)):
        ids = [perm.pop() for _ in range(count)]
        table[row, :count] = torch.tensor(ids, dtype=torch.int32)
        if count and n % block_size:
            k[ids[-1], n % block_size :] = float("nan")
            v[ids[-1], n % block_size :] = float("nan")
    k[0] = float("nan")
    v[0] = float("nan")
    if kv_dtype is not None:
        k, v = k.to(kv_dtype), v.to(kv_dtype)
    return k, v, table


def assert_rows(out: torch.Tensor, ref: torch.Tensor, owned: list[int], dtype: torch.dtype) -> None:
    """Owned rows match the reference; every other row is still the NaN poison."""
    mask = torch.zeros(out.shape[0], dtype=torch.bool)
    mask[owned] = True
    got = out[mask].double()
    assert not got.isnan().any(), "an owned row was not (fully) written"
    torch.testing.assert_close(got, ref[mask], atol=TOL[dtype], rtol=TOL[dtype])
    assert out[~mask].isnan().all(), "a row the kernel does not own was written"


# ---- decode --------------------------------------------------------------------------------------------------------

DECODE_CASES = [
    # gqa, head_dim, block_size, num_splits, block_n, dtype
    (1, 64, 16, 1, None, torch.float32),
    (4, 128, 16, 3, None, torch.float32),
    (8, 64, 32, 2, None, torch.float32),
    (4, 64, 16, 8, None, torch.bfloat16),  # more splits than most rows have tiles
    (8, 128, 16, 1, 64, torch.float16),  # the GPU tile size
    (2, 64, 8, None, 32, torch.float32),  # default num_splits; block_n spans 4 pages of 8
]


@pytest.mark.parametrize("gqa,head_dim,block_size,num_splits,block_n,dtype", DECODE_CASES)
@in_process
def test_decode_matches_reference(gqa, head_dim, block_size, num_splits, block_n, dtype):
    gen = seeded(gqa, head_dim, block_size, num_splits, block_n, dtype)
    check_decode([37, 0, 1, block_size, 100, 65], 2, gqa, head_dim, block_size, dtype, gen,
                 num_splits=num_splits, block_n=block_n)


def check_decode(lengths, hkv, gqa, head_dim, block_size, dtype, gen, kv_dtype=None, **kw):
    """Run decode_attention(**kw) on paged rows of ``lengths`` and compare with the float64 reference.

    q is the q-columns of a fused ``[N, (Hq + 2 Hkv) * D]`` QKV buffer and out a row slice of a NaN-filled bigger
    buffer, so strides are exercised and rows of length 0 must stay untouched."""
    hq = hkv * gqa
    k, v, table = paged_kv(lengths, block_size, hkv, head_dim, dtype, gen, kv_dtype)
    n = len(lengths)
    qkv = torch.randn(n, (hq + 2 * hkv) * head_dim, generator=gen).to(dtype)
    q = qkv[:, : hq * head_dim].view(n, hq, head_dim)
    out_buf = torch.full((n + 3, hq, head_dim), float("nan"), dtype=dtype)
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    scale = head_dim**-0.5
    decode_attention(q, k, v, table, seq_lens, out_buf[2 : n + 2], scale, **kw)
    ref = torch.full(out_buf.shape, float("nan"), dtype=torch.float64)
    ref[2 : n + 2] = decode_attention_ref(q, k, v, table, seq_lens, scale)
    assert_rows(out_buf, ref, [2 + i for i, length in enumerate(lengths) if length], dtype)


@pytest.mark.parametrize("gqa,head_dim,max_programs", [(1, 64, 1), (4, 64, 3), (8, 128, 5), (4, 128, 64)])
@in_process
def test_decode_persistent_grid_matches_reference(gqa, head_dim, max_programs):
    """The bounded (persistent) grid computes the same attention, whatever the number of programs."""
    gen = seeded("persistent", gqa, head_dim, max_programs)
    hkv, block_size = 2, 16
    hq = hkv * gqa
    lengths = [37, 0, 1, 16, 100, 65]
    k, v, table = paged_kv(lengths, block_size, hkv, head_dim, torch.float32, gen)
    n = len(lengths)
    q = torch.randn(n, hq, head_dim, generator=gen)
    out = torch.full((n, hq, head_dim), float("nan"))
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    decode_attention(q, k, v, table, seq_lens, out, head_dim**-0.5, max_programs=max_programs)
    ref = decode_attention_ref(q, k, v, table, seq_lens, head_dim**-0.5)
    assert_rows(out, ref, [i for i, length in enumerate(lengths) if length], torch.float32)


@pytest.mark.parametrize("kw", [{"num_splits": 1}, {"num_splits": 3, "block_n": 32}, {"num_splits": 8},
                                {"max_programs": 2}, {"max_programs": 64, "block_n": 32}])
@in_process
def test_decode_prefetch_matches_reference(kw):
    """The software-pipelined tile loop (prefetch=True: next tile's loads before this tile's compute) on rows of 0-7
    tiles, splits with fewer tiles than others and persistent grids: the same attention, no write past a row."""
    gen = seeded("prefetch", sorted(kw.items()))
    check_decode([37, 0, 1, 16, 100, 65, 112], 2, 4, 64, 16, torch.float32, gen, prefetch=True, **kw)


def test_decode_prefetch_is_for_the_split_variant():
    q = torch.zeros(1, 2, 64)
    k = v = torch.zeros(2, 16, 2, 64)
    with pytest.raises(AttentionInputError, match="apply to the split variant"):
        decode_attention(q, k, v, torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32),
                         torch.zeros(1, 2, 64), 1.0, variant="row", prefetch=True)


@pytest.mark.parametrize("kw", [{"num_splits": 1}, {"num_splits": 3}, {"max_programs": 3}, {"block_n": 16},
                                {"num_splits": 3, "tma": 2}, {"max_programs": 3, "tma": 2, "num_warps": 4}])
@pytest.mark.parametrize("dtype,kv_dtype", [(torch.float32, None), (torch.bfloat16, None), (torch.float16, None),
                                            (torch.bfloat16, "fp8"), (torch.float32, "fp8")])
@in_process
def test_decode_tma_matches_reference(kw, dtype, kv_dtype):
    """tma=True: pages copied through tensor descriptors, one page per tile. Slots past a row's end hold NaN (bf16 and
    float8 NaN codes alike), so V must be zeroed there, not just the scores masked."""
    gen = seeded("tma", sorted(kw.items()), dtype, kv_dtype)
    check_decode([37, 0, 1, 16, 100, 65], 2, 4, 64, 16, dtype, gen, kv_dtype=FP8 if kv_dtype else None,
                 **{"tma": 1, **kw})


def test_decode_tma_rejects_what_it_cannot_do():
    q, out = torch.zeros(1, 4, 64), torch.zeros(1, 4, 64)
    k = v = torch.zeros(3, 16, 2, 64)
    table, lens = torch.ones(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32)
    with pytest.raises(AttentionInputError, match="block_n must be the page size 16"):
        decode_attention(q, k, v, table, lens, out, 1.0, tma=True, block_n=32)
    with pytest.raises(AttentionInputError, match="needs num_warps"):
        decode_attention(q, k, v, table, lens, out, 1.0, tma=2, num_warps=2)
    with pytest.raises(AttentionInputError, match="pick one"):
        decode_attention(q, k, v, table, lens, out, 1.0, tma=True, prefetch=True)
    with pytest.raises(AttentionInputError, match="apply to the split variant"):
        decode_attention(q, k, v, table, lens, out, 1.0, tma=True, variant="row")
    wide = torch.zeros(3, 16, 2, 80)[..., :64]
    with pytest.raises(AttentionInputError, match="contiguous pages"):
        decode_attention(q, wide, wide, table, lens, out, 1.0, tma=True)


ROW_CASES = [
    # hkv, gqa, head_dim, block_size, block_n, num_splits, max_programs, dtype
    (4, 1, 64, 16, None, 1, None, torch.float32),  # MHA, one page per tile, direct store
    (2, 4, 128, 16, 32, 1, None, torch.bfloat16),  # two pages per tile
    (2, 8, 64, 8, 16, 3, None, torch.float32),  # two pages of 8 per tile, split-KV + reduce
    (2, 4, 64, 32, 16, None, None, torch.bfloat16),  # tile inside a page (block_n < block_size), default splits
    (1, 8, 64, 16, None, None, 1, torch.float32),  # persistent: one program loops over every row
    (2, 1, 64, 16, 32, None, 3, torch.bfloat16),  # persistent MHA, fewer programs than rows
    (2, 8, 128, 16, None, 4, 5, torch.float16),  # persistent ignores num_splits (one split per row)
    (8, 4, 64, 16, None, 2, None, torch.float32),  # LLaMA-3-8B's 8 kv heads
]


@pytest.mark.parametrize("variant", ["row", "row_flat"])
@pytest.mark.parametrize("hkv,gqa,head_dim,block_size,block_n,num_splits,max_programs,dtype", ROW_CASES)
@in_process
def test_decode_row_variant_matches_reference(hkv, gqa, head_dim, block_size, block_n, num_splits, max_programs,
                                              dtype, variant):
    """variant="row"/"row_flat": one program per row over all kv heads (full grid, split-KV or persistent)."""
    gen = seeded(variant, hkv, gqa, head_dim, block_size, block_n, num_splits, max_programs, dtype)
    lengths = [37, 0, 1, block_size, 100, 65, 32, 0, 33]  # crossing pages and tiles; zero rows stay untouched
    check_decode(lengths, hkv, gqa, head_dim, block_size, dtype, gen, num_splits=num_splits, block_n=block_n,
                 max_programs=max_programs, kv_evict="", variant=variant)


PACKED_CASES = [
    # hkv, gqa, head_dim, block_size, head_group, block_n, num_splits, dtype
    (8, 4, 64, 16, None, None, 1, torch.float32),  # LLaMA-3-8B's grouping: 4 kv heads of 4 query heads per program
    (8, 4, 64, 16, 2, 32, 3, torch.bfloat16),  # 8 real rows padded to 16, tiles of two pages, split-KV + reduce
    (2, 8, 128, 16, 1, 16, None, torch.float16),  # one kv head per program (the split kernel's packing)
    (4, 1, 64, 8, 4, 16, 2, torch.float32),  # MHA: 4 heads in 4 rows, pages of 8
]


@pytest.mark.parametrize("hkv,gqa,head_dim,block_size,head_group,block_n,num_splits,dtype", PACKED_CASES)
@in_process
def test_decode_packed_variant_matches_reference(hkv, gqa, head_dim, block_size, head_group, block_n, num_splits,
                                                 dtype):
    """variant="packed": several kv heads per program, their query heads as the rows of block-diagonal dots."""
    gen = seeded("packed", hkv, gqa, head_dim, block_size, head_group, block_n, num_splits, dtype)
    check_decode([37, 0, 1, block_size, 100, 65, 0, 33], hkv, gqa, head_dim, block_size, dtype, gen,
                 num_splits=num_splits, block_n=block_n, head_group=head_group, kv_evict="", variant="packed")


def tiny_decode_inputs(heads: int, kv_heads: int) -> tuple[torch.Tensor, ...]:
    """``(q, k, table, lens, out)`` for the input-error tests: 2 rows of 1 token, head_dim 64, 3 pages of 16."""
    q = torch.randn(2, heads, 64)
    return (q, torch.randn(3, 16, kv_heads, 64), torch.ones(2, 1, dtype=torch.int32),
            torch.ones(2, dtype=torch.int32), torch.empty_like(q))


def test_decode_packed_variant_rejects_bad_inputs():
    q, k, table, lens, out = tiny_decode_inputs(8, 4)
    with pytest.raises(AttentionInputError, match="head_group must be a power of two dividing"):
        decode_attention(q, k, k, table, lens, out, 1.0, variant="packed", head_group=3)
    with pytest.raises(AttentionInputError, match="head_group must be a power of two dividing"):
        decode_attention(q, k, k, table, lens, out, 1.0, variant="packed", head_group=8)
    with pytest.raises(AttentionInputError, match="head_group applies to variant='packed'"):
        decode_attention(q, k, k, table, lens, out, 1.0, head_group=2)
    with pytest.raises(AttentionInputError, match="head_group applies to variant='packed'"):
        decode_attention(q, k, k, table, lens, out, 1.0, head_group=2, variant="row")
    with pytest.raises(AttentionInputError, match="split variant only"):
        decode_attention(q, k, k, table, lens, out, 1.0, variant="packed", max_programs=4)
    with pytest.raises(AttentionInputError, match="maxnreg"):
        decode_attention(q, k, k, table, lens, out, 1.0, maxnreg=8)


@in_process
def test_decode_maxnreg_is_ignored_off_cuda():
    """Off CUDA the register cap is accepted and ignored: the interpreter gives the reference result."""
    check_decode([37, 0, 20], 2, 4, 64, 16, torch.float32, seeded("maxnreg"), maxnreg=128)


def test_decode_row_variant_rejects_bad_inputs():
    q, k, table, lens, _ = tiny_decode_inputs(6, 3)
    with pytest.raises(AttentionInputError, match="power-of-two num_kv_heads"):
        decode_attention(q, k, k, table, lens, torch.empty_like(q), 1.0, variant="row")
    k = torch.randn(3, 16, 2, 64)
    with pytest.raises(AttentionInputError, match="variant"):
        decode_attention(q, k, k, table, lens, torch.empty_like(q), 1.0, variant="rows")
    with pytest.raises(AttentionInputError, match="block_n"):
        decode_attention(q, k, k, table, lens, torch.empty_like(q), 1.0, block_n=24, variant="row")
    with pytest.raises(AttentionInputError, match="max_programs"):
        decode_attention(q, k, k, table, lens, torch.empty_like(q), 1.0, max_programs=0, variant="row")


@pytest.mark.parametrize("variant,max_programs,options", [
    ("row", None, {"block_n": 32}), ("row", 2, {"block_n": 32}), ("row_flat", 2, {"block_n": 32}),
    ("split", None, {"block_n": 32}), ("split", None, {"tma": 1}), ("split", 2, {"tma": 1}),
    ("packed", None, {"head_group": 2})])
@in_process
def test_decode_backend_variant(variant, max_programs, options):
    """TritonAttention(decode_variant=...) runs the chosen kernel with the metadata's max_programs and its options."""
    from types import SimpleNamespace

    from nanoflow.ops.attention.backends import TritonAttention

    gen = seeded("backend", variant, max_programs, sorted(options.items()))
    lengths = [20, 0, 45]
    k, v, table = paged_kv(lengths, 16, 2, 64, torch.float32, gen)
    q = torch.randn(3, 8, 64, generator=gen)
    out = torch.full_like(q, float("nan"))
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    backend = TritonAttention(0.125, 16, decode_variant=variant, decode_options={**options, "kv_evict": ""})
    meta = SimpleNamespace(block_tables=table, seq_lens=seq_lens, num_splits=None, workspace=None,
                           max_programs=max_programs)
    backend.decode(q, k, v, meta, out)
    assert_rows(out, decode_attention_ref(q, k, v, table, seq_lens, 0.125), [0, 2], torch.float32)
    with pytest.raises(ValueError, match="decode_variant"):
        TritonAttention(0.125, 16, decode_variant="rows")
    with pytest.raises(ValueError, match="decode_options"):
        TritonAttention(0.125, 16, decode_options={"max_programs": 3})


@in_process
def test_decode_row_slices_and_preallocated_workspace():
    """Row-sliced q/out views and a workspace bigger than needed (the CUDA-graph setup) give the reference result."""
    gen = torch.Generator().manual_seed(7)
    lengths = [0, 50, 33, 0, 17]
    k, v, table = paged_kv(lengths, 16, 1, 64, torch.float32, gen)
    q_buf = torch.randn(8, 4, 64, generator=gen)
    out_buf = torch.full((8, 4, 64), float("nan"))
    ws = decode_workspace(max_rows=16, num_heads=4, head_dim=64, num_splits=6, device="cpu")
    seq_lens = torch.tensor(lengths, dtype=torch.int32)
    q, out = q_buf[3:8], out_buf[1:6]
    decode_attention(q, k, v, table, seq_lens, out, 0.3, num_splits=4, workspace=ws)
    ref = torch.full(out_buf.shape, float("nan"), dtype=torch.float64)
    ref[1:6] = decode_attention_ref(q, k, v, table, seq_lens, 0.3)
    assert_rows(out_buf, ref, [2, 3, 5], torch.float32)


def test_decode_rejects_bad_inputs():
    q, k, table, lens, out = tiny_decode_inputs(4, 2)
    with pytest.raises(AttentionInputError, match="int32"):
        decode_attention(q, k, k, table, lens.long(), out, 1.0)
    with pytest.raises(AttentionInputError, match="multiple of num_kv_heads"):
        decode_attention(torch.randn(2, 3, 64), k, k, table, lens, torch.empty(2, 3, 64), 1.0)
    with pytest.raises(AttentionInputError, match="head_dim"):
        decode_attention(torch.randn(2, 4, 32), k, k, table, lens, torch.empty(2, 4, 32), 1.0)
    with pytest.raises(AttentionInputError, match="dtype"):
        decode_attention(q, k.half(), k.half(), table, lens, out, 1.0)
    with pytest.raises(AttentionInputError, match="workspace"):
        ws = decode_workspace(2, 4, 64, 2, "cpu")
        decode_attention(q, k, k, table, lens, out, 1.0, num_splits=3, workspace=ws)
    with pytest.raises(AttentionInputError, match="contiguous along head_dim"):
        decode_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, k, table, lens, out, 1.0)


# ---- prefill / extend ----------------------------------------------------------------------------------------------

PREFILL_CASES = [
    # gqa, head_dim, block_size, block_m, block_n, pack_gqa, dtype
    (1, 64, 16, None, None, False, torch.float32),
    (4, 128, 16, None, None, False, torch.float32),
    (8, 64, 32, 32, 16, False, torch.float32),  # BLOCK_M != BLOCK_N exercises the causal-diagonal split
    (4, 64, 16, 16, 32, False, torch.bfloat16),
    (2, 64, 8, None, None, False, torch.float16),
    (4, 64, 16, 32, 16, True, torch.float32),  # packed: 8 tokens x 4 heads per block
    (8, 128, 8, 64, 32, True, torch.bfloat16),
]


@pytest.mark.parametrize("gqa,head_dim,block_size,block_m,block_n,pack_gqa,dtype", PREFILL_CASES)
@in_process
def test_prefill_matches_reference(gqa, head_dim, block_size, block_m, block_n, pack_gqa, dtype):
    gen = seeded(gqa, head_dim, block_size, block_m, block_n, pack_gqa, dtype)
    check_prefill(gqa, head_dim, block_size, block_m, block_n, pack_gqa, dtype, gen)


FP8 = torch.float8_e4m3fn


@pytest.mark.parametrize("variant,kw", [("split", {"num_splits": 1}), ("split", {"num_splits": 3}),
                                        ("split", {"max_programs": 3}), ("row", {"num_splits": 2}),
                                        ("row_flat", {"max_programs": 2}),
                                        ("packed", {"num_splits": 2}),
                                        ("split", {"num_splits": 3, "prefetch": True}),
                                        ("split", {"max_programs": 3, "prefetch": True}),
                                        ("split", {"num_splits": 3, "f16_tiles": False}),
                                        ("row", {"num_splits": 2, "f16_tiles": False})])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@in_process
def test_decode_fp8_cache_matches_reference(variant, kw, dtype):
    """A float8 e4m3 cache (kv_cache_dtype="fp8"): every decode kernel widens it on load (to float16 under a bf16
    query by default, to the query's dtype with f16_tiles=False) and computes the attention the reference computes
    on the same float8 values."""
    gen = seeded("fp8", variant, sorted(kw.items()), dtype)
    check_decode([37, 0, 1, 16, 100, 65], 2, 4, 64, 16, dtype, gen, kv_dtype=FP8, variant=variant, **kw)


def test_tile_dtype_widens_float8_to_float16_under_16_bit_queries():
    """Which dtype the attention kernels multiply in: float16 for a float8 cache under a bf16/f16 query (exact for
    every e4m3 value, one widening instruction per two elements), else the query's dtype; a bad query dtype is named."""
    import triton.language as tl

    from nanoflow.ops.tile_dot import tile_dtype

    assert tile_dtype(torch.bfloat16, FP8) == tl.float16
    assert tile_dtype(torch.float16, FP8) == tl.float16
    assert tile_dtype(torch.bfloat16, FP8, f16_tiles=0) == tl.bfloat16  # --decode-options f16_tiles=0
    assert tile_dtype(torch.float32, FP8) == tl.float32
    assert tile_dtype(torch.bfloat16, torch.bfloat16) == tl.bfloat16
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        tile_dtype(torch.float64, FP8)
    # float16 holds every finite e4m3 value exactly, so the widening loses nothing.
    every = torch.arange(256, dtype=torch.uint8).view(FP8)
    finite = every[~torch.isnan(every.float())]
    assert torch.equal(finite.to(torch.float16).float(), finite.float())


@pytest.mark.parametrize("dtype,pack_gqa", [(torch.float32, False), (torch.bfloat16, True)])
@in_process
def test_prefill_fp8_cache_matches_reference(dtype, pack_gqa):
    check_prefill(4, 64, 16, 16, 32, pack_gqa, dtype, seeded("fp8-prefill", dtype, pack_gqa), kv_dtype=FP8)


def packed_segments(segs: list[tuple[int, int]], hq: int, hkv: int, d: int, dtype: torch.dtype,
                    gen: torch.Generator) -> tuple[list[int], torch.Tensor]:
    """``(first row of each segment, qkv [rows, (hq + 2 hkv) * d])``: the segments' new tokens packed with a gap row
    between them (gaps belong to no segment, so their output rows must stay NaN)."""
    starts, row = [], 1
    for ql, _ in segs:
        starts.append(row)
        row += ql + 1
    return starts, torch.randn(row + 1, (hq + 2 * hkv) * d, generator=gen).to(dtype)


def check_prefill(gqa, head_dim, block_size, block_m, block_n, pack_gqa, dtype, gen, kv_dtype=None):
    hkv = 2
    hq = hkv * gqa
    # (q_len, ctx_len): fresh prompt, skipped, one-token extend, context crossing pages, multi-block chunk.
    segs = [(21, 0), (0, 9), (1, 30), (13, 19), (37, 5)]
    k, v, table = paged_kv([ql + ctx for ql, ctx in segs], block_size, hkv, head_dim, dtype, gen, kv_dtype)
    starts, qkv = packed_segments(segs, hq, hkv, head_dim, dtype, gen)
    total = qkv.shape[0]
    q = qkv[:, : hq * head_dim].view(total, hq, head_dim)
    out = torch.full((total, hq, head_dim), float("nan"), dtype=dtype)
    q_start = torch.tensor(starts, dtype=torch.int32)
    q_len = torch.tensor([ql for ql, _ in segs], dtype=torch.int32)
    ctx_len = torch.tensor([ctx for _, ctx in segs], dtype=torch.int32)
    scale = head_dim**-0.5
    prefill_attention(
        q, k, v, out, q_start, q_len, ctx_len, table, scale, max_q_len=40, block_m=block_m, block_n=block_n,
        pack_gqa=pack_gqa,
    )
    ref = prefill_attention_ref(q, k, v, q_start, q_len, ctx_len, table, scale)
    owned = [s + i for s, (ql, _) in zip(starts, segs, strict=True) for i in range(ql)]
    ref_masked = torch.full_like(ref, float("nan"))
    ref_masked[owned] = ref[owned]
    assert_rows(out, ref_masked, owned, dtype)


@pytest.mark.parametrize("dtype,kv_dtype,pack_gqa,block_m,block_n", [
    (torch.float32, None, False, 16, 16),
    (torch.bfloat16, FP8, False, 32, 16),  # the engine's case: a float8 cache, the chunk's own K/V in bf16
    (torch.bfloat16, FP8, True, 32, 16),
    (torch.float16, None, False, 16, 32),  # a context tile straddling ctx (16 <= ctx % 32)
])
@in_process
def test_prefill_new_kv_from_rows_matches_reference(dtype, kv_dtype, pack_gqa, block_m, block_n):
    """``k_new``/``v_new``: the new tokens' K/V come from contiguous rows (views of a fused QKV buffer, as the engine
    passes them), only the context from the pages. The pages' slots of the new tokens hold different values, so the
    reference (the float64 oracle on pages whose new slots are overwritten with the rows) tells the two apart."""
    gen = seeded("new-kv", dtype, kv_dtype, pack_gqa, block_m, block_n)
    hkv, gqa, d, bs = 2, 4, 64, 16
    hq = hkv * gqa
    segs = [(21, 0), (0, 9), (1, 30), (13, 19), (37, 5), (40, 33)]  # (q_len, ctx_len)
    k, v, table = paged_kv([ql + ctx for ql, ctx in segs], bs, hkv, d, dtype, gen, kv_dtype)
    starts, qkv = packed_segments(segs, hq, hkv, d, dtype, gen)
    total = qkv.shape[0]
    q = qkv[:, : hq * d].view(total, hq, d)
    k_new = qkv[:, hq * d:(hq + hkv) * d].view(total, hkv, d)
    v_new = qkv[:, (hq + hkv) * d:].view(total, hkv, d)
    k_ref, v_ref = k.to(dtype).clone(), v.to(dtype).clone()
    for s, (ql, ctx) in enumerate(segs):
        for i in range(ql):
            pos = ctx + i
            page, slot = int(table[s, pos // bs]), pos % bs
            k_ref[page, slot], v_ref[page, slot] = k_new[starts[s] + i], v_new[starts[s] + i]
    out = torch.full((total, hq, d), float("nan"), dtype=dtype)
    q_start, q_len, ctx_len = (torch.tensor(x, dtype=torch.int32)
                               for x in (starts, [ql for ql, _ in segs], [c for _, c in segs]))
    prefill_attention(q, k, v, out, q_start, q_len, ctx_len, table, d**-0.5, max_q_len=40, block_m=block_m,
                      block_n=block_n, pack_gqa=pack_gqa, k_new=k_new, v_new=v_new)
    ref = prefill_attention_ref(q, k_ref, v_ref, q_start, q_len, ctx_len, table, d**-0.5)
    owned = [st + i for st, (ql, _) in zip(starts, segs, strict=True) for i in range(ql)]
    ref_masked = torch.full_like(ref, float("nan"))
    ref_masked[owned] = ref[owned]
    assert_rows(out, ref_masked, owned, dtype)
    # Without k_new/v_new the kernel reads the pages' own (different) values for the new tokens.
    plain = torch.full_like(out, float("nan"))
    prefill_attention(q, k, v, plain, q_start, q_len, ctx_len, table, d**-0.5, max_q_len=40, block_m=block_m,
                      block_n=block_n, pack_gqa=pack_gqa)
    assert not torch.allclose(plain[owned].float(), out[owned].float(), atol=1e-2)


@in_process
def test_prefill_row_sliced_views_and_empty_grid():
    """q/out as row slices of bigger buffers (q_start indexes the slice); max_q_len == 0 launches nothing."""
    gen = torch.Generator().manual_seed(3)
    k, v, table = paged_kv([20, 40], 16, 2, 64, torch.float32, gen)
    q_buf = torch.randn(40, 4, 64, generator=gen)
    out_buf = torch.full((40, 4, 64), float("nan"))
    q, out = q_buf[5:35], out_buf[2:32]
    q_start = torch.tensor([0, 10], dtype=torch.int32)
    q_len = torch.tensor([4, 20], dtype=torch.int32)
    ctx_len = torch.tensor([16, 20], dtype=torch.int32)
    prefill_attention(q, k, v, out, q_start, q_len, ctx_len, table, 0.2, max_q_len=0)
    assert out_buf.isnan().all()
    prefill_attention(q, k, v, out, q_start, q_len, ctx_len, table, 0.2, max_q_len=20)
    ref = torch.full(out_buf.shape, float("nan"), dtype=torch.float64)
    owned = [2 + i for i in [0, 1, 2, 3, *range(10, 30)]]
    ref[owned] = prefill_attention_ref(q, k, v, q_start, q_len, ctx_len, table, 0.2)[[r - 2 for r in owned]]
    assert_rows(out_buf, ref, owned, torch.float32)


def test_prefill_rejects_bad_inputs():
    q = torch.randn(4, 4, 64)
    k = torch.randn(3, 16, 2, 64)
    idx = torch.zeros(2, dtype=torch.int32)
    table = torch.ones(2, 1, dtype=torch.int32)
    with pytest.raises(AttentionInputError, match=r"q_len must be \[2\]"):
        prefill_attention(q, k, k, torch.empty_like(q), idx, idx[:1], idx, table, 1.0, 4)
    with pytest.raises(AttentionInputError, match="max_q_len"):
        prefill_attention(q, k, k, torch.empty_like(q), idx, idx, idx, table, 1.0, -1)
    with pytest.raises(AttentionInputError, match="out must have"):
        prefill_attention(q, k, k, torch.empty(3, 4, 64), idx, idx, idx, table, 1.0, 4)
    with pytest.raises(AttentionInputError, match="both k_new and v_new"):
        prefill_attention(q, k, k, torch.empty_like(q), idx, idx, idx, table, 1.0, 4, k_new=torch.randn(4, 2, 64))
    with pytest.raises(AttentionInputError, match=r"k_new must be \[tokens, kv_heads, head_dim\] = \[4, 2, 64\]"):
        prefill_attention(q, k, k, torch.empty_like(q), idx, idx, idx, table, 1.0, 4, k_new=torch.randn(4, 4, 64),
                          v_new=torch.randn(4, 2, 64))


# ---- the oracle itself ---------------------------------------------------------------------------------------------


def test_references_agree_with_sdpa():
    """Contiguous pages, no context: the paged references equal torch SDPA (causal for prefill, full for decode)."""
    gen = torch.Generator().manual_seed(11)
    length, hq, hkv, d, bs = 24, 4, 2, 16, 8
    k = torch.randn(length // bs + 1, bs, hkv, d, generator=gen, dtype=torch.float64)
    v = torch.randn(length // bs + 1, bs, hkv, d, generator=gen, dtype=torch.float64)
    table = torch.arange(1, length // bs + 1, dtype=torch.int32)[None]
    q = torch.randn(length, hq, d, generator=gen, dtype=torch.float64)
    kk = k[1:].reshape(length, hkv, d).repeat_interleave(hq // hkv, 1).transpose(0, 1)
    vv = v[1:].reshape(length, hkv, d).repeat_interleave(hq // hkv, 1).transpose(0, 1)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.transpose(0, 1), kk, vv, is_causal=True, scale=0.3)
    i32 = torch.tensor
    got = prefill_attention_ref(q, k, v, i32([0], dtype=torch.int32), i32([length], dtype=torch.int32),
                                i32([0], dtype=torch.int32), table, 0.3)
    torch.testing.assert_close(got, sdpa.transpose(0, 1))
    dec = decode_attention_ref(q[-1:], k, v, table, i32([length], dtype=torch.int32), 0.3)
    torch.testing.assert_close(dec, sdpa.transpose(0, 1)[-1:])


@pytest.mark.parametrize("variant,options,splits", [("split", {}, 1), ("row", {}, 8), ("row_flat", {}, 8),
                                                    ("packed", {"head_group": 2}, 2), ("packed", {}, 4)])
def test_graph_workspace_splits_follow_the_decode_variant(variant, options, splits):
    """The CUDA-graph runner sizes the split-KV workspace from the variant's programs per row (8 kv heads of 4 query
    heads: split 8, row kernels 1, packed 8 / head_group; the default head_group 4 packs 16 rows), so a one-row
    batch gets ceil(2 * 4 CPU "SMs" / programs) splits."""
    from types import SimpleNamespace

    from nanoflow.graphs.cuda_graph import CudaGraphRunner
    from nanoflow.ops.attention.backends import TritonAttention

    fake = SimpleNamespace(device=torch.device("cpu"), runner=SimpleNamespace(
        spec=SimpleNamespace(head_dim=64), model=SimpleNamespace(local_kv_heads=8, local_heads=32),
        attention=TritonAttention(0.125, 16, decode_variant=variant, decode_options=options)))
    got, ws = CudaGraphRunner._decode_workspace(fake, 1)
    assert got == splits
    assert ws.partial_out.shape == (1, 32, splits, 64)
