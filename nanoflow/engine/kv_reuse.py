"""KV reuse across conversation rounds and swap-on-preemption, on top of the plain engine (paper §4.2.2).

Data flow:

* simultaneous offload (on by default): every layer's ``kv_offload`` nano-op copies the K/V that ``rope_kv`` just wrote
  for the step's tokens to a pinned host staging buffer, on a copy stream while the FFN computes, inside the CUDA graph
  (``graphs.runner``; three staging slots used in turn, ``extra["kv_staging_slots"]``). When a step's results are
  processed, the engine thread only does bookkeeping (:meth:`HostKVCopy.plan <nanoflow.engine.host_kv.HostKVCopy.plan>`:
  which rows go where, positions advanced at once) and queues one job on the
  :class:`~nanoflow.engine.host_kv.OffloadWorker` thread, which copies the step's rows from the staging slot into each
  running request's :class:`~nanoflow.engine.host_kv.HostKVCopy`, a buffer of the engine's
  :class:`~nanoflow.engine.host_arena.HostArena` (mapped once, pinned on a GPU, recycled: no page faults). Before
  launching a step that rewrites a slot, the runner waits for the job that reads the slot's previous rows
  (``ModelRunner.staging_guard`` -> ``_guard_slot``), so the worker has about one step of GPU time per job (with two
  slots: only the CPU's planning time) before it could hold the engine back;
* a request that ends naturally (stop / length) saves the KV of its computed tokens (prompt + outputs, all layers) to
  the :class:`~nanoflow.scheduler.offload.HostKVCache`, keyed by those token ids and scoped by its conversation id:
  the entry is a token slice of its host copy's own buffer (no copy, no pinned allocation), stored at once with a
  :class:`~nanoflow.engine.host_kv.Ticket` of the worker job that writes its last rows; the cache waits on that
  ticket before anyone reads the entry (a lookup, the SSD writer), so lookups see every save as soon as it is made.
  With async scheduling the step launched after the one that finished it may still be writing its last token's KV:
  the save then waits for that step's rows (``HostKVCopy.pending_save``) and is made when they are queued. The bytes
  are those of ``gather_pages`` -> ``to_host`` while its pages are still owned (before ``Scheduler._finish`` frees
  them), which is the fallback (offload-in-graph off, or a host copy that missed rows): on a GPU the gather is copied
  straight into a pinned arena range that the cache keeps (without the arena: into a transient pinned block, then
  by a worker job into a pageable tensor);
* a waiting request is admitted with the longest stored block-aligned prefix of its prompt (at most ``prompt - 1``
  tokens, so its last token is still computed and sampled from): blocks are allocated for prefix + first chunk,
  ``to_device`` (DMA from a pinned arena range; else through a pinned bounce block) -> ``scatter_pages`` writes the
  stored KV into them, the same host tensor seeds its host copy (a worker job), and ``num_computed_tokens`` starts past
  the prefix, so only the new tokens are prefilled;
* a request preempted for lack of KV blocks first swaps its computed KV to the host cache (namespace
  ``swap:<request id>``) by ``gather_pages`` (the step in flight may still be writing its pages, so its host copy is
  not complete yet) and drops its host copy; when re-admitted it scatters that KV back instead of recomputing it (what
  the LRU lost, or a partial last block, is recomputed — correct either way).

Ordering: every device copy runs on the current stream, so it comes after the launched iterations that wrote those
pages and before any later iteration that reuses freed pages (the contract ``BlockManager.free`` documents). Worker
jobs run in submission order; a job that fails makes the next ``step`` (or cache read) raise ``RuntimeError``.
``close()`` finishes the queued jobs and stops the worker; ``run_until_done`` returns with the worker drained.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from pathlib import Path
from typing import Any

import torch

from nanoflow.config import ConfigError, EngineArgs
from nanoflow.engine.engine import Engine
from nanoflow.engine.host_arena import HostArena
from nanoflow.engine.host_kv import Copies, HostKVCopy, OffloadWorker, Ticket
from nanoflow.ops.kv_transfer import gather_pages, scatter_pages, to_device, to_host
from nanoflow.scheduler.batcher import Scheduler
from nanoflow.scheduler.offload import HostKVCache, PrefixHit
from nanoflow.scheduler.request import Request, RequestStatus

log = logging.getLogger("nanoflow")

_SAVE_ON = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)
_RUNNING = RequestStatus.RUNNING


class ReuseScheduler(Scheduler):
    """The dense-batch scheduler plus three hooks into a :class:`OffloadingEngine` (``kv``): save on a natural finish,
    swap out on preemption, and start admission past a reusable prefix. Everything else is the base scheduler."""

    def __init__(self, block_manager: Any, dense_batch_size: int, max_num_seqs: int, max_model_len: int,
                 kv: OffloadingEngine, decode_len_prior: float = 256.0, admission_pace: float = 0.0) -> None:
        super().__init__(block_manager, dense_batch_size, max_num_seqs, max_model_len, decode_len_prior,
                         admission_pace)
        self.kv = kv

    def _finish(self, req: Request, status: RequestStatus) -> None:
        if status in _SAVE_ON and req.block_ids:
            self.kv.save_finished(req)
        self.kv.forget(req)
        super()._finish(req, status)

    def _preempt(self, req: Request, preempted: list[str]) -> None:
        if req.block_ids:
            self.kv.swap_out(req)
        self.kv.drop_copy(req)
        super()._preempt(req, preempted)

    def _prefix_hit(self, req: Request, max_tokens: int) -> tuple[int, Any]:
        hit = self.kv.find_reusable(req, max_tokens)
        return (hit.num_tokens, hit) if hit is not None else (0, None)

    def _load_prefix(self, req: Request, hit: Any) -> None:
        self.kv.load(req, hit)


class OffloadingEngine(Engine):
    """An :class:`Engine` whose finished requests leave their KV in a host/SSD cache for the next round.

    ``add_request(..., conversation_id=...)`` (or ``SamplingParams.conversation_id``) scopes the lookups of that
    request and the entry it saves (None: one shared scope, so identical prefixes of unrelated requests are reused
    too). Single device only (``tp_size == 1``).
    Cache sizes come from ``host_cache`` or ``args.extra``: ``kv_host_bytes`` (default 1 GiB), ``kv_ssd_dir``,
    ``kv_ssd_bytes``. Host buffers come from one :class:`~nanoflow.engine.host_arena.HostArena` (``host_arena``, else
    one of ``extra["kv_host_arena_bytes"]`` bytes, default: the host tier plus the device KV cache, at most 60% of
    the machine's memory; pinned on CUDA; 0: fresh buffers). ``simultaneous_offload`` (else
    ``args.extra["simultaneous_offload"]``, default True) copies each step's new KV to host memory inside the step
    (module docstring); False saves by gathering the pages when a request finishes. Host-side copies run on a
    background :class:`~nanoflow.engine.host_kv.OffloadWorker` thread; ``close()`` stops it.
    """

    def __init__(self, args: EngineArgs, parts: dict[str, Any] | None = None, comm: Any = None, tp_rank: int = 0,
                 tp_size: int = 1, *, host_cache: HostKVCache | None = None, swap_on_preempt: bool = True,
                 simultaneous_offload: bool | None = None, host_arena: HostArena | None = None) -> None:
        if tp_size != 1:
            raise ConfigError("KV offload/reuse supports one device only; run with tp=1 or use the plain Engine")
        if simultaneous_offload is None:
            simultaneous_offload = _flag(args.extra.get("simultaneous_offload", True))
        self.simultaneous_offload = simultaneous_offload  # read by Engine.__init__ when it builds the runner
        super().__init__(args, parts, comm, tp_rank, tp_size)
        if host_cache is None:
            extra = args.extra
            ssd = extra.get("kv_ssd_dir")
            host_cache = HostKVCache(int(extra.get("kv_host_bytes", 1 << 30)), Path(ssd) if ssd else None,
                                     int(extra.get("kv_ssd_bytes", 0)), block_size=args.block_size)
        if host_cache.block_size != args.block_size:
            raise ConfigError(f"host cache block_size {host_cache.block_size} differs from the engine's "
                              f"{args.block_size}; build HostKVCache(block_size={args.block_size})")
        self.host_cache = host_cache
        self.swap_on_preempt = swap_on_preempt
        old = self.scheduler
        self.scheduler = ReuseScheduler(self.blocks, old.dense_batch_size, old.max_num_seqs, old.max_model_len, kv=self,
                                        decode_len_prior=old.decode_len_prior, admission_pace=old.admission_pace)
        self._conversation: dict[str, str | None] = {}
        self._copies: dict[str, HostKVCopy] = {}  # request id -> host copy of its KV (simultaneous offload)
        threads = args.extra.get("kv_copy_threads")  # default: a quarter of the cores, 1-4
        self._worker = OffloadWorker(copy_threads=None if threads is None else int(threads))
        weakref.finalize(self, self._worker.close).atexit = False  # an engine dropped unclosed stops its worker
        self._own_arena = host_arena is None
        self.host_arena = host_arena if host_arena is not None else self._default_arena()
        slots = 0 if self.runner.kv_staging is None else self.runner.kv_staging.shape[0]
        self._slot_jobs = [0] * slots  # per staging slot: the last worker job reading it
        if self.runner.kv_staging is not None:
            self.runner.staging_guard = self._guard_slot
        self.stats_reused_tokens = 0  # prefill tokens loaded from the cache instead of computed
        self.stats_saved_tokens = 0
        self.stats_swapped_out_tokens = 0
        self.stats_swapped_in_tokens = 0
        self.stats_saved_from_host_copy = 0  # saves served by the host copy (the rest gathered the device pages)
        self.stats_deferred_saves = 0  # of those, saves that waited for the rows of a step in flight
        self.stats_staging_waits = 0  # launches that waited for the worker to consume their staging slot
        self.stats_staging_wait_s = 0.0

    def add_request(self, prompt: Any, params: Any = None, request_id: str | None = None, on_output: Any = None,
                    *, conversation_id: str | None = None) -> Any:
        """``Engine.add_request`` plus ``conversation_id``, the scope of this request's KV lookups and saves (default:
        ``params.conversation_id``)."""
        if conversation_id is None and params is not None:
            conversation_id = getattr(params, "conversation_id", None)
        if request_id is None:
            request_id = f"req-{self._counter}"  # the id the base class would give; it still advances the counter
        if request_id not in self._tracked:
            self._conversation[request_id] = conversation_id
        return super().add_request(prompt, params, request_id, on_output)

    def _emit_finished(self, tr: Any) -> None:
        self._conversation.pop(tr.request.request_id, None)
        super()._emit_finished(tr)

    def close(self) -> None:
        self._worker.close()
        if self._own_arena:
            self.host_arena.close()
        self.runner.staging_guard = None
        self._copies.clear()
        super().close()

    def flush_offload(self) -> None:
        """Wait until the worker has run every queued copy (raises if it failed)."""
        self._worker.drain()

    def run_until_done(self, progress: Any = None) -> None:
        super().run_until_done(progress)
        self.flush_offload()

    def _guard_slot(self, slot: int) -> None:
        """Runner hook, just before launching a step that writes staging ``slot``: wait for the job reading it."""
        seq = self._slot_jobs[slot]
        if not self._worker.done(seq):
            t0 = time.perf_counter()
            self._worker.wait(seq)
            self.stats_staging_waits += 1
            self.stats_staging_wait_s += time.perf_counter() - t0

    def _process(self, plan: Any, result: Any) -> None:
        if result.kv_rows is not None:
            result.tokens()  # waits for the step: its staged rows are complete
            self._take_staged(plan, result.kv_rows, result.staging_slot)
        super()._process(plan, result)  # may finish requests, which then save from their host copies

    def _take_staged(self, plan: Any, kv_rows: torch.Tensor, slot: int) -> None:
        """Queue one worker job copying each request's rows of ``plan`` (staged in ``kv_rows``, staging slot
        ``slot``, in the runner's row order) into its host copy; make the saves those rows complete."""
        copies: Copies = []
        touched: list[HostKVCopy] = []
        saves: list[tuple[list[int], HostKVCopy, str | None]] = []
        row = 0
        for seq in plan.seqs:
            req, rid, n = seq.request, seq.request_id, seq.num_tokens
            copy = self._copies.get(rid)
            if seq.start == 0 and req.status is _RUNNING:
                copy = self._copies[rid] = HostKVCopy(self._capacity_hint(req), worker=self._worker,
                                                      arena=self.host_arena)
            # A preempted request's rows are stale (its copy was dropped); a finished one may still await rows.
            if copy is not None and (req.status is _RUNNING or copy.pending_save is not None):
                planned = copy.plan(seq.start, kv_rows[:, :, row:row + n])
                if planned is None:
                    log.debug("host KV copy of %s missed rows before %d; it will be gathered", rid, seq.start)
                    del self._copies[rid]
                else:
                    copies += planned
                    touched.append(copy)
                    if copy.pending_save is not None and copy.num_tokens >= len(copy.pending_save[0]):
                        tokens, namespace = copy.pending_save
                        del self._copies[rid]
                        saves.append((tokens, copy, namespace))
            row += n
        if not copies:
            return
        job = self._worker.submit(lambda: self._worker.copy(copies))
        self._slot_jobs[slot] = job
        for copy in touched:
            copy.seq = job
        for tokens, copy, namespace in saves:
            self._save(tokens, copy.view(len(tokens)), namespace, Ticket(self._worker, job))

    def reuse_stats(self) -> dict[str, Any]:
        """KV reuse counters for ``/metrics``: prefill tokens loaded instead of computed, tokens saved, host tier."""
        cache = self.host_cache.stats()
        return {"kv_reused_tokens": self.stats_reused_tokens, "kv_saved_tokens": self.stats_saved_tokens,
                "kv_host_tier_bytes": cache["host_bytes"], "kv_ssd_tier_bytes": cache["disk_bytes"]}

    def _default_arena(self) -> HostArena:
        extra = self.args.extra
        size = extra.get("kv_host_arena_bytes")
        if size is None:
            kv = self.runner.kv_cache
            kv_bytes = 0 if kv is None else kv.numel() * kv.element_size()
            phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            size = min(self.host_cache.capacity_bytes + kv_bytes, int(0.6 * phys))
        return HostArena(int(size), pin=self.device.type == "cuda")

    def _capacity_hint(self, req: Request) -> int:
        return min(req.num_prompt_tokens + req.sampling_params.max_tokens, self.max_model_len)

    # ---- hooks called by ReuseScheduler ------------------------------------------------------------------------
    def _gather(self, req: Request) -> tuple[list[int], Any, Any] | None:
        tokens = req.all_token_ids
        n = min(req.num_computed_tokens, len(tokens))  # pending tokens' KV may exist, their ids are not known yet
        if n < self.host_cache.block_size:
            return None
        gathered = gather_pages(self.runner.kv_cache, req.block_ids, n)
        if gathered.device.type != "cuda":
            return tokens[:n], gathered, None  # already a new host tensor
        host = self.host_arena.take(tuple(gathered.shape), gathered.dtype)
        if host.is_pinned():  # an arena range: the device->host copy lands where the cache keeps it
            host.copy_(gathered, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self.host_arena.hold(host, event)  # its range stays taken until the copy is done, whoever drops it
            return tokens[:n], host, event
        # A transient pinned block (torch's caching host allocator: reused once this copy is done, not one
        # allocation per save) -> the worker copies it into the pageable tensor the cache keeps.
        pinned, event = to_host(gathered)
        job = self._worker.submit(lambda: (event.synchronize(), host.copy_(pinned)))
        return tokens[:n], host, Ticket(self._worker, job)

    def _save(self, tokens: list[int], kv: Any, namespace: str | None, event: Any) -> None:
        if self.host_cache.put(tokens, kv, namespace, event):
            self.stats_saved_tokens += len(tokens)

    def save_finished(self, req: Request) -> None:
        """Save ``req``'s KV (called before its pages are freed): from its host copy when it has one, else gathered."""
        namespace = self._conversation.get(req.request_id)
        copy = self._copies.get(req.request_id)
        if copy is None:
            got = self._gather(req)
            if got is not None:
                self._save(got[0], got[1], namespace, got[2])
            return
        tokens = req.all_token_ids
        tokens = tokens[:min(req.num_computed_tokens, len(tokens))]
        if len(tokens) < self.host_cache.block_size:
            return
        self.stats_saved_from_host_copy += 1
        if copy.num_tokens >= len(tokens):
            self._save(tokens, copy.view(len(tokens)), namespace, Ticket(self._worker, copy.seq))
        else:  # a step in flight still writes its last rows; _take_staged makes the save
            copy.pending_save = (tokens, namespace)
            self.stats_deferred_saves += 1

    def swap_out(self, req: Request) -> None:
        if not self.swap_on_preempt:
            return
        got = self._gather(req)
        if got is not None and self.host_cache.put(got[0], got[1], _swap_space(req), got[2]):
            self.stats_swapped_out_tokens += len(got[0])

    def drop_copy(self, req: Request) -> None:
        """Forget ``req``'s host copy (preempted: recomputed or reloaded from the start)."""
        self._copies.pop(req.request_id, None)

    def forget(self, req: Request) -> None:
        """``req`` has finished: drop its swap space and its host copy (unless a save still waits for rows)."""
        copy = self._copies.get(req.request_id)
        if copy is not None and copy.pending_save is None:
            del self._copies[req.request_id]
        if req.num_preemptions:
            self.host_cache.discard_namespace(_swap_space(req))

    def find_reusable(self, req: Request, max_tokens: int) -> PrefixHit | None:
        """The longest stored prefix usable by ``req`` (its own swapped KV first, then its conversation's; not the
        conversation's for a request that asks for prompt logprobs, which needs its prompt computed)."""
        if max_tokens < self.host_cache.block_size:
            return None
        tokens = req.all_token_ids
        best = None
        if req.num_preemptions:
            best = self.host_cache.longest_prefix(tokens, _swap_space(req), max_tokens)
        if req.sampling_params.prompt_logprobs is not None:
            return best
        if best is None or best.num_tokens < max_tokens - self.host_cache.block_size + 1:
            hit = self.host_cache.longest_prefix(tokens, self._conversation.get(req.request_id), max_tokens)
            if hit is not None and (best is None or hit.num_tokens > best.num_tokens):
                best = hit
        return best

    def load(self, req: Request, hit: PrefixHit) -> None:
        """Scatter ``hit``'s KV into ``req``'s freshly allocated pages (called before ``num_computed_tokens`` moves)."""
        cache = self.runner.kv_cache
        kv = hit.kv[:, :, :hit.num_tokens]
        scatter_pages(cache, to_device(kv, cache.device), req.block_ids, hit.num_tokens)
        if cache.is_cuda:  # the host->device copy may read kv straight from its arena range: keep it until done
            event = torch.cuda.Event()
            event.record()
            self.host_arena.hold(kv, event)
        if self.simultaneous_offload:
            self._copies[req.request_id] = HostKVCopy(self._capacity_hint(req), kv, worker=self._worker,
                                                      arena=self.host_arena)
        if req.num_preemptions:
            self.stats_swapped_in_tokens += hit.num_tokens
            self.host_cache.discard_namespace(_swap_space(req))
        self.stats_reused_tokens += hit.num_tokens


def _flag(value: Any) -> bool:
    """A boolean option from ``EngineArgs.extra`` (JSON/CLI values: true/false, 1/0, "on"/"off")."""
    if isinstance(value, str):
        return value.strip().lower() not in ("0", "false", "off", "no", "")
    return bool(value)


def _swap_space(req: Request) -> str:
    return f"\x00swap:{req.request_id}"  # NUL: no user conversation id can collide
