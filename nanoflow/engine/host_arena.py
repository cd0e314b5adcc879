"""One pre-faulted (pinned, on a GPU machine) host-memory arena for the KV offload path's buffers.

Why: every byte of KV that leaves the GPU lands in a host buffer. A fresh ``torch.empty`` is backed by pages the OS
maps and zeroes on first write, so writing into it runs at page-fault speed (``scripts/bench_host_copy.py``: 1.6-2.7
GB/s into fresh pages on a 2-core CPU, 4-5 GB/s into mapped ones), and the H200 offload run of session 2 lost 31% of
its throughput waiting for those copies. The arena maps its memory once, up front, in a background thread (pinning
it where CUDA is available, so device<->host copies can use DMA straight from it), and hands out ranges of it again
and again: after warm-up no KV copy touches a fresh page.

Ownership is Python's: :meth:`HostArena.take` returns a tensor whose storage is a ``torch.frombuffer`` view of one
numpy slice of the arena; a ``weakref.finalize`` on that slice gives its bytes back when the last tensor viewing them
is gone (cache entry evicted, host copy dropped, ...). No caller frees anything, and a range is never reused while
any view of it is alive. A device copy still in flight reads memory no Python object may be holding any more:
:meth:`hold` keeps a tensor alive until a CUDA event has completed.

When the arena is not ready yet or has no free range large enough, ``take`` returns a fresh ``torch.empty`` (today's
behaviour) and counts a fallback: correct, only slower.
"""

from __future__ import annotations

import bisect
import collections
import logging
import threading
import weakref
from typing import Any

import torch

log = logging.getLogger("nanoflow")

ALIGN = 64 << 10  # ranges start on 64 KiB boundaries


class HostArena:
    """``nbytes`` of host memory handed out as tensors (see the module docstring).

    ``pin``: page-locked memory (needs CUDA); else pageable memory that a background thread writes once so every page
    is mapped. ``background=False`` allocates in the constructor (tests, benchmarks)."""

    def __init__(self, nbytes: int, pin: bool = False, background: bool = True) -> None:
        if nbytes < 0:
            raise ValueError(f"arena size must be >= 0 bytes, got {nbytes}")
        self.nbytes = nbytes // ALIGN * ALIGN
        self.pin = pin
        self._lock = threading.Lock()
        self._free: list[tuple[int, int]] = []  # (offset, size), sorted by offset, coalesced
        self._np: Any = None  # numpy uint8 view of the arena once it is ready
        self._storage: torch.Tensor | None = None
        self._holds: list[tuple[Any, Any]] = []  # (event, tensor) kept alive until the event completes
        # Ranges given back by finalizers, merged into _free under the lock later: a finalizer may run in any thread,
        # at any allocation (cyclic GC), even inside a locked section of this thread.
        self._released: collections.deque[tuple[int, int]] = collections.deque()
        self._closed = False
        self.in_use = 0
        self.peak_in_use = 0
        self.stats_taken = 0
        self.stats_fallbacks = 0
        self.error: str | None = None
        self._thread: threading.Thread | None = None
        if self.nbytes == 0:
            return
        if background:
            self._thread = threading.Thread(target=self._allocate, name="nanoflow-host-arena", daemon=True)
            self._thread.start()
        else:
            self._allocate()

    @property
    def ready(self) -> bool:
        return self._np is not None

    def wait_ready(self, timeout: float | None = None) -> bool:
        if self._thread is not None:
            self._thread.join(timeout)
        return self.ready

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised tensor of ``shape``: a range of the arena, or a fresh ``torch.empty`` when none fits."""
        nbytes = max(1, torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()
        offset = self._alloc(nbytes)
        if offset is None:
            self.stats_fallbacks += 1
            return torch.empty(shape, dtype=dtype)
        size = -(-nbytes // ALIGN) * ALIGN
        piece = self._np[offset:offset + nbytes]
        weakref.finalize(piece, self._release, offset, size)
        self.stats_taken += 1
        return torch.frombuffer(piece, dtype=dtype).view(shape)

    def owns(self, t: torch.Tensor) -> bool:
        """Whether ``t``'s bytes lie in this arena."""
        if self._storage is None or t.numel() == 0:
            return False
        base = self._storage.data_ptr()
        return base <= t.data_ptr() < base + self.nbytes

    def hold(self, t: torch.Tensor, event: Any) -> None:
        """Keep ``t`` (and so its range) alive until ``event`` (a ``torch.cuda.Event`` recorded after the copy that
        reads or writes it) has completed."""
        if event is None:
            return
        with self._lock:
            self._holds.append((event, t))
            self._reap()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._reap()
            self._collect()
            return {"arena_bytes": self.nbytes, "arena_pinned": self.pin, "arena_ready": self.ready,
                    "arena_in_use": self.in_use, "arena_peak_in_use": self.peak_in_use,
                    "arena_taken": self.stats_taken, "arena_fallbacks": self.stats_fallbacks,
                    "arena_error": self.error}

    def close(self) -> None:
        """Stop handing out ranges (those out stay valid until their tensors are gone)."""
        self._closed = True
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()

    # ---- internals -------------------------------------------------------------------------------------------
    def _allocate(self) -> None:
        step = 128 << 20
        try:
            storage = torch.empty(self.nbytes, dtype=torch.uint8)
            for lo in range(0, self.nbytes, step):  # write every page once: all mapped from now on
                storage[lo:lo + step].zero_()
                if self._closed:
                    return
            if self.pin:  # page-lock it in place (torch's pinned allocator would round large sizes up)
                ptr = storage.data_ptr()
                err = int(torch.cuda.cudart().cudaHostRegister(ptr, self.nbytes, 0))
                if err == 0:
                    weakref.finalize(storage, _unregister, ptr)  # before the memory goes back to the OS
                else:  # still mapped once and recycled; copies to and from the GPU bounce through pinned blocks
                    self.pin = False
                    self.error = f"cudaHostRegister failed with CUDA error {err}; the arena stays pageable"
                    log.warning("host KV arena: %s", self.error)
        except (RuntimeError, MemoryError) as exc:  # no room (pinned memory is limited): run without the arena
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("host KV arena of %.1f GiB could not be allocated (%s); KV offload uses fresh buffers",
                        self.nbytes / 2**30, self.error)
            return
        with self._lock:
            self._storage = storage
            self._free = [(0, self.nbytes)]
            self._np = storage.numpy()

    def _alloc(self, nbytes: int) -> int | None:
        size = -(-nbytes // ALIGN) * ALIGN
        with self._lock:
            if self._np is None or self._closed:
                return None
            self._reap()
            self._collect()
            for i, (off, free) in enumerate(self._free):  # first fit
                if free >= size:
                    if free == size:
                        del self._free[i]
                    else:
                        self._free[i] = (off + size, free - size)
                    self.in_use += size
                    self.peak_in_use = max(self.peak_in_use, self.in_use)
                    return off
        return None

    def _release(self, offset: int, size: int) -> None:
        self._released.append((offset, size))  # atomic; merged by _collect

    def _collect(self) -> None:
        """Merge the released ranges into the sorted, coalesced free list (lock held)."""
        while self._released:
            offset, size = self._released.popleft()
            self.in_use -= size
            i = bisect.bisect_left(self._free, (offset, 0))
            self._free.insert(i, (offset, size))
            if i + 1 < len(self._free) and offset + size == self._free[i + 1][0]:  # merge with the next range
                self._free[i] = (offset, size + self._free.pop(i + 1)[1])
            if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:  # and with the previous one
                prev = self._free[i - 1]
                self._free[i - 1] = (prev[0], prev[1] + self._free.pop(i)[1])

    def _reap(self) -> None:
        """Drop the holds whose events have completed (lock held)."""
        if self._holds:  # dropping a tensor here only queues its range (see _released)
            self._holds = [h for h in self._holds if not h[0].query()]


def _unregister(ptr: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(ptr)
