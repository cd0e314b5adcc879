"""Host copies of running requests' KV, grown step by step from the rows ``kv_offload`` staged (paper §4.2.2), and
the background thread that does the copying.

Layout: one CPU buffer ``[layers, 2, capacity, kv_heads, head_dim]`` per request whose first ``num_tokens``
positions hold the request's KV (the layout ``HostKVCache`` stores, as a token slice of it), taken from the engine's
:class:`~nanoflow.engine.host_arena.HostArena` (pre-faulted, pinned on a GPU machine, recycled once nothing views
it) or, without one, a fresh pageable tensor. The capacity comes from a hint (prompt + max new tokens); the buffer
doubles when the hint was short. At a natural finish the cache receives ``view(n)`` — a slice of this very buffer,
no copy.

Split of the work: the engine thread only does bookkeeping. :meth:`HostKVCopy.plan` advances ``num_tokens`` (and
picks/grows the buffer) at once and returns the ``(dst, src)`` copies that make it true; the engine hands them to
the :class:`OffloadWorker`, one job per processed step, which performs them in submission order (torch CPU copies
release the GIL, so the copies overlap the engine loop). Anything that
reads a buffer waits for the job that last wrote it: ``HostKVCopy.tensor`` waits itself; a cache entry is stored
with a :class:`Ticket` as its ``ready`` object, which ``HostKVCache`` waits on before the entry is read. A job's
sources are views of a pinned staging slot; the runner waits (``ModelRunner.staging_guard``) for the last job that
reads a slot before it launches a step that overwrites it.

Invariant: once its jobs are done, the copy equals the request's device pages for every position it holds
(``gather_pages`` of its first ``num_tokens`` tokens): positions arrive in order, and a recomputed position overwrites
the older rows.
"""

from __future__ import annotations

import collections
import ctypes
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from nanoflow.engine.host_arena import HostArena

Copies = list[tuple[torch.Tensor, torch.Tensor]]  # (dst, src) pairs of one job; their destinations are disjoint


_FOREACH_COPY = getattr(torch, "_foreach_copy_", None)


def run_copies(copies: Copies) -> None:
    """Perform ``copies`` (disjoint destinations; jobs run one after another) in one torch call: the GIL is
    released once for the whole list, not once per request, so a busy engine thread cannot make every copy wait for a
    GIL switch interval."""
    if not copies:
        return
    if _FOREACH_COPY is not None:
        _FOREACH_COPY([d for d, _ in copies], [s for _, s in copies])
    else:
        for dst, src in copies:
            dst.copy_(src)


PARALLEL_BYTES = 8 << 20  # a job smaller than this is copied by one thread
_OPENMP: list[Any] = []


def _openmp() -> Any:
    """The OpenMP runtime torch loaded (ctypes handle), or None."""
    if not _OPENMP:
        lib = None
        try:
            with open("/proc/self/maps") as maps:
                paths = {line.split()[-1] for line in maps if "omp" in line.rsplit("/", 1)[-1]}
            for path in sorted(paths):
                name = path.rsplit("/", 1)[-1]
                if name.startswith(("libgomp", "libiomp", "libomp")):
                    lib = ctypes.CDLL(path)  # already loaded: the same instance torch uses
                    break
        except OSError:
            lib = None
        _OPENMP.append(lib)
    return _OPENMP[0]


def single_threaded_ops() -> None:
    """Make torch's CPU ops run on the calling thread alone. OpenMP's thread count is a per-thread setting;
    ``torch.set_num_threads`` would also change the default of every thread started later (e.g. a CPU engine's)."""
    torch.ones(1 << 16).add_(1)  # torch's one-time init for this thread first: it would reset the setting below
    lib = _openmp()
    if lib is not None:
        lib.omp_set_num_threads(1)


def default_copy_threads() -> int:
    """Copy threads of an offload worker: a quarter of the cores, 1 to 4 (the engine thread needs the rest)."""
    return max(1, min(4, (os.cpu_count() or 1) // 4))


def split_copies(copies: Copies, parts: int) -> list[Copies]:
    """``copies`` as at most ``parts`` groups of about equal bytes; a copy larger than a group's share is first cut
    along its first (layer) dimension. Destinations stay disjoint, so the groups may run at once."""
    nbytes = [s.numel() * s.element_size() for _, s in copies]
    share = max(sum(nbytes) // max(parts, 1), 1)
    pieces: list[tuple[int, torch.Tensor, torch.Tensor]] = []
    for (dst, src), nb in zip(copies, nbytes):
        k = min(src.shape[0], -(-nb // share)) if src.dim() and nb > share else 1
        if k > 1:
            pieces += [(d.numel() * d.element_size(), d, s) for d, s in zip(dst.chunk(k), src.chunk(k))]
        else:
            pieces.append((nb, dst, src))
    groups: list[Copies] = [[] for _ in range(parts)]
    load = [0] * parts
    for nb, dst, src in sorted(pieces, key=lambda p: -p[0]):  # largest first onto the lightest group
        i = load.index(min(load))
        groups[i].append((dst, src))
        load[i] += nb
    return [g for g in groups if g]


class OffloadWorker:
    """One daemon thread running jobs (callables) in submission order; ``submit`` returns a sequence number that
    :meth:`wait` takes. A failed job stops the thread and every later ``submit``/``wait`` raises ``RuntimeError``
    (chained to the job's exception) instead of hanging.

    :meth:`copy` (for jobs) performs a list of copies on ``copy_threads`` threads (this one and a pool), each copying
    single-threaded: torch's own intra-op threads would fork an OpenMP team for every small strided copy (one
    request's token is 64 strided 2 KB rows), and a team whose members wait for a core that is busy elsewhere stalls
    for a scheduler quantum (``scripts/bench_host_copy.py`` measures both ways)."""

    def __init__(self, name: str = "nanoflow-kv-offload", copy_threads: int | None = None) -> None:
        self.copy_threads = default_copy_threads() if copy_threads is None else max(1, int(copy_threads))
        self._pool = None
        if self.copy_threads > 1:
            self._pool = ThreadPoolExecutor(self.copy_threads - 1, thread_name_prefix=name + "-copy",
                                            initializer=single_threaded_ops)
        self._cond = threading.Condition()
        self._jobs: collections.deque[Callable[[], Any]] = collections.deque()
        self._submitted = 0
        self._done = 0
        self._error: BaseException | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, job: Callable[[], Any]) -> int:
        with self._cond:
            self._raise_if_failed()
            if self._closed:
                raise RuntimeError("the KV offload worker is closed")
            self._jobs.append(job)
            self._submitted += 1
            self._cond.notify_all()
            return self._submitted

    def done(self, seq: int) -> bool:
        """Whether job ``seq`` (and every earlier one) has run."""
        with self._cond:
            self._raise_if_failed()
            return self._done >= seq

    def wait(self, seq: int) -> None:
        """Block until job ``seq`` (and every earlier one) has run; ``seq <= 0`` returns at once."""
        with self._cond:
            while self._done < seq:
                self._raise_if_failed()
                if not self._thread.is_alive():
                    raise RuntimeError("the KV offload worker stopped with jobs pending")
                self._cond.wait()

    def drain(self) -> None:
        """Wait for every job submitted so far."""
        with self._cond:
            seq = self._submitted
        self.wait(seq)

    def copy(self, copies: Copies) -> None:
        """Perform ``copies`` (disjoint destinations) on the copy threads; returns when all are done."""
        if self._pool is None or sum(s.numel() * s.element_size() for _, s in copies) < PARALLEL_BYTES:
            run_copies(copies)
            return
        first, *rest = split_copies(copies, self.copy_threads)
        futures = [self._pool.submit(run_copies, group) for group in rest]
        run_copies(first)
        for f in futures:
            f.result()

    def close(self) -> None:
        """Run the jobs already submitted, then stop the thread (idempotent; a failed worker just stops)."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not threading.current_thread():
            self._thread.join()
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"the KV offload worker failed: {self._error!r}") from self._error

    def _loop(self) -> None:
        single_threaded_ops()  # see the class docstring
        while True:
            with self._cond:
                while not self._jobs and not self._closed:
                    self._cond.wait()
                if not self._jobs:
                    return  # closed and drained
                job = self._jobs[0]
            try:
                job()
            except BaseException as exc:  # surfaced to the engine thread by submit/wait
                with self._cond:
                    self._error = exc
                    self._jobs.clear()
                    self._cond.notify_all()
                return
            with self._cond:
                self._jobs.popleft()
                self._done += 1
                self._cond.notify_all()
            del job  # release its tensors now (e.g. a pinned block back to torch's caching host allocator)


class Ticket:
    """``synchronize()`` waits for job ``seq`` of ``worker``: the ``ready`` object of a cache entry whose bytes a
    worker job is still writing (``HostKVCache`` calls it before reading the entry)."""

    __slots__ = ("worker", "seq")

    def __init__(self, worker: OffloadWorker, seq: int) -> None:
        self.worker, self.seq = worker, seq

    def synchronize(self) -> None:
        self.worker.wait(self.seq)


class HostKVCopy:
    """KV of one request's first ``num_tokens`` positions in host memory; see the module docstring.

    With a ``worker``, :meth:`put` queues its copies there (``seq``: the last job writing this copy); without one it
    copies at once."""

    def __init__(self, capacity: int, seed: torch.Tensor | None = None, worker: OffloadWorker | None = None,
                 arena: HostArena | None = None) -> None:
        self.capacity = capacity
        self.buf: torch.Tensor | None = None
        self.num_tokens = 0
        self.worker = worker
        self.arena = arena
        self.seq = 0
        self.pending_save: tuple[list[int], str | None] | None = None
        """(token ids, namespace) of a save waiting for rows of steps still in flight (async scheduling)."""
        if seed is not None:
            self.put(0, seed)

    def plan(self, start: int, rows: torch.Tensor) -> Copies | None:
        """Account for ``rows [L, 2, n, H, D]`` as positions ``[start, start + n)`` and return the copies that store
        them (to run after every copy returned earlier; their destinations are disjoint). None, changing nothing, when
        ``start`` is past ``num_tokens`` (positions in between are missing: the copy can no longer be completed)."""
        if start > self.num_tokens:
            return None
        end = start + rows.shape[2]
        copies: Copies = []
        if self.buf is None or end > self.buf.shape[2]:
            size = max(end, self.capacity, 2 * (0 if self.buf is None else self.buf.shape[2]))
            shape = (*rows.shape[:2], size, *rows.shape[3:])
            grown = (self.arena.take(shape, rows.dtype) if self.arena is not None
                     else torch.empty(shape, dtype=rows.dtype))
            keep = min(self.num_tokens, start)
            if keep:
                copies.append((grown[:, :, :keep], self.buf[:, :, :keep]))
            self.buf = grown
        copies.append((self.buf[:, :, start:end], rows))
        self.num_tokens = end
        return copies

    def put(self, start: int, rows: torch.Tensor) -> bool:
        """Store ``rows`` as positions ``[start, start + n)`` (see :meth:`plan`); False when it refuses them."""
        copies = self.plan(start, rows)
        if copies is None:
            return False
        if self.worker is None:
            run_copies(copies)
        else:
            self.seq = self.worker.submit(lambda: self.worker.copy(copies))
        return True

    def wait(self) -> None:
        """Block until every copy queued for this host copy has run."""
        if self.worker is not None:
            self.worker.wait(self.seq)

    def view(self, num_tokens: int) -> torch.Tensor:
        """The first ``num_tokens`` positions as a view of the buffer (no copy): ``[L, 2, num_tokens, H, D]``, a token
        slice of a contiguous tensor. Its bytes are final once job ``seq`` has run (:meth:`wait`)."""
        if num_tokens > self.num_tokens or self.buf is None:
            raise ValueError(f"the host copy holds {self.num_tokens} tokens; {num_tokens} were asked for")
        return self.buf[:, :, :num_tokens]

    def tensor(self, num_tokens: int) -> torch.Tensor:
        """A new contiguous ``[L, 2, num_tokens, H, D]`` tensor of the first ``num_tokens`` positions (waits for the
        queued copies; checks and diagnostics — saves use :meth:`view`)."""
        view = self.view(num_tokens)
        self.wait()
        return view.clone(memory_format=torch.contiguous_format)
