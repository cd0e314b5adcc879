"""Paged prefill / extend attention (chunked prefill) in Triton.

Segment ``s`` contributes query rows ``q[q_start[s] : q_start[s] + q_len[s]]``. Its first ``ctx_len[s]`` KV tokens
are earlier context already in its pages, and the K/V of its ``q_len[s]`` new tokens were stored at positions
``ctx_len[s] ..`` before this call; query ``i`` (position ``ctx_len[s] + i``) attends keys ``0 .. ctx_len[s] + i``.

Grid ``(num_heads, cdiv(max_q_len, BLOCK_M), S)``: a program computes ``BLOCK_M`` queries of one head with an online
softmax over ``BLOCK_N``-token KV tiles gathered from pages, ``tl.dot`` with fp32 accumulation. Heads vary fastest so
the programs of one kv group run together and share K/V tiles in L2; query blocks are visited last-first because
later blocks see more keys (longest work starts first). KV tiles wholly below the block's first query position need
no mask; only the last tiles, on the causal diagonal, are masked. ``pack_gqa`` instead gives a program all query
heads of one kv head (grid ``(num_kv_heads, ...)``), loading each K/V tile once per group.

Measured on an H200 (LLaMA-3-8B heads, bf16, chunks of 512-2048 tokens): 217-366 TFLOP/s, 65-77% of torch SDPA on
contiguous inputs without context; packing GQA gained <= 6%, so the kernel is bound by its softmax and MMA issue
rather than by K/V loads.

CUDA-graph invariants: the grid depends only on ``num_heads``, ``S`` and the static ``max_q_len``; the wrapper never
reads a device tensor. Programs whose query block starts at or past ``q_len[s]`` exit before any store, so rows no
segment owns are left untouched. ``q_len[s] <= max_q_len`` is the caller's promise (not checkable on the host
without a sync); query rows past ``max_q_len`` would be left uncomputed.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from nanoflow.ops.attention.online_softmax import attend_tile
from nanoflow.ops.attention.reference import AttentionInputError, check_index, check_kv_cache, check_qo
from nanoflow.ops.tile_dot import dot_precision, tile_dot, tile_dtype

LOG2E = 1.4426950408889634


@triton.jit
def _attend_tile(
    q, acc, m_i, l_i, k_head, v_head, bt_row, start, kv_end, q_pos, scale_log2,
    stride_kb, stride_kt, stride_vb, stride_vt,
    HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """One online-softmax step over KV tokens ``[start, start + BLOCK_N)``; MASKED applies bounds and causality."""
    offs_d = tl.arange(0, HEAD_DIM)
    tok = start + tl.arange(0, BLOCK_N)
    if MASKED:
        valid = tok < kv_end
        page = tl.load(bt_row + tok // PAGE, mask=valid, other=0).to(tl.int64)
    else:
        page = tl.load(bt_row + tok // PAGE).to(tl.int64)
    slot_in_page = tok % PAGE
    k_ptrs = k_head + (page * stride_kb + slot_in_page * stride_kt)[:, None] + offs_d[None, :]
    v_ptrs = v_head + (page * stride_vb + slot_in_page * stride_vt)[:, None] + offs_d[None, :]
    if MASKED:
        k = tl.load(k_ptrs, mask=valid[:, None], other=0.0).to(q.dtype)  # a float8 cache is widened in registers
    else:
        k = tl.load(k_ptrs).to(q.dtype)
    s = tile_dot(q, tl.trans(k), PRECISION) * scale_log2
    if MASKED:
        s = tl.where((tok[None, :] <= q_pos[:, None]) & valid[None, :], s, float("-inf"))
    # Each row sees >= 1 key by the time any masked tile runs (see the kernel), so m_new stays finite.
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if MASKED:
        v = tl.load(v_ptrs, mask=valid[:, None], other=0.0).to(q.dtype)
    else:
        v = tl.load(v_ptrs).to(q.dtype)
    acc = acc * alpha[:, None] + tile_dot(p.to(v.dtype), v, PRECISION)
    return acc, m_new, l_i


@triton.jit
def _attend_new_tile(
    q, acc, m_i, l_i, kn_head, vn_head, q_start, start, new_end, offs_m, scale_log2, stride_knt, stride_vnt,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, PRECISION: tl.constexpr,
):
    """One online-softmax step over new tokens ``[start, start + BLOCK_N)`` of the segment (offsets from its first new
    token), read from the contiguous ``k_new``/``v_new`` rows; MASKED applies bounds and causality."""
    offs_d = tl.arange(0, HEAD_DIM)
    j = start + tl.arange(0, BLOCK_N)
    rows = (q_start + j).to(tl.int64)
    if MASKED:
        valid = j < new_end
        k = tl.load(kn_head + (rows * stride_knt)[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        v = tl.load(vn_head + (rows * stride_vnt)[:, None] + offs_d[None, :], mask=valid[:, None], other=0.0)
        keep = (j[None, :] <= offs_m[:, None]) & valid[None, :]
    else:
        k = tl.load(kn_head + (rows * stride_knt)[:, None] + offs_d[None, :])
        v = tl.load(vn_head + (rows * stride_vnt)[:, None] + offs_d[None, :])
        keep = j[None, :] >= 0
    m_i, l_i, acc = attend_tile(q, tl.trans(k.to(q.dtype)), v.to(q.dtype), keep, m_i, l_i, acc, scale_log2,
                                PRECISION)
    return acc, m_i, l_i


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, qstart_ptr, qlen_ptr, ctx_ptr, bt_ptr, kn_ptr, vn_ptr,
    scale_log2,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_bt,
    stride_knt, stride_knh, stride_vnt, stride_vnh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PACK_GQA: tl.constexpr, PRECISION: tl.constexpr,
    TILE: tl.constexpr, NEW_KV: tl.constexpr, ALL_MASKED: tl.constexpr,
):
    # PACK_GQA: a program owns one kv head and BLOCK_M // GROUP tokens x all GROUP query heads (row r is token
    # r // GROUP, head r % GROUP), so each K/V tile feeds GROUP heads. Otherwise it owns one query head, BLOCK_M tokens.
    r = tl.arange(0, BLOCK_M)
    if PACK_GQA:
        kvh = tl.program_id(0)
        head = kvh * GROUP + r % GROUP
        tok_in_block = r // GROUP
        tokens = BLOCK_M // GROUP
    else:
        head = tl.program_id(0)
        kvh = head // GROUP
        tok_in_block = r
        tokens = BLOCK_M
    m_block = tl.num_programs(1) - 1 - tl.program_id(1)
    seg = tl.program_id(2)
    q_len = tl.load(qlen_ptr + seg)
    m_lo = m_block * tokens
    if m_lo >= q_len:
        return
    q_start = tl.load(qstart_ptr + seg)
    ctx = tl.load(ctx_ptr + seg)

    offs_m = m_lo + tok_in_block
    offs_d = tl.arange(0, HEAD_DIM)
    m_valid = offs_m < q_len
    rows = (q_start + offs_m).to(tl.int64)
    q_ptrs = q_ptr + (rows * stride_qt + head * stride_qh)[:, None] + offs_d[None, :]
    q_in = tl.load(q_ptrs, mask=m_valid[:, None], other=0.0)
    q = q_in.to(TILE)  # TILE: see tile_dot.tile_dtype
    q_pos = ctx + offs_m
    bt_row = bt_ptr + seg.to(tl.int64) * stride_bt
    k_head = k_ptr + kvh * stride_kh
    v_head = v_ptr + kvh * stride_vh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    # Keys below ctx + m_lo are visible to every query of the block (all positions >= ctx + m_lo): whole tiles
    # there need no mask. The rest, up to the block's last valid position, is masked; its first tile starts at or
    # below every row's own position, so each row has a visible key before any fully masked tile can occur.
    if NEW_KV:
        # The context (keys below ctx, all visible) from the pages, then the segment's own tokens from k_new/v_new
        # in the query's dtype: causal self-attention over the chunk, unmasked below the block's first query.
        ctx_full = (ctx // BLOCK_N) * BLOCK_N
        for start in range(0, ctx_full, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, k_head, v_head, bt_row, start, ctx, q_pos, scale_log2,
                stride_kb, stride_kt, stride_vb, stride_vt, HEAD_DIM, PAGE, BLOCK_N, False, PRECISION,
            )
        for start in range(ctx_full, ctx, BLOCK_N):  # at most one tile, part context, masked to it
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, k_head, v_head, bt_row, start, ctx, q_pos, scale_log2,
                stride_kb, stride_kt, stride_vb, stride_vt, HEAD_DIM, PAGE, BLOCK_N, True, PRECISION,
            )
        kn_head = kn_ptr + kvh * stride_knh
        vn_head = vn_ptr + kvh * stride_vnh
        new_full = (m_lo // BLOCK_N) * BLOCK_N
        new_end = tl.minimum(q_len, m_lo + tokens)
        for start in range(0, new_full, BLOCK_N):
            acc, m_i, l_i = _attend_new_tile(
                q_in, acc, m_i, l_i, kn_head, vn_head, q_start, start, new_end, offs_m, scale_log2,
                stride_knt, stride_vnt, HEAD_DIM, BLOCK_N, False, PRECISION,
            )
        for start in range(new_full, new_end, BLOCK_N):
            acc, m_i, l_i = _attend_new_tile(
                q_in, acc, m_i, l_i, kn_head, vn_head, q_start, start, new_end, offs_m, scale_log2,
                stride_knt, stride_vnt, HEAD_DIM, BLOCK_N, True, PRECISION,
            )
    else:
        if ALL_MASKED:  # every tile through one code path (batch-invariant mode; see prefill_attention)
            full_end = 0
        else:
            full_end = ((ctx + m_lo) // BLOCK_N) * BLOCK_N
        kv_end = ctx + tl.minimum(q_len, m_lo + tokens)
        for start in range(0, full_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, k_head, v_head, bt_row, start, kv_end, q_pos, scale_log2,
                stride_kb, stride_kt, stride_vb, stride_vt, HEAD_DIM, PAGE, BLOCK_N, False, PRECISION,
            )
        for start in range(full_end, kv_end, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                q, acc, m_i, l_i, k_head, v_head, bt_row, start, kv_end, q_pos, scale_log2,
                stride_kb, stride_kt, stride_vb, stride_vt, HEAD_DIM, PAGE, BLOCK_N, True, PRECISION,
            )
    acc = acc / l_i[:, None]
    tl.store(
        out_ptr + (rows * stride_ot + head * stride_oh)[:, None] + offs_d[None, :],
        acc.to(out_ptr.dtype.element_ty), mask=m_valid[:, None],
    )


def _default_blocks(device: torch.device, max_q_len: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per device; the interpreter gets small tiles for tiny tests.

    Measured on an H200 (head_dim 128, bf16, triton 3.6; scripts/device/bench_attention.py --tune prefill): small
    KV tiles with a shallow pipeline win; 64-row query blocks for chunks <= 512 tokens (more programs), else 128.
    """
    if device.type != "cuda":
        return 16, 16, 4, 1
    if max_q_len <= 512:
        return 64, 32, 4, 2
    return 128, 32, 8, 2


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    q_start: torch.Tensor,
    q_len: torch.Tensor,
    ctx_len: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    max_q_len: int,
    *,
    block_m: int | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    pack_gqa: bool | None = None,
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    batch_invariant: bool = False,
) -> torch.Tensor:
    """Causal extend attention of S segments over their paged KV (context + the new tokens); returns ``out``.

    Args:
        q, out: ``[T, num_heads, head_dim]``; any row/head strides, unit stride along ``head_dim``.
        k_cache, v_cache: one layer's pages ``[num_blocks, block_size, num_kv_heads, head_dim]``, already holding
            the K/V of the new tokens at positions ``ctx_len[s] .. ctx_len[s] + q_len[s] - 1``.
        q_start, q_len, ctx_len: int32 ``[S]``; ``q_len[s] == 0`` skips segment ``s``.
        block_tables: int32 ``[S, max_blocks]``.
        max_q_len: static host bound on every ``q_len[s]``; fixes the grid (CUDA-graph capacity).
        block_m, block_n, num_warps, num_stages: tile overrides (tuning and tests); ``None`` = per-device default.
        pack_gqa: one program serves all query heads of a kv head (rows = tokens x heads), so each K/V tile is
            loaded once per group; needs a power-of-two group <= block_m. ``None`` = default.
        k_new, v_new: ``[T, num_kv_heads, head_dim]`` in the query's dtype, row ``q_start[s] + i`` the K (rotated)
            and V of segment ``s``'s new token ``i`` (both or neither): the new tokens attend each other through
            these instead of through the pages, and only the context comes from the cache. Under a float8 cache the
            chunk's own keys then keep 16-bit precision, and its tiles skip the widening that keeps float8 loads out
            of Triton's pipelined shared-memory path (the engine passes the rows of its fused QKV buffer).
        batch_invariant: make each query row's result independent of how the tokens are cut into segments and
            query blocks (``ops.batch_invariant``): one tile config whatever ``max_q_len`` is (the defaults are
            per length), KV tiles at absolute positions (so no ``k_new``/``v_new``, whose tiles start at the chunk),
            and every tile through the masked path, so a tile that one cut masks and another does not is computed
            alike (the two paths may contract multiply-adds differently). Tile arguments are then refused.
    """
    check_qo(q, out)
    page, group = check_kv_cache(q, k_cache, v_cache)
    if q_start.dim() != 1:
        raise AttentionInputError(f"q_start must be int32 [S], one entry per segment; got shape {tuple(q_start.shape)}")
    segments = q_start.shape[0]
    for name, t in (("q_start", q_start), ("q_len", q_len), ("ctx_len", ctx_len)):
        check_index(name, t, segments, q.device)
    check_index("block_tables", block_tables, segments, q.device, ndim=2)
    if max_q_len < 0:
        raise AttentionInputError(f"max_q_len must be >= 0, got {max_q_len}")
    new_kv = _check_new_kv(q, k_cache, k_new, v_new)
    if batch_invariant and (new_kv or any(a is not None for a in (block_m, block_n, num_warps, pack_gqa))):
        raise AttentionInputError("batch_invariant fixes the tiles and reads the new tokens from the pages: pass no "
                                  "k_new/v_new, block_m, block_n, num_warps or pack_gqa with it")
    if segments == 0 or max_q_len == 0:
        return out
    d_m, d_n, d_warps, d_stages = _default_blocks(q.device, 0 if batch_invariant else max_q_len)
    block_m, block_n = block_m or d_m, block_n or d_n
    for name, b in (("block_m", block_m), ("block_n", block_n)):
        if b < 16 or b & (b - 1):
            raise AttentionInputError(f"{name} must be a power of two >= 16, got {b}")
    if pack_gqa is None:
        pack_gqa = False
    if pack_gqa and (group & (group - 1) or group > block_m):
        raise AttentionInputError(
            f"pack_gqa needs a power-of-two GQA group <= block_m; got group {group}, block_m {block_m}"
        )
    tokens_per_block = block_m // group if pack_gqa else block_m
    grid = (k_cache.shape[2] if pack_gqa else q.shape[1], triton.cdiv(max_q_len, tokens_per_block), segments)
    kn, vn = (k_new, v_new) if new_kv else (q, q)  # unused pointers when NEW_KV is off
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, q_start, q_len, ctx_len, block_tables, kn, vn,
        scale * LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        kn.stride(0), kn.stride(1), vn.stride(0), vn.stride(1),
        GROUP=group, HEAD_DIM=q.shape[2], PAGE=page, BLOCK_M=block_m, BLOCK_N=block_n, PACK_GQA=pack_gqa,
        PRECISION=dot_precision(q.dtype, q.device, batch_invariant), TILE=tile_dtype(q.dtype, k_cache.dtype),
        NEW_KV=new_kv, ALL_MASKED=batch_invariant,
        num_warps=num_warps or d_warps, num_stages=num_stages or d_stages,
    )
    return out


def _check_new_kv(q: torch.Tensor, k_cache: torch.Tensor, k_new: torch.Tensor | None,
                  v_new: torch.Tensor | None) -> bool:
    """Whether the new tokens' K/V come from ``k_new``/``v_new`` (checked against ``q`` and the cache)."""
    if k_new is None and v_new is None:
        return False
    if k_new is None or v_new is None:
        raise AttentionInputError("pass both k_new and v_new, or neither")
    want = (q.shape[0], k_cache.shape[2], q.shape[2])
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if tuple(t.shape) != want or t.dtype != q.dtype or t.device != q.device or t.stride(-1) != 1:
            raise AttentionInputError(
                f"{name} must be [tokens, kv_heads, head_dim] = {list(want)} in the query's dtype {q.dtype} on "
                f"{q.device} with unit stride along head_dim; got {list(t.shape)} {t.dtype} on {t.device}, "
                f"strides {t.stride()}")
    return True
