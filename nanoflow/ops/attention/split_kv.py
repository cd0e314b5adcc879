"""Split-KV bookkeeping shared by the decode-attention launchers: the split count and its checks, the workspace of
per-split partial results, and the reduce kernel that combines a row's splits with log-sum-exp weights.

Splits are assigned per row from its own length (``cdiv(tiles, num_splits)`` tiles each); splits past the end exit
and the reduce kernel recomputes how many splits a row used, so no workspace entry is read that was not written.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from nanoflow.ops.attention.reference import AttentionInputError

MAX_SPLITS = 64


class DecodeWorkspace(NamedTuple):
    """Scratch for split-KV partial results; preallocate it once (static address) to capture CUDA graphs.

    ``partial_out``: ``[max_rows, num_heads, max_splits, head_dim]`` float32 (each split's normalised output);
    ``partial_lse``: ``[max_rows, num_heads, max_splits]`` float32 (each split's log2-sum-exp2 of scaled scores).
    """

    partial_out: torch.Tensor
    partial_lse: torch.Tensor


def decode_workspace(
    max_rows: int, num_heads: int, head_dim: int, num_splits: int, device: torch.device | str
) -> DecodeWorkspace:
    """Allocate scratch serving every call with at most ``max_rows`` rows and at most ``num_splits`` splits."""
    if max_rows < 0 or num_heads <= 0 or head_dim <= 0 or not 1 <= num_splits <= MAX_SPLITS:
        raise AttentionInputError(
            f"decode_workspace needs max_rows >= 0, positive heads/head_dim and 1 <= num_splits <= {MAX_SPLITS}; "
            f"got ({max_rows}, {num_heads}, {head_dim}, {num_splits})"
        )
    return DecodeWorkspace(
        torch.empty(max_rows, num_heads, num_splits, head_dim, dtype=torch.float32, device=device),
        torch.empty(max_rows, num_heads, num_splits, dtype=torch.float32, device=device),
    )


def default_num_splits(num_rows: int, num_kv_heads: int, device: torch.device | str) -> int:
    """Heuristic grid size: enough (row, kv head, split) programs to keep every SM busy for a few waves.

    Only shapes are used (never sequence lengths, which live on the device), so it is CUDA-graph safe.
    """
    device = torch.device(device)
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    programs = max(1, num_rows * num_kv_heads)
    # Two programs per SM keep HBM busy (measured: splitting 256+ rows x 8 kv heads only lost bandwidth on H100 and
    # H200); each extra split costs the reduce launch and partial-result traffic, which dominate short sequences.
    return max(1, min(MAX_SPLITS, 16, math.ceil(2 * sm_count / programs)))


def check_programs(max_programs: int) -> int:
    if max_programs < 1:
        raise AttentionInputError(f"max_programs must be >= 1, got {max_programs}")
    return max_programs


def check_splits(num_splits: int) -> int:
    if not 1 <= num_splits <= MAX_SPLITS:
        raise AttentionInputError(f"num_splits must be in [1, {MAX_SPLITS}], got {num_splits}")
    return num_splits


def check_block_n(block_n: int) -> int:
    if block_n < 16 or block_n & (block_n - 1):
        raise AttentionInputError(f"block_n must be a power of two >= 16, got {block_n}")
    return block_n


def _check_workspace(
    ws: DecodeWorkspace, rows: int, num_heads: int, head_dim: int, num_splits: int, device: torch.device
) -> None:
    po, plse = ws
    fits = (
        po.dim() == 4 and plse.dim() == 3 and po.shape[0] >= rows and plse.shape[0] >= rows
        and po.shape[1] == num_heads and plse.shape[1] == num_heads and po.shape[3] == head_dim
        and min(po.shape[2], plse.shape[2]) >= num_splits
        and po.dtype == torch.float32 and plse.dtype == torch.float32
        and po.device == device and plse.device == device and po.stride(3) == 1 and plse.stride(2) == 1
    )
    if not fits:
        raise AttentionInputError(
            f"workspace must come from decode_workspace(max_rows>={rows}, {num_heads}, {head_dim}, "
            f"num_splits>={num_splits}, {device}); got partial_out {tuple(po.shape)} {po.dtype} on {po.device}, "
            f"partial_lse {tuple(plse.shape)}"
        )


def split_outputs(out: torch.Tensor, workspace: DecodeWorkspace | None, num_splits: int) -> tuple:
    """``(direct, po, plse, partial_strides)`` for a kernel writing ``num_splits`` splits per row: with one split it
    writes ``out`` directly (the partial pointers are then never dereferenced; ``out`` keeps the signature uniform),
    otherwise the (checked or newly allocated) workspace. ``partial_strides``: the kernels' last stride arguments,
    ``partial_out`` (row, head, split) then ``partial_lse`` (row, head)."""
    if num_splits == 1:
        return True, out, out, (0, 0, 0, 0, 0)
    rows, num_heads, head_dim = out.shape
    if workspace is None:
        workspace = decode_workspace(rows, num_heads, head_dim, num_splits, out.device)
    _check_workspace(workspace, rows, num_heads, head_dim, num_splits, out.device)
    po, plse = workspace
    return False, po, plse, (*po.stride()[:3], *plse.stride()[:2])


def reduce_splits(seq_lens: torch.Tensor, out: torch.Tensor, po: torch.Tensor, plse: torch.Tensor,
                  partial_strides: tuple, num_splits: int, block_n: int) -> None:
    """Combine each row's splits into ``out`` (the writers split rows into tiles of ``block_n`` tokens)."""
    rows, num_heads, head_dim = out.shape
    _decode_reduce_kernel[(rows, num_heads)](
        seq_lens, out, po, plse, num_splits, *out.stride()[:2], *partial_strides,
        HEAD_DIM=head_dim, BLOCK_N=block_n, BLOCK_S=triton.next_power_of_2(num_splits),
        num_warps=1 if head_dim <= 64 else 2,
    )


@triton.jit
def split_tiles(seq_len, num_splits, BLOCK_N: tl.constexpr):
    """``(num_tiles, tiles_per_split)`` of a row of ``seq_len`` tokens in tiles of BLOCK_N over ``num_splits``
    splits: split ``s`` owns tiles ``[s * tiles_per_split, (s + 1) * tiles_per_split)``, clipped to ``num_tiles``."""
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    return num_tiles, tl.cdiv(num_tiles, num_splits)


@triton.jit
def split_range(lens_ptr, row, split, num_splits, BLOCK_N: tl.constexpr):
    """``(seq_len, tile_lo, tile_hi)`` of split ``split`` of ``row``: the KV tiles ``[tile_lo, tile_hi)`` it owns,
    each holding >= 1 valid token; empty (``tile_lo >= tile_hi``) when the row is empty (``seq_len <= 0``) or too
    short to reach this split. Every decode kernel's work item starts here."""
    seq_len = tl.load(lens_ptr + row)
    num_tiles, tiles_per_split = split_tiles(tl.maximum(seq_len, 0), num_splits, BLOCK_N)
    tile_lo = split * tiles_per_split
    return seq_len, tile_lo, tl.minimum(tile_lo + tiles_per_split, num_tiles)


@triton.jit
def _decode_reduce_kernel(
    lens_ptr, out_ptr, po_ptr, plse_ptr,
    num_splits,
    stride_ot, stride_oh,
    stride_pot, stride_poh, stride_pos,
    stride_plt, stride_plh,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(lens_ptr + row)
    if seq_len <= 0:
        return
    # Same split arithmetic as the writers: exactly the splits that wrote results are read.
    num_tiles, tiles_per_split = split_tiles(seq_len, num_splits, BLOCK_N)
    used = tl.cdiv(num_tiles, tiles_per_split)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_valid = offs_s < used
    row64 = row.to(tl.int64)
    lse = tl.load(plse_ptr + row64 * stride_plt + head * stride_plh + offs_s, mask=s_valid, other=float("-inf"))
    weight = tl.exp2(lse - tl.max(lse, 0))
    weight = weight / tl.sum(weight, 0)
    po = po_ptr + row64 * stride_pot + head * stride_poh + offs_s[:, None] * stride_pos + offs_d[None, :]
    parts = tl.load(po, mask=s_valid[:, None], other=0.0)
    result = tl.sum(parts * weight[:, None], 0)
    tl.store(out_ptr + row64 * stride_ot + head * stride_oh + offs_d, result.to(out_ptr.dtype.element_ty))
