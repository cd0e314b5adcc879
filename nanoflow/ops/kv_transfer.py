"""Moving one request's KV between the paged device cache and one contiguous buffer (paper §4.2.2).

The paged cache is ``kv_cache [num_layers, 2, num_blocks, block_size, kv_heads, head_dim]`` (contiguous); a request's
token ``p`` lives in slot ``block_ids[p // block_size] * block_size + p % block_size`` of every (layer, K/V) plane.
The contiguous form of its first ``n`` tokens is ``[num_layers, 2, n, kv_heads, head_dim]`` — the layout
``nanoflow.scheduler.offload.HostKVCache`` stores.

Offload: ``gather_pages`` (one kernel) -> one device->host copy into pinned memory, non-blocking (``to_host``, or
the engine's host arena) — the engine's fallback and swap-out path; normally each step's new KV already reaches host
memory inside the step (the ``kv_offload`` op of ``models/layers.py``).
Load: ``to_device`` (one host->device copy into a device buffer: DMA from pinned memory, pageable memory through a
reused pinned bounce block) -> ``scatter_pages`` (one kernel writes the pages). The paper measures 7-10x the
host->device bandwidth of copying page by page into the fragmented destinations; ``scatter_pages_pagewise`` is that
page-by-page baseline (``scripts/device/bench_offload.py``).

Every copy is issued on the current stream, so it is ordered after the iterations already launched that write these
pages and before later ones that may reuse them (``BlockManager.free`` relies on that order).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

_MAX_BLOCK = 1024


class KVTransferError(ValueError):
    """Shapes, dtypes or page tables that do not fit the KV cache; the message says which."""


@triton.jit
def _page_copy_kernel(cache_ptr, buf_ptr, slots_ptr, cache_stride_lk, buf_stride_lk, buf_stride_t,
                      HD: tl.constexpr, BLOCK: tl.constexpr, TO_CACHE: tl.constexpr):
    """One program copies ``BLOCK`` of the ``kv_heads * head_dim`` elements of one token in one (layer, K/V) plane."""
    t = tl.program_id(0)
    lk = tl.program_id(1).to(tl.int64)
    offs = tl.program_id(2) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < HD
    slot = tl.load(slots_ptr + t).to(tl.int64)
    cache_off = lk * cache_stride_lk + slot * HD + offs
    buf_off = lk * buf_stride_lk + t.to(tl.int64) * buf_stride_t + offs
    if TO_CACHE:
        tl.store(cache_ptr + cache_off, tl.load(buf_ptr + buf_off, mask=mask), mask=mask)
    else:
        tl.store(buf_ptr + buf_off, tl.load(cache_ptr + cache_off, mask=mask), mask=mask)


def token_slots(block_ids: list[int], num_tokens: int, block_size: int, device: Any = "cpu") -> torch.Tensor:
    """int64 ``[num_tokens]``: the cache slot of each of the first ``num_tokens`` token positions."""
    need = -(-num_tokens // block_size)
    if need > len(block_ids):
        raise KVTransferError(f"{num_tokens} tokens need {need} pages of {block_size}; the table has {len(block_ids)}")
    blocks = torch.tensor(block_ids[:need], dtype=torch.int64)
    slots = (blocks[:, None] * block_size + torch.arange(block_size, dtype=torch.int64)[None, :]).flatten()
    return slots[:num_tokens].to(device)


def _check(kv_cache: torch.Tensor, block_ids: list[int], num_tokens: int) -> None:
    if kv_cache.dim() != 6 or kv_cache.shape[1] != 2 or not kv_cache.is_contiguous():
        raise KVTransferError(f"kv_cache must be a contiguous [L, 2, blocks, block_size, H, D] tensor, got "
                              f"{tuple(kv_cache.shape)} (contiguous={kv_cache.is_contiguous()})")
    if num_tokens < 0:
        raise KVTransferError(f"num_tokens must be >= 0, got {num_tokens}")
    num_blocks = kv_cache.shape[2]
    bad = [b for b in block_ids[: -(-num_tokens // kv_cache.shape[3])] if not 0 < b < num_blocks]
    if bad:
        raise KVTransferError(f"block ids {bad[:4]} are outside the usable pages [1, {num_blocks})")


def _check_buffer(kv_cache: torch.Tensor, buf: torch.Tensor, num_tokens: int) -> None:
    L, _, _, _, H, D = kv_cache.shape
    if buf.dim() != 5 or tuple(buf.shape[:2]) != (L, 2) or tuple(buf.shape[3:]) != (H, D) or buf.shape[2] < num_tokens:
        raise KVTransferError(f"buffer must be [{L}, 2, >={num_tokens}, {H}, {D}], got {tuple(buf.shape)}")
    if buf.dtype != kv_cache.dtype or buf.device != kv_cache.device:
        raise KVTransferError(f"buffer is {buf.dtype} on {buf.device}; the cache is {kv_cache.dtype} on "
                              f"{kv_cache.device}: copy it with to_device first")
    if buf.stride(4) != 1 or buf.stride(3) != D or buf.stride(2) != H * D or buf.stride(0) != 2 * buf.stride(1):
        raise KVTransferError(f"buffer strides {buf.stride()} are not those of a [L, 2, m, H, D] contiguous tensor "
                              "(or a token slice of one)")


def _launch(kv_cache: torch.Tensor, buf: torch.Tensor, block_ids: list[int], num_tokens: int, to_cache: bool) -> None:
    L, _, _, bs, H, D = kv_cache.shape
    hd = H * D
    block = min(triton.next_power_of_2(hd), _MAX_BLOCK)
    slots = token_slots(block_ids, num_tokens, bs, kv_cache.device)
    grid = (num_tokens, 2 * L, triton.cdiv(hd, block))
    _page_copy_kernel[grid](kv_cache, buf, slots, kv_cache.stride(1), buf.stride(1), buf.stride(2),
                            HD=hd, BLOCK=block, TO_CACHE=to_cache)


def _use_triton(kv_cache: torch.Tensor, impl: str) -> bool:
    if impl not in ("auto", "triton", "torch"):
        raise KVTransferError(f"impl must be auto, triton or torch, got {impl!r}")
    return impl == "triton" or (impl == "auto" and kv_cache.is_cuda)


def gather_pages(kv_cache: torch.Tensor, block_ids: list[int], num_tokens: int, impl: str = "auto") -> torch.Tensor:
    """A new contiguous ``[L, 2, num_tokens, H, D]`` tensor (on the cache's device) of a request's first tokens."""
    _check(kv_cache, block_ids, num_tokens)
    if not _use_triton(kv_cache, impl):
        return gather_pages_ref(kv_cache, block_ids, num_tokens)
    L, _, _, _, H, D = kv_cache.shape
    out = torch.empty((L, 2, num_tokens, H, D), dtype=kv_cache.dtype, device=kv_cache.device)
    if num_tokens:
        _launch(kv_cache, out, block_ids, num_tokens, to_cache=False)
    return out


def scatter_pages(kv_cache: torch.Tensor, src: torch.Tensor, block_ids: list[int], num_tokens: int,
                  impl: str = "auto") -> None:
    """Write the first ``num_tokens`` tokens of ``src [L, 2, m >= num_tokens, H, D]`` (on the cache's device) into
    the request's pages; other slots are untouched."""
    _check(kv_cache, block_ids, num_tokens)
    _check_buffer(kv_cache, src, num_tokens)
    if not _use_triton(kv_cache, impl):
        scatter_pages_ref(kv_cache, src, block_ids, num_tokens)
    elif num_tokens:
        _launch(kv_cache, src, block_ids, num_tokens, to_cache=True)


# ---- torch reference and the page-by-page baseline -----------------------------------------------------------------
def gather_pages_ref(kv_cache: torch.Tensor, block_ids: list[int], num_tokens: int) -> torch.Tensor:
    """Torch reference of :func:`gather_pages` (advanced indexing over the flattened slots)."""
    L, _, nb, bs, H, D = kv_cache.shape
    slots = token_slots(block_ids, num_tokens, bs, kv_cache.device)
    return kv_cache.view(L, 2, nb * bs, H, D)[:, :, slots].contiguous()


def scatter_pages_ref(kv_cache: torch.Tensor, src: torch.Tensor, block_ids: list[int], num_tokens: int) -> None:
    """Torch reference of :func:`scatter_pages`."""
    L, _, nb, bs, H, D = kv_cache.shape
    slots = token_slots(block_ids, num_tokens, bs, kv_cache.device)
    kv_cache.view(L, 2, nb * bs, H, D)[:, :, slots] = src[:, :, :num_tokens]


def scatter_pages_pagewise(kv_cache: torch.Tensor, host: torch.Tensor, block_ids: list[int], num_tokens: int) -> None:
    """Baseline: copy straight from host memory into each fragmented page, one copy per (layer, K/V, page)."""
    _check(kv_cache, block_ids, num_tokens)
    L, _, _, bs, _, _ = kv_cache.shape
    for j in range(-(-num_tokens // bs)):
        lo, hi = j * bs, min((j + 1) * bs, num_tokens)
        b = block_ids[j]
        for layer in range(L):
            for kv in range(2):
                kv_cache[layer, kv, b, : hi - lo].copy_(host[layer, kv, lo:hi], non_blocking=True)


# ---- host <-> device -----------------------------------------------------------------------------------------------
def to_host(buf: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Copy a device buffer into (pinned) host memory without blocking. Returns ``(host, event)``; call
    ``event.synchronize()`` before reading ``host`` (``event`` is None when no wait is needed)."""
    if buf.device.type != "cuda":
        return buf.detach().clone(), None
    host = torch.empty(buf.shape, dtype=buf.dtype, pin_memory=True)
    host.copy_(buf, non_blocking=True)
    event = torch.cuda.Event()
    event.record()
    return host, event


def to_device(host: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """One host->device copy into a new device buffer, never blocking on queued GPU work.

    Pinned memory (e.g. the host KV arena) is copied by DMA straight from where it lies; a token slice
    ``[L, 2, n, H, D]`` of a pinned ``[L, 2, m, H, D]`` tensor copies the whole dense ``m``-token tensor and returns
    the slice of the copy (``m - n`` extra tokens beat a CPU copy of the ``n``). The caller keeps ``host`` alive until
    the copy has completed (an event recorded after this call). A pageable (or otherwise non-dense) ``host`` is
    first copied into a pinned bounce block of torch's caching host allocator: the non-blocking copy records an event
    on that block, which is reused by later calls once the copy is done (no pinned allocation per call). A copy
    straight from pageable memory would wait for every iteration in flight on the stream."""
    device = torch.device(device)
    if device.type == "cpu":
        return host
    if host.is_pinned():
        if host.is_contiguous():
            return host.to(device, non_blocking=True)
        dense = _dense_token_cover(host)
        if dense is not None:
            return dense.to(device, non_blocking=True)[:, :, :host.shape[2]]
    bounce = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
    return bounce.copy_(host).to(device, non_blocking=True)


def _dense_token_cover(t: torch.Tensor) -> torch.Tensor | None:
    """For a token slice ``x[:, :, :n]`` of a contiguous ``x`` of shape ``[L, 2, m, H, D]``: ``x`` (same storage);
    else None."""
    if t.dim() != 5:
        return None
    L, two, n, H, D = t.shape
    hd = H * D
    s0, s1, s2, s3, s4 = t.stride()
    if s4 != 1 or s3 != D or s2 != hd or s1 % hd or s0 != two * s1:
        return None
    if (t.storage_offset() + L * s0) * t.element_size() > t.untyped_storage().nbytes():
        return None  # not cut from the start of such a tensor
    return t.as_strided((L, two, s1 // hd, H, D), t.stride())
