"""Scheduler behaviour against independent references.

A fake "model" writes each fed token into a simulated paged KV cache through the plan's block tables and samples the
next token as a hash of the whole sequence it reads back from that cache. The reference output of a request is
computed directly from its prompt (no scheduler, no cache), so a wrong input token, a wrong block table, a block
shared by two live requests, or a lost token after preemption all change the outputs.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanoflow.config import ModelSpec
from nanoflow.scheduler import (
    BatchPlan,
    BlockManager,
    Request,
    RequestStatus,
    SamplingParams,
    Scheduler,
    blocks_for_tokens,
    dense_batch_from_memory,
)

EOS, STOP = 2, 3


@dataclass(frozen=True)
class Spec:
    """A request of the workload: the fake model emits EOS as output number ``eos_at``, STOP as ``stop_at``."""

    rid: str
    prompt: tuple[int, ...]
    max_tokens: int
    arrival: int
    eos_at: int | None = None
    stop_at: int | None = None
    min_tokens: int = 0
    ignore_eos: bool = False


def token_fn(spec: Spec, history: list[int]) -> int:
    n_out = len(history) - len(spec.prompt) + 1  # index (1-based) of the output being sampled
    if n_out == spec.eos_at:
        return EOS
    if n_out == spec.stop_at:
        return STOP
    return 10 + zlib.crc32(repr((spec.rid, history)).encode()) % 1000


def reference(spec: Spec, max_model_len: int) -> tuple[list[int], str]:
    """Outputs and finish reason of ``spec`` generated one token at a time, no scheduler involved."""
    seq, out = list(spec.prompt), []
    while True:
        t = token_fn(spec, seq)
        seq.append(t)
        out.append(t)
        stops = {STOP} | (set() if spec.ignore_eos else {EOS})
        if t in stops and len(out) > spec.min_tokens:
            return out, "stop"
        if len(out) >= spec.max_tokens or len(spec.prompt) + len(out) >= max_model_len:
            return out, "length"


class FakeModel:
    """Paged KV cache of (request id, token) per slot; samples from what it reads back through the block table."""

    def __init__(self, num_blocks: int, block_size: int, specs: dict[str, Spec]) -> None:
        self.kv: list[tuple[str, int] | None] = [None] * (num_blocks * block_size)
        self.bs = block_size
        self.specs = specs

    def run(self, plan: BatchPlan, prev: dict[str, int]) -> dict[str, int]:
        bs, out = self.bs, {}
        for seq in plan.seqs:
            tokens = seq.input_token_ids
            if -1 in tokens:  # the GPU resolves it from the previous iteration's samples
                assert tokens == [-1] and seq in plan.decode
                tokens = [prev[seq.request_id]]
            table = seq.block_table
            assert len(table) * bs >= seq.start + seq.num_tokens
            for k, t in enumerate(tokens):
                pos = seq.start + k
                self.kv[table[pos // bs] * bs + pos % bs] = (seq.request_id, t)
            if seq.sample:
                history = []
                for pos in range(seq.start + seq.num_tokens):
                    rid, t = self.kv[table[pos // bs] * bs + pos % bs]
                    assert rid == seq.request_id, "KV slot overwritten by another request"
                    history.append(t)
                out[seq.request_id] = token_fn(self.specs[seq.request_id], history)
        return out


def check_plan(plan: BatchPlan, sched: Scheduler, reqs: list[Request], dense: int) -> None:
    assert plan.seqs == plan.decode + plan.prefill
    assert all(s.num_tokens == 1 and s.sample for s in plan.decode)
    assert all(-1 not in s.input_token_ids for s in plan.prefill)
    assert plan.num_tokens == sum(s.num_tokens for s in plan.seqs) <= dense
    assert len({s.request_id for s in plan.seqs}) == len(plan.seqs)
    bm = sched.block_manager
    live = [r for r in reqs if not r.status.is_finished]
    owned = [b for r in live for b in r.block_ids]
    assert len(owned) == len(set(owned)), "a block is owned by two live requests"
    assert 0 not in owned and len(owned) == bm.num_used_blocks <= bm.num_usable_blocks
    assert all(not r.block_ids for r in live if r.status is not RequestStatus.RUNNING)
    assert sched.num_running <= sched.max_num_seqs


def available_work(reqs: list[Request], limit: int) -> int:
    """Tokens the scheduler could feed now if memory and max_num_seqs were no constraint (test-side accounting)."""
    work = 0
    for r in reqs:
        if r.status.is_finished or (r.num_pending and r.status is not RequestStatus.RUNNING):
            continue
        if r.status is RequestStatus.RUNNING and r.num_generated and r.num_computed_tokens >= r.num_tokens - 1:
            if r.num_output_tokens + r.num_pending >= r.sampling_params.max_tokens or r.num_tokens >= limit:
                continue
        work += r.num_tokens - r.num_computed_tokens
    return work


@dataclass
class RunResult:
    outputs: dict[str, list[int]]
    reasons: dict[str, str]
    finish_step: dict[str, int]
    preemptions: int


def drive(specs: list[Spec], num_blocks: int, bs: int, dense: int, max_num_seqs: int, max_model_len: int,
          async_mode: bool, expect_full: bool = False) -> RunResult:
    sched = Scheduler(BlockManager(num_blocks, bs), dense, max_num_seqs, max_model_len, decode_len_prior=8.0)
    model = FakeModel(num_blocks, bs, {s.rid: s for s in specs})
    todo = sorted(specs, key=lambda s: s.arrival)
    reqs: list[Request] = []
    reasons: dict[str, str] = {}
    finish_step: dict[str, int] = {}
    inflight: tuple[BatchPlan, dict[str, int]] | None = None
    preemptions, step = 0, 0
    bound = max(s.arrival for s in specs) + 30 * sum(len(s.prompt) + s.max_tokens for s in specs) + 50

    def collect(done: list[Request]) -> None:
        for r in done:
            assert r.request_id not in reasons, "a request was returned as finished twice"
            reasons[r.request_id] = r.finish_reason
            finish_step[r.request_id] = step

    while todo or sched.has_work() or inflight:
        while todo and todo[0].arrival <= step:
            s = todo.pop(0)
            sp = SamplingParams(max_tokens=s.max_tokens, min_tokens=s.min_tokens, ignore_eos=s.ignore_eos,
                                stop_token_ids=[STOP])
            reqs.append(Request(s.rid, list(s.prompt), sp, float(s.arrival), eos_token_ids=(EOS,)))
            sched.add_request(reqs[-1])
        collect(sched.take_finished())
        work = available_work(reqs, min(max_model_len, (num_blocks - 1) * bs))
        plan = sched.schedule()
        if plan is not None:
            check_plan(plan, sched, reqs, dense)
            preemptions += len(plan.preempted)
        if expect_full:
            assert (plan.num_tokens if plan else 0) == min(dense, work), "token budget not filled"
        prev = inflight[1] if inflight else {}
        sampled = model.run(plan, prev) if plan else {}
        if async_mode:
            if inflight:
                collect(sched.update(*inflight))
            inflight = (plan, sampled) if plan else None
        elif plan:
            collect(sched.update(plan, sampled))
        step += 1
        assert step < bound, f"no progress after {step} iterations: {sched!r}"
    assert sched.block_manager.num_free_blocks == num_blocks - 1, "blocks leaked"
    assert sched.num_running == sched.num_waiting == 0
    outputs = {r.request_id: r.output_token_ids for r in reqs}
    return RunResult(outputs, reasons, finish_step, preemptions)


@st.composite
def workloads(draw: st.DrawFn) -> list[Spec]:
    n = draw(st.integers(1, 10))
    specs = []
    for i in range(n):
        max_tokens = draw(st.integers(1, 24))
        specs.append(Spec(
            rid=f"r{i}",
            prompt=tuple(draw(st.lists(st.integers(10, 99), min_size=1, max_size=40))),
            max_tokens=max_tokens,
            arrival=draw(st.integers(0, 15)),
            eos_at=draw(st.none() | st.integers(1, 24)),
            stop_at=draw(st.none() | st.integers(1, 30)),
            min_tokens=draw(st.integers(0, min(3, max_tokens))),
            ignore_eos=draw(st.booleans().filter(lambda b: b) | st.just(False)),
        ))
    return specs


def check_against_reference(specs: list[Spec], run: RunResult, max_model_len: int) -> None:
    for s in specs:
        out, reason = reference(s, max_model_len)
        assert run.outputs[s.rid] == out, f"{s.rid}: outputs differ from the one-token-at-a-time reference"
        assert run.reasons[s.rid] == reason


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(specs=workloads(), dense=st.sampled_from([1, 3, 8, 32]), bs=st.sampled_from([1, 4, 16]),
       async_mode=st.booleans(), mml_extra=st.sampled_from([0, 5, 1000]))
def test_ample_cache_fills_budget_exactly_and_matches_reference(specs, dense, bs, async_mode, mml_extra) -> None:
    max_model_len = max(len(s.prompt) for s in specs) + mml_extra
    num_blocks = 1 + sum(blocks_for_tokens(len(s.prompt) + s.max_tokens, bs) for s in specs)
    run = drive(specs, num_blocks, bs, dense, 100, max_model_len, async_mode, expect_full=True)
    check_against_reference(specs, run, max_model_len)
    assert run.preemptions == 0
    # No starvation: admission is FCFS, so while a request is live every iteration feeds >= 1 token of it or of a
    # request ahead of it; its finish is bounded by the work ahead of it (x2 for async pending-only iterations).
    order = sorted(specs, key=lambda s: s.arrival)
    ahead = 0
    for s in order:
        ahead += len(s.prompt) + s.max_tokens + 1
        assert run.finish_step[s.rid] <= s.arrival + 2 * ahead + 4


@SETTINGS
@given(specs=workloads(), dense=st.sampled_from([2, 8, 32]), bs=st.sampled_from([1, 2, 4]),
       slack=st.integers(0, 3), max_num_seqs=st.sampled_from([1, 3, 100]))
def test_tight_cache_preempts_yet_sync_async_and_reference_agree(specs, dense, bs, slack, max_num_seqs) -> None:
    max_model_len = 1000
    # Room for the longest single request and little more: preemption is likely, truncation impossible.
    num_blocks = 1 + max(blocks_for_tokens(len(s.prompt) + s.max_tokens, bs) for s in specs) + slack
    sync = drive(specs, num_blocks, bs, dense, max_num_seqs, max_model_len, async_mode=False)
    asyn = drive(specs, num_blocks, bs, dense, max_num_seqs, max_model_len, async_mode=True)
    check_against_reference(specs, sync, max_model_len)
    assert asyn.outputs == sync.outputs and asyn.reasons == sync.reasons


def test_tight_cache_really_preempts() -> None:
    specs = [Spec(f"r{i}", tuple(range(10, 22)), 20, arrival=0) for i in range(4)]
    for async_mode in (False, True):
        run = drive(specs, num_blocks=1 + 10, bs=4, dense=16, max_num_seqs=8, max_model_len=100,
                    async_mode=async_mode)
        assert run.preemptions > 0
        check_against_reference(specs, run, 100)
