"""Page gather/scatter (Triton under the CPU interpreter and the torch reference) against a per-token Python loop."""

from __future__ import annotations

from interpreted import fresh_interpreter_test, import_interpreted, interpret_env, is_interpreted  # noqa: F401

(kt,) = import_interpreted("nanoflow.ops.kv_transfer")

import pytest  # noqa: E402
import torch  # noqa: E402

IN_PROCESS = is_interpreted(kt._page_copy_kernel)
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported compiled; covered by the subprocess run")
test_whole_file_in_fresh_interpreter = fresh_interpreter_test(__file__, IN_PROCESS)


def _setup(n: int, bs: int, h: int, d: int, dtype: torch.dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    layers, num_blocks = 3, 12
    cache = torch.randn((layers, 2, num_blocks, bs, h, d), generator=g).to(dtype)
    perm = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()  # shuffled pages, never the null page 0
    table = perm[: -(-n // bs)]
    return cache, table


def _expected_gather(cache: torch.Tensor, table: list[int], n: int) -> torch.Tensor:
    bs = cache.shape[3]
    rows = [cache[:, :, table[p // bs], p % bs] for p in range(n)]  # [L, 2, H, D] each
    return torch.stack(rows, dim=2) if rows else cache[:, :, 0, :0]


IMPLS = [pytest.param("triton", marks=in_process), "torch"]
FP8 = torch.float8_e4m3fn  # the fp8 KV cache's element type (torch.equal has no float8 kernel: compare bytes)


def _same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("n", "bs", "h", "d", "dtype"), [
    (1, 4, 2, 8, torch.float32), (13, 4, 2, 8, torch.float32), (16, 8, 1, 16, torch.bfloat16),
    (21, 16, 3, 24, torch.float16), (0, 4, 2, 8, torch.float32), (13, 4, 2, 8, FP8),
])
def test_gather_matches_loop(impl, n, bs, h, d, dtype):
    cache, table = _setup(n, bs, h, d, dtype, seed=n * 31 + bs)
    got = kt.gather_pages(cache, table, n, impl=impl)
    assert got.shape == (3, 2, n, h, d) and got.is_contiguous()
    assert _same_bytes(got, _expected_gather(cache, table, n))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("n", "extra", "bs", "h", "d", "dtype"), [
    (13, 0, 4, 2, 8, torch.float32), (13, 3, 4, 2, 8, torch.float32), (16, 5, 8, 1, 16, torch.bfloat16),
    (21, 0, 16, 3, 24, torch.float16), (13, 3, 4, 2, 8, FP8),
])
def test_scatter_writes_only_owned_slots(impl, n, extra, bs, h, d, dtype):
    cache, table = _setup(n, bs, h, d, dtype, seed=n * 17 + extra)
    src = torch.randn((3, 2, n + extra, h, d), generator=torch.Generator().manual_seed(5)).to(dtype)
    expected = cache.clone()
    for p in range(n):  # the first n tokens only; the stored tail beyond n must not land anywhere
        expected[:, :, table[p // bs], p % bs] = src[:, :, p]
    kt.scatter_pages(cache, src, table, n, impl=impl)
    assert _same_bytes(cache, expected)


@pytest.mark.parametrize("impl", IMPLS)
def test_round_trip_and_pagewise_baseline(impl):
    cache, table = _setup(19, 4, 2, 8, torch.float32, seed=3)
    kv = kt.gather_pages(cache, table, 19, impl=impl)
    host, event = kt.to_host(kv)
    assert event is None and host.data_ptr() != kv.data_ptr()
    other = torch.zeros_like(cache)
    kt.scatter_pages(other, kt.to_device(host, "cpu"), table, 19, impl=impl)
    base = torch.zeros_like(cache)
    kt.scatter_pages_pagewise(base, host, table, 19)
    assert torch.equal(other, base)
    assert torch.equal(kt.gather_pages_ref(other, table, 19), kv)


def test_bad_inputs_raise():
    cache, table = _setup(8, 4, 2, 8, torch.float32, seed=1)
    with pytest.raises(kt.KVTransferError, match="pages"):
        kt.gather_pages(cache, table[:1], 8)
    with pytest.raises(kt.KVTransferError, match="usable pages"):
        kt.gather_pages(cache, [0, 1], 8)
    with pytest.raises(kt.KVTransferError, match="buffer must be"):
        kt.scatter_pages(cache, torch.zeros(3, 2, 7, 2, 8), table, 8)
    with pytest.raises(kt.KVTransferError, match="float16"):
        kt.scatter_pages(cache, torch.zeros(3, 2, 8, 2, 8, dtype=torch.float16), table, 8)
    with pytest.raises(kt.KVTransferError, match="strides"):
        kt.scatter_pages(cache, torch.zeros(2, 3, 8, 2, 8).transpose(0, 1), table, 8)


def test_dense_token_cover_finds_the_tensor_a_token_slice_was_cut_from():
    """``to_device`` DMAs a pinned token slice by copying the dense tensor it was cut from: the cover must be that
    tensor (same storage, same bytes), and anything that is not such a slice gets None (the bounce path)."""
    from nanoflow.ops.kv_transfer import _dense_token_cover

    full = torch.randn(3, 2, 10, 2, 4)
    cover = _dense_token_cover(full[:, :, :6])
    assert cover is not None and cover.shape == full.shape and cover.data_ptr() == full.data_ptr()
    assert torch.equal(cover, full) and torch.equal(cover[:, :, :6], full[:, :, :6])
    assert _dense_token_cover(full[:, :, 2:6]) is None  # its cover would run past the storage
    assert _dense_token_cover(full.transpose(3, 4)) is None
    assert _dense_token_cover(full[:, :1]) is None  # K only: not a [L, 2, m, H, D] layout
