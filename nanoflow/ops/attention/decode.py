"""Paged decode attention (split-KV / flash-decoding) in Triton.

One query token per row attends the row's whole cached sequence. Decode attention is memory-bound: each KV byte is
read once and does ~2 FLOPs per head of its group, so the design goal is streaming K/V at HBM bandwidth.

* Split kernel, grid ``(N, num_kv_heads, num_splits)``: a program owns one row, one kv head and a contiguous range
  of KV tiles (``block_n`` tokens, i.e. several pages, per iteration). It serves all GQA query heads of its kv head at
  once (the group padded to >= 16 rows for ``tl.dot``), so each K/V tile is loaded once. With one split it writes
  ``out`` directly; otherwise it writes a normalised partial output and its log-sum-exp to the workspace.
* Row kernels (``variant="row"`` / ``"row_flat"``, :mod:`nanoflow.ops.attention.decode_row`): a program owns a
  whole row (all kv heads), so each K/V tile is whole contiguous pages.
* Reduce kernel, grid ``(N, num_heads)``: combines a row's splits with log-sum-exp weights (every variant).
* ``tma=True`` (split and persistent grids): K/V pages are copied by TMA through tensor descriptors, one page per
  tile, instead of pointer loads; measured slower than the pointer tiles on an H200, so off by default.

The attention kernels (split, persistent, row, row_flat) share one online-softmax step and one result store
(:mod:`nanoflow.ops.attention.online_softmax`), the split-KV workspace and reduce
(:mod:`nanoflow.ops.attention.split_kv`) and the leading stride arguments their launchers pass
(:func:`decode_strides`); the split and persistent kernels run the same work item (:func:`_attend_group`).

Measured (split kernel, LLaMA-3-8B heads, bf16, pages of 16 in shuffled order, 256-1024 rows of 1024-4096 tokens):
95-102% of the device-to-device copy bandwidth on an H100 and an H200 (scripts/device/bench_attention.py). On an
H200 (scripts/device/tune_decode_kv.py, 768 x 1,280 and 256 x 4,096 tokens): bf16 split 4.4 TB/s; the row kernels
far slower at their default grids (row 0.9-1.6 TB/s, row_flat 2.1-2.3 TB/s). A float8 cache reads half the bytes;
its tiles are widened to float16 in registers before their dots; Triton 3.6 still copies them asynchronously into
shared memory, but at 2-4 stages its loop waits for every copy before computing (from 5 stages on it overlaps them,
measured no faster: s9-green-decode-deep-h100.json), so what keeps bytes in flight is more, smaller programs: 2
warps, 64-token tiles, 3 stages reach 3.3 TB/s (0.61 ms for 768 x 1,280 tokens, against 0.92 ms bf16); 4-warp tiles
2.0-2.5 TB/s (session-6 tune files). Measured slower and
not kept: the transposed products (K/V as the MMAs' left operands), float8 score dots on a quantised query, 1 warp.
Inside a green context of n SMs (scripts/device/green_decode.py, H100) every config's bandwidth is proportional to n
(float8 default 0.90 TB/s on 32 SMs, 2.79 on 132), TMA tiles included: the kernel is bound by its per-element work on
each SM (~27 G elements/s/SM for float8 and bf16 alike), not by HBM, which is why an SM share cannot overlap it with a
GEMM profitably (benchmarks/results/2026-12-06-s9-green-decode-h100.json). Nsight Compute (s9-ncu-decode-h100.json):
the float8 kernel issues 0.16 warp instructions per K/V element at IPC 2.35 (occupancy 19%, 168 registers); bf16
issues 0.13 and waits on memory at 25% occupancy. Cutting the float8 loop's instructions by a quarter (V loaded as
packed words, s9-green-decode-kpack-h100.json) cost registers and ran slower: instructions and occupancy together set
the per-SM rate. The hand-written CUDA kernel (``variant="cuda"``, :mod:`nanoflow.ops.attention.decode_cuda`) has both:
~0.07 instructions per element and three tiles in flight per warp; it moves 2.5x the bytes per SM (1.12 / 2.21 / 2.92
TB/s on 16 / 32 / 48 SMs, s10-green-decode-cuda-ring-h100.json).

CUDA-graph invariants: the grid depends only on ``N``, the head counts, ``num_splits`` and ``max_programs``; the
wrapper never reads a device tensor. Rows with ``seq_lens[n] == 0`` exit (or are skipped) before any store, so their
``out`` rows are left untouched.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanoflow.ops.attention.online_softmax import LOG2E, attend_tile, dot_rows, store_result
from nanoflow.ops.attention.reference import AttentionInputError, check_index, check_kv_cache, check_qo
from nanoflow.ops.attention.split_kv import (
    DecodeWorkspace,
    check_block_n,
    check_programs,
    check_splits,
    default_num_splits,
    reduce_splits,
    split_outputs,
    split_range,
)
from nanoflow.ops.tile_dot import dot_precision, tile_dtype


def _default_tiles(device: torch.device, head_dim: int, kv_elem_bytes: int = 2,
                   bounded: bool = False) -> tuple[int, int, int]:
    """``(block_n, num_warps, num_stages)`` of the split kernel when the caller gives none."""
    if device.type != "cuda":
        return 16, 4, 2  # the interpreter: small tiles keep multi-tile paths exercised on tiny test shapes
    if kv_elem_bytes == 1 and head_dim <= 128:
        # A float8 tile is widened in registers before its dot, which keeps it out of the pipelined shared-memory
        # loads; what helps is more programs per SM. H200, 768 x 1,280 and 256 x 4,096 tokens, full grid: 2 warps,
        # 64 tokens, 3 stages 0.62 / 0.68 ms (3.3 / 3.2 TB/s) against 0.79-0.87 ms for every 4-warp tile; on a
        # bounded grid (fewer programs than SMs can hold) 4 warps and 128 tokens stay faster (2.5 against 2.0 TB/s at
        # 264 programs). benchmarks/results/2026-12-02-s6-decode-kv-tune-warps-h200.json
        return (128, 4, 2) if bounded else (64, 2, 3)
    return (64 if head_dim <= 128 else 32), 4, 2


@triton.jit
def _load_tile(bt_row, k_head, v_head, tile, tile_hi, seq_len, offs_n, offs_d, stride_kb, stride_kt, stride_vb,
               stride_vt, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, EVICT: tl.constexpr):
    """KV tile ``tile`` of a row as stored (``[BLOCK_N, HEAD_DIM]`` K and V in the cache dtype) and which of its tokens
    are valid; a tile at or past ``tile_hi`` loads nothing (all masked)."""
    tok = tile * BLOCK_N + offs_n
    valid = tok < tl.minimum(seq_len, tile_hi * BLOCK_N)  # tiles from tile_hi on: nothing valid
    # int64: a layer's cache can exceed 2**31 elements.
    page = tl.load(bt_row + tok // PAGE, mask=valid, other=0).to(tl.int64)
    slot_in_page = tok % PAGE
    k = tl.load(k_head + (page * stride_kb + slot_in_page * stride_kt)[:, None] + offs_d[None, :],
                mask=valid[:, None], other=0.0, eviction_policy=EVICT)
    v = tl.load(v_head + (page * stride_vb + slot_in_page * stride_vt)[:, None] + offs_d[None, :],
                mask=valid[:, None], other=0.0, eviction_policy=EVICT)
    return valid, k, v


@triton.jit
def _attend_group(
    q_ptr, k_ptr, v_ptr, bt_ptr, out_ptr, po_ptr, plse_ptr,
    row, kvh, split, seq_len, tile_lo, tile_hi,
    scale_log2,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    stride_pot, stride_poh, stride_pos,
    stride_plt, stride_plh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr, EVICT: tl.constexpr,
    PREFETCH: tl.constexpr, TILE: tl.constexpr, TMA: tl.constexpr,
):
    """The split and persistent kernels' work item: the GQA group of query heads of kv head ``kvh`` in ``row`` (padded
    to BLOCK_G rows) over the row's KV tiles ``[tile_lo, tile_hi)``, each holding >= 1 valid token; the result is
    stored by :func:`store_result` (as split ``split``).

    TILE: the dtype q and the K/V tiles are multiplied in (:func:`~nanoflow.ops.tile_dot.tile_dtype`).
    PREFETCH: issue the next tile's page, K and V loads before computing on the current tile (a software pipeline
    in registers). Triton pipelines loads through shared memory only when they feed a dot directly; a float8 tile is
    widened in registers first, so without this its loads wait for each tile's compute.
    TMA (0 off, 1 on, 2 on and warp-specialised): ``k_ptr``/``v_ptr`` are tensor descriptors of the layer's pages
    as ``[pages * PAGE, kv_heads * HEAD_DIM]`` and a tile is one page (BLOCK_N == PAGE), copied by TMA into shared
    memory whatever its dtype; a float8 tile is widened from there. V rows past the sequence are zeroed (stale bytes
    could be NaN codes)."""
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    g_valid = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    row64 = row.to(tl.int64)
    q = tl.load(
        q_ptr + row64 * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=g_valid[:, None], other=0.0
    ).to(TILE)
    bt_row = bt_ptr + row64 * stride_bt

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    if TMA:
        col = kvh * HEAD_DIM
        # TMA == 2: Triton's automatic warp specialization (producer warps issue the copies, the rest compute).
        for tile in tl.range(tile_lo, tile_hi, warp_specialize=TMA == 2):
            valid = tile * BLOCK_N + offs_n < seq_len
            page = tl.load(bt_row + tile)
            k = k_ptr.load([page * PAGE, col])
            v = tl.where(valid[:, None], v_ptr.load([page * PAGE, col]).to(q.dtype), 0.0).to(q.dtype)
            m_i, l_i, acc = attend_tile(q, tl.trans(k.to(q.dtype)), v, valid[None, :], m_i, l_i, acc, scale_log2,
                                        PRECISION)
    elif PREFETCH:
        k_head = k_ptr + kvh * stride_kh
        v_head = v_ptr + kvh * stride_vh
        valid, k, v = _load_tile(bt_row, k_head, v_head, tile_lo, tile_hi, seq_len, offs_n, offs_d, stride_kb,
                                 stride_kt, stride_vb, stride_vt, PAGE, BLOCK_N, EVICT)
        for tile in range(tile_lo, tile_hi):
            # The next tile's loads go out first (all masked off past tile_hi), then the current tile's compute.
            valid_n, k_n, v_n = _load_tile(bt_row, k_head, v_head, tile + 1, tile_hi, seq_len, offs_n, offs_d,
                                           stride_kb, stride_kt, stride_vb, stride_vt, PAGE, BLOCK_N, EVICT)
            m_i, l_i, acc = attend_tile(q, tl.trans(k.to(q.dtype)), v.to(q.dtype), valid[None, :], m_i, l_i, acc,
                                        scale_log2, PRECISION)
            valid, k, v = valid_n, k_n, v_n
    else:
        k_head = k_ptr + kvh * stride_kh
        v_head = v_ptr + kvh * stride_vh
        for tile in range(tile_lo, tile_hi):
            valid, k, v = _load_tile(bt_row, k_head, v_head, tile, tile_hi, seq_len, offs_n, offs_d, stride_kb,
                                     stride_kt, stride_vb, stride_vt, PAGE, BLOCK_N, EVICT)
            # A float8 cache is widened in registers to TILE (a no-op otherwise).
            m_i, l_i, acc = attend_tile(q, tl.trans(k.to(q.dtype)), v.to(q.dtype), valid[None, :], m_i, l_i, acc,
                                        scale_log2, PRECISION)
    store_result(out_ptr, po_ptr, plse_ptr, row64, split, heads, g_valid, m_i, l_i, acc,
                 stride_ot, stride_oh, stride_pot, stride_poh, stride_pos, stride_plt, stride_plh, HEAD_DIM, DIRECT)


@triton.jit
def _decode_split_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, po_ptr, plse_ptr,
    scale_log2,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    stride_pot, stride_poh, stride_pos,
    stride_plt, stride_plh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr, DIRECT: tl.constexpr, PRECISION: tl.constexpr, EVICT: tl.constexpr,
    PREFETCH: tl.constexpr, TILE: tl.constexpr, TMA: tl.constexpr,
):
    row = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len, tile_lo, tile_hi = split_range(lens_ptr, row, split, tl.num_programs(2), BLOCK_N)
    if tile_lo >= tile_hi:
        return

    _attend_group(
        q_ptr, k_ptr, v_ptr, bt_ptr, out_ptr, po_ptr, plse_ptr, row, kvh, split, seq_len, tile_lo, tile_hi, scale_log2,
        stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
        stride_ot, stride_oh, stride_pot, stride_poh, stride_pos, stride_plt, stride_plh,
        GROUP, BLOCK_G, HEAD_DIM, PAGE, BLOCK_N, DIRECT, PRECISION, EVICT, PREFETCH, TILE, TMA,
    )


@triton.jit
def _decode_persistent_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr,
    num_items, num_kv_heads,
    scale_log2,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr, PRECISION: tl.constexpr, EVICT: tl.constexpr, PREFETCH: tl.constexpr,
    TILE: tl.constexpr, TMA: tl.constexpr,
):
    """One (row, kv head) work item after another with a fixed number of programs (the grid-size knob).

    Bounding the grid bounds the SMs decode attention occupies, leaving the rest to a concurrent GEMM of another
    nano-batch. Items are dealt round-robin (item = pid, pid + P, ...), so long and short rows mix on every program.
    """
    for item in range(tl.program_id(0), num_items, tl.num_programs(0)):
        row = item // num_kv_heads
        kvh = item % num_kv_heads
        seq_len = tl.load(lens_ptr + row)
        if seq_len > 0:
            # All of the row's tiles as one split, stored straight to out (DIRECT: no partial pointers or strides).
            _attend_group(
                q_ptr, k_ptr, v_ptr, bt_ptr, out_ptr, out_ptr, out_ptr, row, kvh, 0, seq_len, 0,
                tl.cdiv(seq_len, BLOCK_N), scale_log2,
                stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, stride_bt,
                stride_ot, stride_oh, 0, 0, 0, 0, 0,
                GROUP, BLOCK_G, HEAD_DIM, PAGE, BLOCK_N, True, PRECISION, EVICT, PREFETCH, TILE, TMA,
            )


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    workspace: DecodeWorkspace | None = None,
    *,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    max_programs: int | None = None,
    kv_evict: str = "evict_first",
    variant: str = "split",
    prefetch: bool = False,
    f16_tiles: bool | None = None,
    tma: int = 0,
    head_group: int | None = None,
    maxnreg: int | None = None,
) -> torch.Tensor:
    """Paged decode attention: ``out[n] = softmax(scale * q[n] K_n^T) V_n`` over row ``n``'s ``seq_lens[n]`` tokens.

    Args:
        q, out: ``[N, num_heads, head_dim]``; any row/head strides (e.g. a column slice of a fused QKV buffer),
            unit stride along ``head_dim``.
        k_cache, v_cache: one layer's pages ``[num_blocks, block_size, num_kv_heads, head_dim]``.
        block_tables: int32 ``[N, max_blocks]``; entries past a row's last page are never read.
        seq_lens: int32 ``[N]``, KV length including the current token (already in the cache); 0 skips the row
            and leaves ``out[n]`` untouched.
        num_splits: split-KV grid size (the resource knob the auto-search tunes); ``None`` picks
            :func:`default_num_splits`.
        workspace: preallocated scratch (:func:`decode_workspace`); required for CUDA-graph capture when
            ``num_splits > 1``, otherwise allocated per call.
        block_n, num_warps, num_stages: the kernel's tile (KV tokens per loop iteration, a power of two >= 16),
            warps and pipeline stages; ``None`` picks a default per device, cache dtype and grid.
        max_programs: run a persistent grid of this many programs (one split each) instead of one program per
            (row, kv head, split): the grid-size resource knob that leaves SMs free for an overlapped GEMM.
        kv_evict: L2 eviction hint of the K/V loads. ``"evict_first"`` (default) marks the streamed KV as the first
            to leave L2, so a GEMM running beside it keeps its reused weight tiles there; ``""`` is the plain load.
        variant: ``"split"`` (default): one program per (row, kv head[, split]), K/V tiles ``[block_n, head_dim]`` of
            one kv head. ``"row"``: one program per (row[, split]) serving all kv heads, K/V tiles
            ``[block_n, num_kv_heads, head_dim]`` (whole contiguous pages), far more bytes in flight per program;
            needs a power-of-two ``num_kv_heads``. ``"row_flat"``: the same work split and tiles with 2-D dots over
            the flattened heads (more FLOPs, far fewer registers; see :func:`_decode_row_flat_kernel`).
            ``max_programs``, ``num_splits``, ``workspace``, ``block_n``,
            ``num_warps``, ``num_stages`` and ``kv_evict`` mean the same for both (work items are rows, not
            (row, kv head) pairs, for ``"row"``).
            ``"cuda"`` (:mod:`nanoflow.ops.attention.decode_cuda`): the hand-written CUDA kernel for a float8 cache,
            one warp per (row, kv head[, split]); takes ``num_splits``, ``workspace``, ``max_programs`` (thread
            blocks of 4 such warps), ``num_stages`` (tiles in flight per warp) and ``kv_evict`` (the L2 policy of
            its copies), no other tile options.
        prefetch: split variant (full or persistent grid): load each next K/V tile before computing on the current
            one, a software pipeline in registers (written when float8 tiles, widened before their dot, were thought
            not to be pipelined by Triton; they are, see above). Off by default: on an H200 it is slower (float8,
            768 x 1,280 tokens: 1.2-2.7 ms against 0.61 ms for the default tiles; register pressure);
            ``scripts/device/tune_decode_kv.py`` sweeps it.
        f16_tiles: a float8 cache under a bf16 query is widened to float16 and q cast to it (``None``, the default,
            see :func:`~nanoflow.ops.tile_dot.tile_dtype`); ``False`` widens to the query's dtype instead.
        tma: split variant: copy each K/V page into shared memory by TMA (Hopper's bulk tensor copies, through
            tensor descriptors) instead of pointer loads; one page per tile, so ``block_n`` must be the page size
            (``None`` takes it). Needs contiguous
            ``[num_blocks, block_size, kv_heads, head_dim]`` pages. ``tma=2`` also lets Triton warp-specialise the
            tile loop (producer warps issue the copies; needs ``num_warps >= 4``). Off by default: on an H200
            (768 x 1,280 tokens, float8) the best TMA tile reached 3.16 TB/s against 3.33 for the default pointer
            tiles, and end to end (LLaMA-3-8B, pages of 64) 26,827 against 27,177 tok/s; with Triton 3.6
            ``tma=2`` fails to compile at 4 warps and runs as fast as ``tma=1`` at 8
            (benchmarks/results/2026-12-02-s8-decode-kv-tune-tma-page*-h200.json).
        head_group: ``variant="packed"`` (:mod:`nanoflow.ops.attention.decode_packed`): kv heads per program, their
            query heads packed into the dots' rows through a block-diagonal q (a power of two dividing
            ``num_kv_heads``; ``None``: enough for 16 rows).
        maxnreg: split variant on a GPU: cap the registers per thread (PTX ``.maxnreg``), trading spills for more
            resident warps; ``None`` lets the compiler choose (ignored off CUDA). Measured slower on an H100 (float8
            default tiles 0.60 ms; capped at 128: 0.67 ms, at 96: 1.34 ms; bf16 at 96: 1.18 against 1.09 ms;
            benchmarks/results/2026-12-06-s9-green-decode-maxnreg-h100.json), so off by default.
    Returns ``out``.
    """
    check_qo(q, out)
    page, group = check_kv_cache(q, k_cache, v_cache)
    rows, num_heads, head_dim = q.shape
    check_index("seq_lens", seq_lens, rows, q.device)
    check_index("block_tables", block_tables, rows, q.device, ndim=2)
    if rows == 0:
        return out
    if kv_evict not in ("", "evict_first", "evict_last"):
        raise AttentionInputError(f"kv_evict must be '', 'evict_first' or 'evict_last', got {kv_evict!r}")
    if head_group is not None and variant != "packed":
        raise AttentionInputError("head_group applies to variant='packed' only; drop it or use that variant")
    if variant in ("row", "row_flat"):
        from nanoflow.ops.attention.decode_row import decode_row

        if prefetch or tma or maxnreg is not None:
            raise AttentionInputError("prefetch, tma and maxnreg apply to the split variant only; drop them or use "
                                      "variant='split'")
        return decode_row(q, k_cache, v_cache, block_tables, seq_lens, out, scale, num_splits, workspace,
                          block_n, num_warps or 4, num_stages or 2, max_programs, kv_evict, page, group,
                          variant == "row_flat",
                          tile_dtype(q.dtype, k_cache.dtype, f16_tiles))
    if variant == "cuda":
        from nanoflow.ops.attention.decode_cuda import decode_cuda

        if prefetch or tma or maxnreg is not None or block_n is not None or num_warps is not None:
            raise AttentionInputError("block_n, num_warps, prefetch, tma and maxnreg are Triton tile options; "
                                      "variant='cuda' has a fixed tile (num_stages sets its ring depth), drop them")
        return decode_cuda(q, k_cache, v_cache, block_tables, seq_lens, out, scale, num_splits, workspace,
                           max_programs, page, group, num_stages, kv_evict)
    if variant not in ("split", "packed"):
        raise AttentionInputError(f"variant must be 'split', 'row', 'row_flat', 'packed' or 'cuda', got {variant!r}")
    kv_heads = k_cache.shape[2]
    strides = decode_strides(q, k_cache, v_cache, block_tables, out)
    if variant == "packed":
        from nanoflow.ops.attention.decode_packed import decode_packed

        if prefetch or tma or max_programs is not None or maxnreg is not None:
            raise AttentionInputError("prefetch, tma, max_programs and maxnreg apply to the split variant only; drop "
                                      "them or use variant='split'")
        return decode_packed(q, k_cache, v_cache, block_tables, seq_lens, out, scale, num_splits, workspace, block_n,
                             num_warps or 4, num_stages or 2, kv_evict, page, group, head_group,
                             tile_dtype(q.dtype, k_cache.dtype, f16_tiles), strides)
    default_n, default_warps, default_stages = _default_tiles(q.device, head_dim, k_cache.element_size(),
                                                              bounded=max_programs is not None)
    num_warps, num_stages = num_warps or default_warps, num_stages or default_stages
    meta = dict(GROUP=group, BLOCK_G=dot_rows(group), HEAD_DIM=head_dim, PAGE=page,
                PRECISION=dot_precision(q.dtype, q.device), EVICT=kv_evict, PREFETCH=bool(prefetch),
                TILE=tile_dtype(q.dtype, k_cache.dtype, f16_tiles), TMA=int(tma),
                num_warps=num_warps, num_stages=num_stages)
    if maxnreg is not None:
        if variant != "split" or maxnreg < 24:
            raise AttentionInputError(f"maxnreg applies to the split variant and must be >= 24, got {maxnreg}")
        if q.device.type == "cuda":
            meta["maxnreg"] = int(maxnreg)
    k_arg, v_arg = k_cache, v_cache
    if tma:
        if prefetch:
            raise AttentionInputError("tma and prefetch are two ways to stream tiles; pick one")
        if int(tma) not in (1, 2) or (int(tma) == 2 and num_warps < 4):
            raise AttentionInputError(f"tma must be 1 (TMA copies) or 2 (also warp-specialised, needs num_warps "
                                      f">= 4); got tma={tma}, num_warps={num_warps}")
        if block_n is not None and block_n != page:
            raise AttentionInputError(f"tma loads one page per tile: block_n must be the page size {page} (or None), "
                                      f"got {block_n}")
        block_n = default_n = page
        k_arg, v_arg = _page_descriptor(k_cache, "k_cache"), _page_descriptor(v_cache, "v_cache")
    if max_programs is not None:
        check_programs(max_programs)
        _decode_persistent_kernel[(min(max_programs, rows * kv_heads),)](
            q, k_arg, v_arg, block_tables, seq_lens, out, rows * kv_heads, kv_heads, scale * LOG2E, *strides,
            BLOCK_N=check_block_n(default_n if block_n is None else block_n), **meta,
        )
        return out
    num_splits = check_splits(default_num_splits(rows, kv_heads, q.device) if num_splits is None else num_splits)
    block_n = check_block_n(default_n if block_n is None else block_n)
    direct, po, plse, partial_strides = split_outputs(out, workspace, num_splits)
    _decode_split_kernel[(rows, kv_heads, num_splits)](
        q, k_arg, v_arg, block_tables, seq_lens, out, po, plse, scale * LOG2E, *strides, *partial_strides,
        BLOCK_N=block_n, DIRECT=direct, **meta,
    )
    if not direct:
        reduce_splits(seq_lens, out, po, plse, partial_strides, num_splits, block_n)
    return out


def _page_descriptor(cache: torch.Tensor, name: str) -> object:
    """A TMA descriptor of one layer's pages ``[num_blocks, block_size, kv_heads, head_dim]`` viewed as the matrix
    ``[num_blocks * block_size, kv_heads * head_dim]``, whose ``[block_size, head_dim]`` boxes are one head's page."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    blocks, page, kv_heads, head_dim = cache.shape
    width = kv_heads * head_dim
    if cache.stride() != (page * width, width, head_dim, 1):
        raise AttentionInputError(f"tma needs contiguous pages; {name} has strides {cache.stride()}")
    if cache.data_ptr() % 16 or (width * cache.element_size()) % 16 or head_dim * cache.element_size() < 16:
        raise AttentionInputError(f"tma needs a 16-byte aligned {name} whose rows and head_dim span multiples of "
                                  f"16 bytes; got head_dim {head_dim}, {kv_heads} kv heads of {cache.dtype}")
    return TensorDescriptor(cache, [blocks * page, width], [width, 1], [page, head_dim])


def decode_strides(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                   out: torch.Tensor) -> tuple[int, ...]:
    """The stride arguments every decode kernel (split, persistent, row, row_flat) takes after its scalars, in
    signature order: q (row, head), K and V (page, slot, kv head), the block table (row), out (row, head)."""
    return (*q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0), *out.stride()[:2])
