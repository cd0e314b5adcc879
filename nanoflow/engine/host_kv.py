"""The host copy of one running request's KV, grown step by step from the rows ``kv_offload`` staged (paper §4.2.2).

Layout: one CPU buffer ``[layers, 2, capacity, kv_heads, head_dim]`` whose first ``num_tokens`` positions hold the
request's KV (the layout ``HostKVCache`` stores). Each step's rows are copied straight from the staging slot into
it (one copy per request and step; the staging slot is reused two steps later). The capacity comes from a hint
(prompt + max new tokens): the OS backs only the pages written, so a generous hint costs address space, not memory;
the buffer doubles when the hint was short.

Invariant: the copy equals the request's device pages for every position it holds (``gather_pages`` of its first
``num_tokens`` tokens): positions arrive in order, and a recomputed position overwrites the older rows.
"""

from __future__ import annotations

import torch


class HostKVCopy:
    """KV of one request's first ``num_tokens`` positions in host memory; see the module docstring."""

    def __init__(self, capacity: int, seed: torch.Tensor | None = None) -> None:
        self.capacity = capacity
        self.buf: torch.Tensor | None = None
        self.num_tokens = 0
        self.pending_save: tuple[list[int], str | None] | None = None
        """(token ids, namespace) of a save waiting for rows of steps still in flight (async scheduling)."""
        if seed is not None:
            self.put(0, seed)

    def put(self, start: int, rows: torch.Tensor) -> bool:
        """Store ``rows [L, 2, n, H, D]`` as positions ``[start, start + n)``. Returns False, storing nothing, when
        ``start`` is past ``num_tokens`` (positions in between are missing: the copy can no longer be completed)."""
        if start > self.num_tokens:
            return False
        end = start + rows.shape[2]
        if self.buf is None or end > self.buf.shape[2]:
            size = max(end, self.capacity, 2 * (0 if self.buf is None else self.buf.shape[2]))
            grown = torch.empty((*rows.shape[:2], size, *rows.shape[3:]), dtype=rows.dtype)
            if self.num_tokens:
                grown[:, :, :self.num_tokens].copy_(self.buf[:, :, :self.num_tokens])
            self.buf = grown
        self.buf[:, :, start:end].copy_(rows)
        self.num_tokens = end
        return True

    def tensor(self, num_tokens: int, pin: bool = False) -> torch.Tensor:
        """A new contiguous ``[L, 2, num_tokens, H, D]`` tensor of the first ``num_tokens`` positions (pinned memory
        when ``pin``, so a later host->device load does not block)."""
        if num_tokens > self.num_tokens or self.buf is None:
            raise ValueError(f"the host copy holds {self.num_tokens} tokens; {num_tokens} were asked for")
        b = self.buf
        out = torch.empty((*b.shape[:2], num_tokens, *b.shape[3:]), dtype=b.dtype, pin_memory=pin)
        return out.copy_(b[:, :, :num_tokens])
