"""The host copy of one running request's KV, grown step by step from the rows ``kv_offload`` staged (paper §4.2.2).

Layout: the KV of positions ``[0, num_tokens)`` as ``[layers, 2, num_tokens, kv_heads, head_dim]`` (what
``HostKVCache`` stores), held in chunks along the token axis:

* ``owned`` chunks belong to this copy alone (a reused prefix seeded from the host cache, merged rows);
* ``shared`` chunks are views into one step's gathered rows, which the step's other requests share. Once they add up
  to a block they are merged into one owned chunk, so a long-running request keeps few step tensors alive (and with
  them the rows of requests that are gone).

Invariant: the copy equals the request's device pages for every position it holds (``gather_pages`` of its first
``num_tokens`` tokens), because positions arrive in order and a rewritten position replaces the older rows.
"""

from __future__ import annotations

import torch


class HostKVCopy:
    """KV of one request's first ``num_tokens`` positions in host memory; see the module docstring."""

    def __init__(self, block_size: int, seed: torch.Tensor | None = None) -> None:
        self.block_size = block_size
        self.owned: list[torch.Tensor] = [] if seed is None else [seed]
        self.shared: list[torch.Tensor] = []
        self.num_tokens = 0 if seed is None else seed.shape[2]
        self._shared_tokens = 0
        self.pending_save: tuple[list[int], str | None] | None = None
        """(token ids, namespace) of a save waiting for rows of steps still in flight (async scheduling)."""

    def put(self, start: int, rows: torch.Tensor) -> bool:
        """Store ``rows [L, 2, n, H, D]`` as positions ``[start, start + n)``. Returns False, storing nothing, when
        ``start`` is past ``num_tokens`` (positions in between are missing: the copy can no longer be completed)."""
        if start > self.num_tokens:
            return False
        if start < self.num_tokens:  # recomputed positions: the newest rows are what the pages hold
            self.owned, self.shared, self._shared_tokens = [self.tensor(start)], [], 0
            self.num_tokens = start
        n = rows.shape[2]
        self.shared.append(rows)
        self._shared_tokens += n
        self.num_tokens += n
        if self._shared_tokens >= self.block_size:
            self.owned.append(torch.cat(self.shared, dim=2))
            self.shared, self._shared_tokens = [], 0
        return True

    def tensor(self, num_tokens: int, pin: bool = False) -> torch.Tensor:
        """A new contiguous ``[L, 2, num_tokens, H, D]`` tensor of the first ``num_tokens`` positions (pinned memory
        when ``pin``, so a later host->device load does not block)."""
        if num_tokens > self.num_tokens:
            raise ValueError(f"the host copy holds {self.num_tokens} tokens; {num_tokens} were asked for")
        parts, left = [], num_tokens
        for chunk in self.owned + self.shared:
            if left == 0:
                break
            take = min(left, chunk.shape[2])
            parts.append(chunk[:, :, :take])
            left -= take
        first = (self.owned + self.shared)[0]
        out = torch.empty((*first.shape[:2], num_tokens, *first.shape[3:]), dtype=first.dtype, pin_memory=pin)
        return torch.cat(parts, dim=2, out=out) if parts else out
