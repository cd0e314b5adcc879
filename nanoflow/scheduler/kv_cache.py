"""Paged KV-cache block allocator: which fixed-size pages of the device cache each request owns.

The device cache (see :class:`nanoflow.config.CacheSpec`) holds ``num_blocks`` pages of ``block_size`` token slots.
Block 0 is the *null block*: padding tokens of a dense batch write their KV there, so it is never handed out and
usable blocks are ``1 .. num_blocks - 1``. A request's page table is ``request.block_ids``: token position ``p`` lives
in slot ``block_ids[p // block_size] * block_size + p % block_size``.

Invariants: every usable block is either free or in exactly one live request's ``block_ids``; allocation is
all-or-nothing; freeing a block that is already free raises :class:`BlockAllocationError` (a double free would hand
one page to two requests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nanoflow.scheduler.request import Request

NULL_BLOCK = 0


class BlockAllocationError(RuntimeError):
    """The block bookkeeping was misused (a block freed twice); a bug in the caller, not a capacity problem."""


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` token slots (0 for 0 tokens)."""
    return -(-num_tokens // block_size) if num_tokens > 0 else 0


class BlockManager:
    """Free-list allocator of KV pages. O(blocks moved) per call; no per-token work."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 2:
            raise ValueError(
                f"num_blocks must be an integer >= 2 (block 0 is the reserved null block), got {num_blocks!r}; "
                "give the KV cache more memory"
            )
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # A stack: blocks freed last are reused first (their pages are likely still in L2 / TLB).
        self._free: list[int] = list(range(num_blocks - 1, 0, -1))
        self._is_free = bytearray(b"\x01") * num_blocks
        self._is_free[NULL_BLOCK] = 0

    # ---- capacity ------------------------------------------------------------------------------------------
    @property
    def num_usable_blocks(self) -> int:
        """Blocks that can ever be handed out (all but the null block)."""
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - 1 - len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of usable blocks in use, in [0, 1]."""
        return self.num_used_blocks / (self.num_blocks - 1)

    @property
    def capacity_tokens(self) -> int:
        """Most token slots one request could ever hold (the whole usable cache)."""
        return (self.num_blocks - 1) * self.block_size

    def blocks_needed(self, request: Request, num_tokens_total: int) -> int:
        """New blocks ``request`` needs so that its table covers ``num_tokens_total`` token slots (>= 0)."""
        need = -(-num_tokens_total // self.block_size) - len(request.block_ids)
        return max(0, need)

    def can_allocate(self, n_blocks: int) -> bool:
        return n_blocks <= len(self._free)

    # ---- mutation ------------------------------------------------------------------------------------------
    def allocate(self, request: Request, num_tokens_total: int) -> bool:
        """Grow ``request.block_ids`` (in place) to cover ``num_tokens_total`` slots; False and no change if short."""
        need = -(-num_tokens_total // self.block_size) - len(request.block_ids)
        if need <= 0:
            return True
        free = self._free
        if need > len(free):
            return False
        taken = free[-need:]
        del free[-need:]
        is_free = self._is_free
        for b in taken:
            is_free[b] = 0
        request.block_ids.extend(taken)
        return True

    def free(self, request: Request) -> int:
        """Return all of ``request``'s blocks; returns how many. Freeing a request that holds none is a no-op.

        ``request.block_ids`` is *rebound* to a new empty list rather than cleared, so a ``BatchPlan`` that still
        holds the old list (an iteration in flight) keeps a valid page table: the GPU runs iterations in stream
        order, so a page reused by a later iteration is written only after the in-flight one is done with it.
        """
        blocks = request.block_ids
        if not blocks:
            return 0
        is_free = self._is_free
        # Check everything before changing anything, so a misuse leaves the allocator consistent.
        bad = [b for b in blocks if b <= NULL_BLOCK or b >= self.num_blocks or is_free[b]]
        if bad or len(set(blocks)) != len(blocks):
            raise BlockAllocationError(
                f"request {request.request_id!r} holds blocks {bad or blocks} that are free, invalid or repeated; "
                "a page table was shared or freed twice"
            )
        for b in blocks:
            is_free[b] = 1
        self._free.extend(reversed(blocks))
        request.block_ids = []
        return len(blocks)

    def __repr__(self) -> str:
        return (
            f"BlockManager(num_blocks={self.num_blocks}, block_size={self.block_size}, "
            f"used={self.num_used_blocks}, free={self.num_free_blocks})"
        )
