"""Dense-batch formation (paper §4.2.1): every iteration feeds exactly ``dense_batch_size`` tokens while work exists.

Data flow: waiting/running :class:`Request` s --``Scheduler.schedule()``--> :class:`BatchPlan` (tokens per request,
decode first, then prefill chunks) --runner--> ``ForwardBatch`` --GPU--> sampled ids --``Scheduler.update()``-->
requests advance or finish.

Order of filling one plan:

1. every running request whose prefill is done decodes one token (oldest admission first);
2. running requests still in prefill get chunks at token granularity (Sarathi-Serve), oldest first;
3. waiting requests are admitted FCFS while the *predicted peak* KV of running + candidate fits in the cache. As
   the paper puts it, the scheduler estimates each request's completion time from the average decode length: a
   request's predicted length is ``prompt + max(generated, min(max_tokens, average decode length of finished
   requests))`` (``decode_len_prior`` until one finishes), it grows by one token per iteration until then and frees
   its blocks at the end (:func:`~nanoflow.scheduler.memory.horizon`); the peak is the most the requests hold at
   once over that future (:func:`peak_blocks`), not the sum of their final lengths, which requests at different
   stages never reach together. A request whose length is known (``ignore_eos`` with no stop tokens or strings) is
   predicted at exactly ``max_tokens``.

Admission pacing (``admission_pace`` > 0): when the KV cache, not the dense batch, limits the running requests, a
greedy admission fills the cache with requests of one age, which then all grow to their peak together; admission stops
and the batch shrinks to decodes only until the cohort ends (waves). The paper's steady state (§4.1.1, the formula in
:mod:`~nanoflow.scheduler.memory`) holds ``R = kv_tokens / (p + d / 2)`` decoding requests and prefills ``R * p / d``
tokens an iteration, ``p`` and ``d`` the mean prompt and predicted decode lengths of the running requests. With
pacing, an iteration's prefill tokens (continued chunks first) admit new requests only up to ``admission_pace`` times
that rate, so admissions keep the pace at which requests can finish and their ages spread out. Where the cache holds
more than the dense batch can feed, the rate exceeds the batch and pacing never binds. Off by default: it removes
the waves but not steps (a finite run still ramps up and drains), and the simulations of session 18 predicted it
6% slower to 9% faster for Mixtral on one H200, by which step-time fit they used.

If a decode cannot get a KV block, the newest running request not yet in this plan is preempted (its blocks freed;
later recomputed from ``all_token_ids``; it goes to the front of the waiting queue). Nothing overtakes the head of
the waiting queue, so no request starves.

Asynchronous scheduling: ``schedule()`` for iteration i+1 may run before ``update()`` of iteration i. A decode whose
input is the token sampled in the previous iteration (not yet on the CPU) carries input id ``-1``; the runner takes it
from that iteration's sampled ids on the GPU. Tokens sampled for a request that has finished meanwhile are dropped.
The engine calls ``update(plan_i)`` exactly once per plan, in plan order.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from typing import NamedTuple

from nanoflow.scheduler.kv_cache import BlockManager
from nanoflow.scheduler.memory import horizon, peak_blocks, predicted_decode, steady_prefill_tokens
from nanoflow.scheduler.request import Request, RequestStatus

_RUNNING = RequestStatus.RUNNING
_NATURAL_ENDS = (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)


class ScheduledSeq(NamedTuple):
    """One request's contribution to a dense batch: tokens at positions ``[start, start + num_tokens)``.

    ``input_token_ids[k]`` is the token at position ``start + k``; ``-1`` (only as the single input of a decode)
    means "the token this request sampled in the previous iteration", resolved on the GPU. ``sample`` is True when
    the chunk ends at the request's last token, so the model samples the next one from its last position.
    ``block_table`` is the request's *live* page-table list (no copy, for speed): read it before the next
    ``schedule()``; its first ``ceil((start + num_tokens) / block_size)`` entries stay valid for this iteration even
    if the request finishes or is preempted (``BlockManager.free`` rebinds, never clears). ``request`` is the
    :class:`Request` itself (sampling parameters for the sampler; read it, never change it).
    """

    request_id: str
    start: int
    num_tokens: int
    input_token_ids: list[int]
    sample: bool
    block_table: list[int]
    request: Request


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """What iteration ``iteration`` runs. Token order in the dense batch is ``seqs``: all decodes, then prefill."""

    iteration: int
    decode: list[ScheduledSeq]
    prefill: list[ScheduledSeq]
    num_tokens: int
    dense_batch_size: int
    preempted: list[str]

    @property
    def seqs(self) -> list[ScheduledSeq]:
        return self.decode + self.prefill

    @property
    def num_decode_tokens(self) -> int:
        return len(self.decode)

    @property
    def num_prefill_tokens(self) -> int:
        return self.num_tokens - len(self.decode)


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class Scheduler:
    """Owns all live requests and the block manager; forms one :class:`BatchPlan` per iteration.

    Cost: ``schedule()`` is O(running requests + scheduled tokens) and ``update()`` O(sampled sequences); neither
    copies a prompt except the chunk slices it feeds.
    """

    def __init__(
        self,
        block_manager: BlockManager,
        dense_batch_size: int,
        max_num_seqs: int,
        max_model_len: int,
        decode_len_prior: float = 256.0,
        admission_pace: float = 0.0,
    ) -> None:
        self.block_manager = block_manager
        self.dense_batch_size = _positive_int("dense_batch_size", dense_batch_size)
        self.max_num_seqs = _positive_int("max_num_seqs", max_num_seqs)
        self.max_model_len = _positive_int("max_model_len", max_model_len)
        if not decode_len_prior > 0:
            raise ValueError(f"decode_len_prior must be > 0 tokens, got {decode_len_prior!r}")
        self.decode_len_prior = float(decode_len_prior)
        if isinstance(admission_pace, bool) or not isinstance(admission_pace, (int, float)) or not (
                0.0 <= admission_pace < float("inf")):
            raise ValueError(f"admission_pace must be a number >= 0 (0 turns pacing off), got {admission_pace!r}")
        self.admission_pace = float(admission_pace)
        # A request never holds more tokens than one cache can: beyond that it ends with "length", which keeps a
        # lone request always schedulable (so preemption can always make progress).
        self._len_limit = min(self.max_model_len, block_manager.capacity_tokens)
        self._running: dict[str, Request] = {}  # admission order: the last one is the newest
        self._waiting: deque[Request] = deque()  # FCFS; finished entries are dropped lazily when they reach the head
        self._num_waiting = 0
        self._live: dict[str, Request] = {}
        self._errored: list[Request] = []
        self._iteration = 0
        self._finished_decode_sum = 0
        self._finished_count = 0

    # ---- queries -------------------------------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    @property
    def iteration(self) -> int:
        """Index the next plan will carry."""
        return self._iteration

    @property
    def avg_decode_len(self) -> float:
        """Mean output length of requests that ended by stop or length; the prior until one has."""
        if self._finished_count == 0:
            return self.decode_len_prior
        return self._finished_decode_sum / self._finished_count

    def has_work(self) -> bool:
        """True while any request is live. ``schedule()`` may still return None (all running requests await their
        pending tokens): then call ``update()`` for the plan in flight and schedule again."""
        return bool(self._live)

    def get_request(self, request_id: str) -> Request | None:
        return self._live.get(request_id)

    def take_finished(self) -> list[Request]:
        """Requests finished outside ``update()`` (rejected at ``add_request``); each is returned once."""
        out, self._errored = self._errored, []
        return out

    # ---- lifecycle -----------------------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        """Queue ``req``; a prompt that can never run is finished with FINISHED_ERROR (see ``take_finished``)."""
        if req.request_id in self._live:
            raise ValueError(f"request id {req.request_id!r} is already live; give each request a unique id")
        if req.status is not RequestStatus.WAITING or req.output_token_ids or req.num_computed_tokens:
            raise ValueError(f"request {req.request_id!r} was already scheduled ({req.status.name}); submit a new one")
        error = self._prompt_error(req.prompt_token_ids)
        if error is not None:
            req.status = RequestStatus.FINISHED_ERROR
            req.error = error
            self._errored.append(req)
            return
        req._prefill_len = len(req.prompt_token_ids)
        self._live[req.request_id] = req
        self._waiting.append(req)
        self._num_waiting += 1

    def _prompt_error(self, prompt: list[int]) -> str | None:
        n = len(prompt)
        if n == 0:
            return "prompt is empty; give at least one token"
        if n > self.max_model_len:
            return f"prompt has {n:,} tokens; max_model_len is {self.max_model_len:,}: shorten the prompt"
        cap = self.block_manager.capacity_tokens
        if n > cap:
            return (
                f"prompt has {n:,} tokens but the whole KV cache holds {cap:,}; give the KV cache more memory "
                "(kv_cache_tokens) or shorten the prompt"
            )
        if min(prompt) < 0:
            return f"prompt has a negative token id ({min(prompt)}); token ids must be >= 0"
        return None

    def abort(self, request_id: str) -> Request | None:
        """Cancel a live request at any time (frees its blocks); None if it is unknown or already finished."""
        return self.finish_request(request_id, RequestStatus.FINISHED_ABORTED)

    def finish_request(self, request_id: str, status: RequestStatus) -> Request | None:
        """End a live request for a reason the engine detected itself (e.g. a stop string)."""
        if not status.is_finished:
            raise ValueError(f"finish_request needs a FINISHED_* status, got {status.name}")
        req = self._live.get(request_id)
        if req is None:
            return None
        self._finish(req, status)
        return req

    def _finish(self, req: Request, status: RequestStatus) -> None:
        was_running = req.status is _RUNNING
        req.status = status
        req.num_pending = 0  # tokens still in flight for it are dropped by update()
        self.block_manager.free(req)
        del self._live[req.request_id]
        if was_running:
            del self._running[req.request_id]
        else:
            self._num_waiting -= 1  # its deque entry is skipped when it reaches the head
        if status in _NATURAL_ENDS:
            self._finished_decode_sum += len(req.output_token_ids)
            self._finished_count += 1

    def _preempt(self, req: Request, preempted: list[str]) -> None:
        self.block_manager.free(req)
        req.num_computed_tokens = 0
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        del self._running[req.request_id]
        self._waiting.appendleft(req)
        self._num_waiting += 1
        preempted.append(req.request_id)

    def _newest_unscheduled(self) -> Request | None:
        it = self._iteration
        for req in reversed(self._running.values()):
            if req._last_iter != it:
                return req
        return None

    # ---- one iteration -------------------------------------------------------------------------------------
    def schedule(self) -> BatchPlan | None:
        """Form the next plan (see module docstring); None when no request can run a token now."""
        it = self._iteration
        bm = self.block_manager
        bs = bm.block_size
        limit = self._len_limit
        budget = self.dense_batch_size
        decode: list[ScheduledSeq] = []
        prefill: list[ScheduledSeq] = []
        preempted: list[str] = []
        prefilling: list[Request] = []

        # 1. decodes, oldest admission first. Preemption victims are newer, hence not yet visited.
        for req in list(self._running.values()):
            if budget == 0:
                break
            if req.status is not _RUNNING:
                continue
            computed = req.num_computed_tokens
            if computed < req._prefill_len:
                prefilling.append(req)
                continue
            pending = req.num_pending
            outputs = req.output_token_ids
            if len(outputs) + pending >= req.sampling_params.max_tokens:
                continue  # its last token is in flight; update() ends it
            if len(req.prompt_token_ids) + len(outputs) + pending >= limit:
                continue
            if pending and req._last_iter != it - 1:
                continue  # "-1" must name the previous iteration's sample; wait for update() instead
            if len(req.block_ids) * bs <= computed and not self._grow_or_preempt(req, computed + 1, preempted):
                continue  # req itself was preempted
            req.num_computed_tokens = computed + 1
            req.num_pending = pending + 1
            req._last_iter = it
            decode.append(ScheduledSeq(req.request_id, computed, 1, [-1 if pending else outputs[-1]], True,
                                       req.block_ids, req))
            budget -= 1

        # 2. continue partial prefills, oldest first.
        for req in prefilling:
            if budget == 0:
                break
            if req.status is not _RUNNING:
                continue
            n = self._fit_chunk(req, min(req._prefill_len - req.num_computed_tokens, budget), preempted)
            if n:
                prefill.append(self._prefill_seq(req, n, it))
                budget -= n

        # 3. admit waiting requests FCFS while the predicted peak KV fits (none after a preemption: memory is tight).
        if budget and self._num_waiting and not preempted and len(self._running) < self.max_num_seqs:
            budget = self._admit(budget, prefill, it)

        if not decode and not prefill:
            return None
        self._iteration = it + 1
        return BatchPlan(it, decode, prefill, self.dense_batch_size - budget, self.dense_batch_size, preempted)

    def _grow_or_preempt(self, req: Request, num_tokens: int, preempted: list[str]) -> bool:
        """Make ``req``'s table cover ``num_tokens`` slots, preempting the newest unscheduled request as needed.

        Returns False when ``req`` itself was the newest and got preempted."""
        bm = self.block_manager
        while not bm.allocate(req, num_tokens):
            victim = self._newest_unscheduled()
            assert victim is not None  # req itself is running and unscheduled
            self._preempt(victim, preempted)
            if victim is req:
                return False
        return True

    def _fit_chunk(self, req: Request, want: int, preempted: list[str]) -> int:
        """Allocate for up to ``want`` more prefill tokens of ``req``; shrink the chunk to the free blocks, and
        preempt newer unscheduled requests only when not even one token fits. Returns the chunk size (maybe 0)."""
        bm = self.block_manager
        computed = req.num_computed_tokens
        while True:
            fit = (len(req.block_ids) + bm.num_free_blocks) * bm.block_size - computed
            if fit > 0:
                n = min(want, fit)
                ok = bm.allocate(req, computed + n)
                assert ok  # fit counted exactly the free blocks
                return n
            victim = self._newest_unscheduled()
            if victim is None or victim is req:
                return 0
            self._preempt(victim, preempted)

    def _prefill_seq(self, req: Request, n: int, it: int) -> ScheduledSeq:
        start = req.num_computed_tokens
        end = start + n
        sample = end == req._prefill_len
        req.num_computed_tokens = end
        if sample:
            req.num_pending += 1
        req._last_iter = it
        return ScheduledSeq(req.request_id, start, n, req.token_slice(start, end), sample, req.block_ids, req)

    def _admit(self, budget: int, prefill: list[ScheduledSeq], it: int) -> int:
        avg = self.avg_decode_len
        held, remaining = [], []
        for r in self._running.values():
            h, left = horizon(r, avg, self._len_limit)
            held.append(h)
            remaining.append(left)
        if self.admission_pace and held:
            running = self._running.values()
            prompt_sum = sum(len(r.prompt_token_ids) for r in running)
            decode_sum = sum(predicted_decode(r, avg) for r in running)
            room = self.pace_tokens(prompt_sum / len(held), decode_sum / len(held))
            room -= sum(s.num_tokens for s in prefill)  # continued chunks take their share first
            if room <= 0:
                return budget
            if room < budget:  # admit within room; the rest of the budget stays unused this iteration
                return budget - (room - self._admit_fcfs(room, prefill, it, held, remaining, avg))
        return self._admit_fcfs(budget, prefill, it, held, remaining, avg)

    def pace_tokens(self, avg_prompt: float, avg_decode: float) -> int:
        """Prefill tokens an iteration may carry under admission pacing: ``admission_pace * R * p / d`` with
        ``R = capacity / (p + d / 2)`` requests decoding in the steady state (module docstring)."""
        rate = steady_prefill_tokens(self.block_manager.capacity_tokens, avg_prompt, avg_decode)
        return max(1, math.ceil(self.admission_pace * rate))

    def _admit_fcfs(self, budget: int, prefill: list[ScheduledSeq], it: int, held: list[int],
                    remaining: list[int], avg: float) -> int:
        bm = self.block_manager
        capacity = bm.num_usable_blocks
        waiting = self._waiting
        running = self._running
        while waiting and budget and len(running) < self.max_num_seqs:
            req = waiting[0]
            if req.status.is_finished:
                waiting.popleft()
                continue
            if req.num_pending:
                break  # preempted with tokens in flight: recompute needs them; FCFS, so nobody overtakes it
            h, left = horizon(req, avg, self._len_limit)
            # An empty engine admits the head regardless, so a long request cannot starve.
            if running and peak_blocks([*held, h], [*remaining, left], bm.block_size) > capacity:
                break
            req._prefill_len = len(req.prompt_token_ids) + len(req.output_token_ids)
            reused, hit = self._prefix_hit(req, req._prefill_len - 1)
            n = min(req._prefill_len - reused, budget)
            if not bm.allocate(req, reused + n):
                break
            if reused:
                self._load_prefix(req, hit)
                req.num_computed_tokens = reused
            waiting.popleft()
            self._num_waiting -= 1
            req.status = _RUNNING
            running[req.request_id] = req
            held.append(h)
            remaining.append(left)
            prefill.append(self._prefill_seq(req, n, it))
            budget -= n
        return budget

    def _prefix_hit(self, req: Request, max_tokens: int) -> tuple[int, object]:
        """Hook: tokens of ``req`` whose KV can be loaded instead of computed (at most ``max_tokens``), and a handle.

        The base scheduler recomputes everything; the KV-offload scheduler returns a host-cache hit here.
        """
        return 0, None

    def _load_prefix(self, req: Request, hit: object) -> None:
        """Hook: fill ``req``'s freshly allocated pages with the reused prefix of ``hit`` (see ``_prefix_hit``)."""

    def update(self, plan: BatchPlan, sampled: dict[str, int]) -> list[Request]:
        """Apply the tokens ``plan`` sampled (``sampled[request_id]`` for each seq with ``sample``).

        Returns the requests this call finished (EOS/stop token -> "stop"; max_tokens/context -> "length"). EOS and
        stop ids count only once the request has more than ``min_tokens`` outputs.
        """
        finished: list[Request] = []
        limit = self._len_limit
        for seqs in (plan.decode, plan.prefill):
            for seq in seqs:
                if not seq.sample:
                    continue
                req = seq.request
                status = req.status
                if status is not _RUNNING and status.is_finished:
                    continue  # finished after this plan was formed: the extra token is dropped
                try:
                    token = sampled[seq.request_id]
                except KeyError:
                    raise KeyError(
                        f"no sampled token for request {seq.request_id!r} in iteration {plan.iteration}; pass one "
                        "for every scheduled seq with sample=True"
                    ) from None
                req.num_pending -= 1
                outputs = req.output_token_ids
                outputs.append(token)
                n_out = len(outputs)
                sp = req.sampling_params
                if token in req._stop_ids and n_out > sp.min_tokens:
                    status = RequestStatus.FINISHED_STOPPED
                elif n_out >= sp.max_tokens or len(req.prompt_token_ids) + n_out >= limit:
                    status = RequestStatus.FINISHED_LENGTH
                else:
                    continue
                self._finish(req, status)
                finished.append(req)
        return finished

    def __repr__(self) -> str:
        return (
            f"Scheduler(running={self.num_running}, waiting={self.num_waiting}, iteration={self._iteration}, "
            f"{self.block_manager!r})"
        )
