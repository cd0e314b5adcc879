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
          async_mode: bool, expect_full: bool = False, admission_pace: float = 0.0) -> RunResult:
    sched = Scheduler(BlockManager(num_blocks, bs), dense, max_num_seqs, max_model_len, decode_len_prior=8.0,
                      admission_pace=admission_pace)
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
    # One block per request beyond its final length: the admission's peak is a bound that rounds each request's
    # last block up (peak_blocks), and requests of known length are predicted at exactly max_tokens.
    num_blocks = 1 + sum(blocks_for_tokens(len(s.prompt) + s.max_tokens, bs) + 1 for s in specs)
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


@SETTINGS
@given(specs=workloads(), dense=st.sampled_from([2, 8, 32]), bs=st.sampled_from([1, 4]), slack=st.integers(0, 30),
       pace=st.sampled_from([0.05, 0.5, 1.05, 3.0]), async_mode=st.booleans())
def test_paced_admission_matches_reference(specs, dense, bs, slack, pace, async_mode) -> None:
    """Admission pacing changes when requests start, never what they generate, and every request still ends."""
    max_model_len = 1000
    num_blocks = 1 + max(blocks_for_tokens(len(s.prompt) + s.max_tokens, bs) for s in specs) + slack
    run = drive(specs, num_blocks, bs, dense, 100, max_model_len, async_mode, admission_pace=pace)
    check_against_reference(specs, run, max_model_len)


def _constant_run(pace: float, kv_tokens: int = 6000, prompt: int = 64, decode: int = 32, dense: int = 256,
                  n: int = 300, bs: int = 4) -> dict:
    """A KV-bound constant-length run (no model): per iteration, the new requests' prefill tokens, and the
    iterations that carried no prefill while requests waited."""
    s = Scheduler(BlockManager(kv_tokens // bs + 1, bs), dense, 4096, prompt + decode + 1, 8.0, admission_pace=pace)
    reqs = [Request(f"r{i}", [5] * prompt, SamplingParams(max_tokens=decode, ignore_eos=True), 0.0) for i in range(n)]
    for r in reqs:
        s.add_request(r)
    admitted_tokens, stalled, iterations = [], 0, 0
    while s.has_work():
        running = set(s._running)
        plan = s.schedule()
        iterations += 1
        admitted_tokens.append(sum(q.num_tokens for q in plan.prefill if q.request_id not in running))
        stalled += bool(s.num_waiting) and plan.num_prefill_tokens == 0
        s.update(plan, {q.request_id: 7 for q in plan.seqs if q.sample})
    assert all(len(r.output_token_ids) == decode and r.finish_reason == "length" for r in reqs)
    return {"admitted": admitted_tokens, "stalled": stalled, "iterations": iterations}


def test_pace_tokens_is_the_steady_state_prefill_rate() -> None:
    # 6,000 tokens; p = 64, d = 32: R = 6000 / (64 + 16) = 75 requests decode, 75 / 32 finish an iteration, each
    # replaced by 64 prefill tokens: 150 tokens an iteration; x 1.05 = 157.5 -> 158.
    s = Scheduler(BlockManager(6000 // 4 + 1, 4), 256, 4096, 1000, admission_pace=1.05)
    assert s.pace_tokens(64, 32) == 158
    assert Scheduler(BlockManager(6000 // 4 + 1, 4), 256, 4096, 1000, admission_pace=1.0).pace_tokens(64, 32) == 150
    for bad in (-0.1, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match="admission_pace"):
            Scheduler(BlockManager(11, 4), 256, 16, 1000, admission_pace=bad)


def test_pacing_keeps_admissions_to_the_steady_rate_and_removes_stalls() -> None:
    greedy, paced = _constant_run(0.0), _constant_run(1.05)
    # Greedy admission fills the cache with requests of one age, then admits nothing until they end: 36 iterations
    # of decodes only while requests wait. Paced, the new requests of an iteration never pass the rate after the
    # first iteration (an empty engine admits a full batch), and most of those stalls are gone.
    assert max(greedy["admitted"][1:]) > 158
    assert max(paced["admitted"][1:]) <= 158
    assert greedy["stalled"] >= 30 and paced["stalled"] <= greedy["stalled"] // 3
    assert paced["iterations"] <= greedy["iterations"] * 1.02  # no slower in iterations either


def test_pacing_never_binds_when_the_cache_outruns_the_batch() -> None:
    # 200,000 tokens: the steady prefill rate (5,000 tokens) exceeds the 256-token batch, so paced = greedy.
    greedy, paced = _constant_run(0.0, kv_tokens=200_000), _constant_run(1.05, kv_tokens=200_000)
    assert greedy == paced


def test_tight_cache_really_preempts() -> None:
    specs = [Spec(f"r{i}", tuple(range(10, 22)), 20, arrival=0) for i in range(4)]
    for async_mode in (False, True):
        run = drive(specs, num_blocks=1 + 10, bs=4, dense=16, max_num_seqs=8, max_model_len=100,
                    async_mode=async_mode)
        assert run.preemptions > 0
        check_against_reference(specs, run, 100)


# ---- hand-solved cases ----------------------------------------------------------------------------------------


def _sched(num_blocks: int, bs: int, dense: int, prior: float = 8.0, max_num_seqs: int = 16,
           max_model_len: int = 1000) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, bs), dense, max_num_seqs, max_model_len, decode_len_prior=prior)


def _add(s: Scheduler, rid: str, prompt_len: int, **sp: object) -> Request:
    r = Request(rid, list(range(10, 10 + prompt_len)), SamplingParams(**sp), 0.0, eos_token_ids=(EOS,))
    s.add_request(r)
    return r


def _ids(seqs: list) -> list[tuple[str, int, int]]:
    return [(q.request_id, q.start, q.num_tokens) for q in seqs]


def test_memory_prediction_admits_only_what_fits() -> None:
    # 10 usable blocks of 4 tokens; each request predicts 8 prompt + min(100, avg) decode tokens.
    s = _sched(num_blocks=11, bs=4, dense=64, prior=8.0)
    for rid in "ABC":
        _add(s, rid, 8, max_tokens=100)
    p0 = s.schedule()  # A: 16 tokens -> 4 blocks; B: 4 + 4 = 8 <= 10; C: 12 > 10 -> waits
    assert _ids(p0.prefill) == [("A", 0, 8), ("B", 0, 8)] and p0.num_tokens == 16
    s.update(p0, {"A": 50, "B": 50})
    p1 = s.schedule()
    assert _ids(p1.decode) == [("A", 8, 1), ("B", 8, 1)] and p1.prefill == []
    assert [r.request_id for r in s.update(p1, {"A": EOS, "B": 51})] == ["A"]
    assert s.avg_decode_len == 2.0  # A finished with 2 outputs
    p2 = s.schedule()  # B: 8 + max(2, 2) = 10 tokens -> 3 blocks; C: 3 blocks; 6 <= 10 -> admitted
    assert _ids(p2.decode) == [("B", 9, 1)] and _ids(p2.prefill) == [("C", 0, 8)]


def test_empty_engine_admits_a_request_predicted_too_large() -> None:
    s = _sched(num_blocks=11, bs=4, dense=64, prior=1000.0)  # predicts 8 + 100 tokens = 27 blocks > 10
    _add(s, "A", 8, max_tokens=100)
    _add(s, "B", 8, max_tokens=100)
    plan = s.schedule()
    assert _ids(plan.prefill) == [("A", 0, 8)]  # A alone (no starvation); B waits


def test_preemption_takes_newest_and_recomputes_prompt_plus_outputs() -> None:
    s = _sched(num_blocks=7, bs=2, dense=16, prior=1.0, max_num_seqs=2)  # 6 blocks = 12 slots
    # A stop token (never sampled here) makes their lengths unknown, so both are admitted on the 1-token prior and
    # outgrow the cache.
    a = _add(s, "A", 4, max_tokens=6, ignore_eos=True, stop_token_ids=[99])
    b = _add(s, "B", 4, max_tokens=6, ignore_eos=True, stop_token_ids=[99])
    _add(s, "C", 2, max_tokens=1)  # waits (max_num_seqs); a preempted B must go ahead of it
    plans, tok = [], 20
    while s.has_work():
        plan = s.schedule()
        plans.append(plan)
        if plan.preempted:
            assert plan.preempted == ["B"] and b.status is RequestStatus.PREEMPTED
            assert b.num_computed_tokens == 0 and b.block_ids == [] and b.num_preemptions == 1
            b_outputs = list(b.output_token_ids)
        # the sampled token is a function of its position only, so preemption must not change any output
        s.update(plan, {q.request_id: tok + q.start + q.num_tokens for q in plan.seqs if q.sample})
    assert any(p.preempted for p in plans)
    recompute = [q for p in plans for q in p.prefill if q.request_id == "B" and p.iteration > 0]
    order = [q.request_id for p in plans for q in p.prefill if q.request_id in "BC" and p.iteration > 0]
    assert order.index("B") < order.index("C")
    assert recompute[0].start == 0
    # the recompute feeds prompt + the outputs known at preemption, then samples the next output
    assert [t for q in recompute for t in q.input_token_ids] == [*b.prompt_token_ids, *b_outputs]
    assert recompute[-1].sample and b.output_token_ids[: len(b_outputs)] == b_outputs
    assert a.output_token_ids == b.output_token_ids == list(range(24, 30))
    assert s.block_manager.num_used_blocks == 0


def test_decodes_beyond_budget_wait_without_loss() -> None:
    s = _sched(num_blocks=100, bs=4, dense=3, prior=1.0)
    reqs = [_add(s, f"r{i}", 1, max_tokens=4, ignore_eos=True) for i in range(5)]
    while s.has_work():
        plan = s.schedule()
        assert plan.num_tokens == 3 or not s.num_waiting
        s.update(plan, {q.request_id: 30 for q in plan.seqs if q.sample})
    assert all(r.output_token_ids == [30] * 4 and r.finish_reason == "length" for r in reqs)


def test_async_extra_token_after_eos_is_dropped_and_abort_in_flight() -> None:
    s = _sched(num_blocks=50, bs=4, dense=8)
    a = _add(s, "A", 3, max_tokens=10)
    b = _add(s, "B", 3, max_tokens=10)
    p0 = s.schedule()
    s.update(p0, {"A": 40, "B": 40})
    p1 = s.schedule()  # async: p2 is formed before p1's tokens are known
    p2 = s.schedule()
    assert [q.input_token_ids for q in p2.decode] == [[-1], [-1]]
    assert s.abort("B") is b and b.finish_reason == "abort" and b.block_ids == []
    assert p2.decode[1].block_table  # the in-flight plan keeps B's old page table
    assert [r.request_id for r in s.update(p1, {"A": EOS, "B": 41})] == ["A"]
    assert s.update(p2, {"A": 99, "B": 99}) == []  # both finished meanwhile: tokens discarded
    assert a.output_token_ids == [40, EOS] and b.output_token_ids == [40]
    assert not s.has_work() and s.schedule() is None and s.block_manager.num_used_blocks == 0
    assert s.abort("B") is None and s.abort("nope") is None


def test_schedule_returns_none_while_only_pending_tokens_remain() -> None:
    s = _sched(num_blocks=50, bs=4, dense=8)
    _add(s, "A", 3, max_tokens=1)
    p0 = s.schedule()
    assert s.schedule() is None and s.has_work()  # A's only token is in flight
    assert [r.finish_reason for r in s.update(p0, {"A": 40})] == ["length"]
    assert not s.has_work()


def test_finish_request_for_a_stop_string_and_waiting_abort() -> None:
    s = _sched(num_blocks=50, bs=4, dense=4, max_num_seqs=1)
    a = _add(s, "A", 3, max_tokens=10)
    b = _add(s, "B", 3, max_tokens=10)
    s.update(s.schedule(), {"A": 40})
    assert s.finish_request("A", RequestStatus.FINISHED_STOPPED) is a and a.finish_reason == "stop"
    assert s.abort("B") is b and s.num_waiting == 0 and not s.has_work()
    with pytest.raises(ValueError, match="FINISHED"):
        s.finish_request("A", RequestStatus.RUNNING)


def test_bad_prompts_fail_alone_with_a_message() -> None:
    s = _sched(num_blocks=5, bs=4, dense=8, max_model_len=12)  # cache: 16 tokens
    long = _add(s, "long", 13)
    empty = Request("empty", [])
    s.add_request(empty)
    ok = _add(s, "ok", 4, max_tokens=2, ignore_eos=True)
    failed = s.take_finished()
    assert failed == [long, empty] and s.take_finished() == []
    assert long.finish_reason == "error" and "13 tokens; max_model_len is 12" in long.error
    assert "empty" in empty.error
    s2 = _sched(num_blocks=3, bs=4, dense=8, max_model_len=100)  # cache: 8 tokens
    big = _add(s2, "big", 9)
    assert s2.take_finished() == [big] and "KV cache holds 8" in big.error
    while s.has_work():
        plan = s.schedule()
        s.update(plan, {q.request_id: 50 for q in plan.seqs if q.sample})
    assert ok.output_token_ids == [50, 50]
    with pytest.raises(ValueError, match="unique"):
        s.add_request(Request("x", [1]))
        s.add_request(Request("x", [1]))


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("max_tokens", "5"), ("max_tokens", True), ("max_tokens", 2.0),
    ("temperature", -0.1), ("temperature", 101.0), ("temperature", float("nan")), ("temperature", "1"),
    ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2), ("top_k", 1.0), ("seed", 1.5), ("seed", "1"),
    ("stop", 5), ("stop", [1]), ("stop", [""]), ("stop_token_ids", ["a"]), ("stop_token_ids", 3),
    ("ignore_eos", 1), ("min_tokens", -1), ("min_tokens", 17),
])
def test_bad_sampling_params_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sampling_params_normalise() -> None:
    sp = SamplingParams(stop="###", temperature=0, top_k=-1, seed=3, stop_token_ids=(7,))
    assert sp.stop == ["###"] and sp.temperature == 0.0 and sp.greedy and sp.stop_token_ids == [7]


def test_request_status_predicates() -> None:
    reasons = {s: s.finish_reason for s in RequestStatus}
    assert reasons == {RequestStatus.WAITING: None, RequestStatus.RUNNING: None, RequestStatus.PREEMPTED: None,
                       RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                       RequestStatus.FINISHED_ERROR: "error", RequestStatus.FINISHED_ABORTED: "abort"}
    assert [s for s in RequestStatus if s.is_finished] == [s for s in RequestStatus if reasons[s]]


def test_dense_batch_from_memory_hand_solved() -> None:
    spec = ModelSpec.load("llama-3-8b")  # 32 layers x 8 KV heads x 128: 128 KiB of KV per token
    gib = 1024**3
    # 80 GiB x 0.9 - 16 GiB = 56 GiB -> 458,752 tokens; p + d/2 = 768 -> 597 requests; 597 x (1024/512) = 1194
    # -> 1152 (multiple of 128); decode share 1152 x 512/1024 = 576.
    assert tuple(dense_batch_from_memory(spec, 80 * gib, 16 * gib, 512, 512)) == (576, 1152, 458_752)
    # fp32 KV halves the tokens; a huge cache clamps to 8192.
    assert dense_batch_from_memory(spec, 80 * gib, 16 * gib, 512, 512, dtype_bytes=4).kv_tokens == 229_376
    assert dense_batch_from_memory(spec, 1000 * gib, 16 * gib, 100, 100).dense_batch_size == 8192
    with pytest.raises(ValueError, match="weights"):
        dense_batch_from_memory(spec, 16 * gib, 16 * gib, 512, 512)


def test_schedule_and_update_are_fast_with_1000_running() -> None:
    s = _sched(num_blocks=1 + 1000 * 17, bs=16, dense=2048, max_num_seqs=1024, max_model_len=4096)
    for i in range(1000):
        _add(s, f"r{i}", 64, max_tokens=200, ignore_eos=True)
    prev, times = None, []
    for _ in range(60):
        t0 = time.perf_counter()
        plan = s.schedule()
        if prev:
            s.update(*prev)
        times.append(time.perf_counter() - t0)
        prev = (plan, {q.request_id: 11 for q in plan.seqs if q.sample})
    assert len(plan.decode) == 1000 and s.num_running == 1000
    assert sorted(times)[30] < 0.05  # median; ~3 ms on a laptop core, generous for slow CI machines


# ---- the admission's peak prediction ----------------------------------------------------------------------------


def _simulated_peak(held: list[int], remaining: list[int], bs: int) -> tuple[int, int]:
    """(tokens, blocks) at the fullest future iteration, stepping time one iteration at a time."""
    best_tokens = best_blocks = 0
    for t in range(max(remaining, default=0)):
        alive = [h + t for h, r in zip(held, remaining) if r > t]
        best_tokens = max(best_tokens, sum(alive))
        best_blocks = max(best_blocks, sum(-(-x // bs) for x in alive))
    return best_tokens, best_blocks


def test_peak_blocks_by_hand() -> None:
    from nanoflow.scheduler.batcher import peak_blocks

    # A holds 6 and ends after 1 more iteration, B holds 2 and ends after 5: A and B together peak at t=0 (8 tokens),
    # B alone at t=4 (6 tokens). The sum of their final lengths (7 + 7 = 14) never happens.
    assert peak_blocks([6, 2], [1, 5], 1) == 8
    assert peak_blocks([], [], 16) == 0
    assert peak_blocks([10], [3], 4) == 3  # 12 tokens at t=2 -> 3 blocks


@given(st.lists(st.tuples(st.integers(0, 40), st.integers(1, 30)), max_size=12), st.integers(1, 8))
@settings(max_examples=200, deadline=None)
def test_peak_blocks_against_a_step_by_step_simulation(reqs: list[tuple[int, int]], bs: int) -> None:
    from nanoflow.scheduler.batcher import peak_blocks

    held, remaining = [h for h, _ in reqs], [r for _, r in reqs]
    tokens, blocks = _simulated_peak(held, remaining, bs)
    got = peak_blocks(held, remaining, bs)
    assert got == tokens if bs == 1 else blocks <= got <= -(-tokens // bs) + len(reqs)


def test_staggered_requests_fit_where_their_final_lengths_do_not() -> None:
    # 20 usable one-token blocks. A (4-token prompt, 8 outputs) has decoded 6 when B (4 + 8) arrives: by final
    # lengths 12 + 12 = 24 > 20, but A ends 2 iterations from now, so together they never hold more than
    # (10 + 1) + (4 + 1) = 16: B is admitted (the old sum-of-final-lengths rule made it wait).
    s = _sched(num_blocks=21, bs=1, dense=64, prior=8.0)
    _add(s, "A", 4, max_tokens=8, ignore_eos=True)
    s.update(s.schedule(), {"A": 50})
    for i in range(5):
        s.update(s.schedule(), {"A": 51 + i})
    _add(s, "B", 4, max_tokens=8, ignore_eos=True)
    plan = s.schedule()
    assert _ids(plan.decode) == [("A", 9, 1)] and _ids(plan.prefill) == [("B", 0, 4)]


def test_known_length_requests_are_predicted_at_max_tokens() -> None:
    # 10 usable blocks of 4 tokens, an average decode length of 8 (the prior). A request that may stop early is
    # predicted at 8 + min(100, 8) = 16 tokens (4 blocks), so two fit. With ignore_eos and no stop tokens or strings
    # nothing ends it before max_tokens: 8 + 24 = 32 tokens (8 blocks), and the second must wait.
    s = _sched(num_blocks=11, bs=4, dense=64, prior=8.0)
    for rid in "AB":
        _add(s, rid, 8, max_tokens=100)
    assert _ids(s.schedule().prefill) == [("A", 0, 8), ("B", 0, 8)]
    s = _sched(num_blocks=11, bs=4, dense=64, prior=8.0)
    for rid in "AB":
        _add(s, rid, 8, max_tokens=24, ignore_eos=True)
    assert _ids(s.schedule().prefill) == [("A", 0, 8)]
    s = _sched(num_blocks=11, bs=4, dense=64, prior=8.0)  # a stop token can end it early: the average again
    for rid in "AB":
        _add(s, rid, 8, max_tokens=24, ignore_eos=True, stop_token_ids=[3])
    assert _ids(s.schedule().prefill) == [("A", 0, 8), ("B", 0, 8)]


def test_admission_simulation_script(tmp_path) -> None:
    """scripts/sim_admission.py on a tiny KV-bound case: both rules schedule every request's tokens."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "sim_admission.py"
    spec = importlib.util.spec_from_file_location("sim_admission", path)
    sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim)
    out = tmp_path / "sim.json"
    assert sim.main(["--kv-tokens", "3000", "--requests", "40", "--prompt", "64", "--output", "32",
                     "--dense-batch", "256", "--warmup-requests", "0", "--decode-len-prior", "32",
                     "--output-file", str(out)]) == 0
    by_rule = {r["rule"]: r for r in json.loads(out.read_text())["records"]}
    for r in by_rule.values():  # a prompt and 31 decode inputs per request (the first output comes from the prefill)
        assert round(r["mean_tokens_per_iteration"] * r["iterations"]) >= 40 * (64 + 31)
    # --step-fit (scripts/step_model.py's fit): a constant step costs its constant; a padded-size term costs at least
    # the tokens each step carries (steps run padded to a CUDA-graph bucket >= their size).
    base = ["--kv-tokens", "3000", "--requests", "40", "--prompt", "64", "--output", "32", "--dense-batch", "256",
            "--warmup-requests", "0", "--decode-len-prior", "32", "--rules", "peak", "--admission-pace", "0",
            "--output-file", str(out)]
    for fit, check in (({"a": 2.0, "b_padded": 0.0, "c_prefill": 0.0, "d_decode": 0.0},
                        lambda r: abs(r["predicted_s"] - r["iterations"] * 2e-3) < 1e-9),
                       ({"a": 0.0, "b_padded": 1.0, "c_prefill": 0.0, "d_decode": 0.0},
                        lambda r: r["predicted_s"] * 1e3 >= r["mean_tokens_per_iteration"] * r["iterations"] - 1e-6)):
        (tmp_path / "fit.json").write_text(json.dumps({"fit": fit}))
        for buckets in ("engine", "halvings"):
            assert sim.main([*base, "--step-fit", str(tmp_path / "fit.json"), "--buckets", buckets]) == 0
            assert check(json.loads(out.read_text())["records"][0])
    # --fit-scale multiplies the constant and the per-token terms; --prefill-cap paces admission (every token still
    # scheduled, no iteration over the cap in prefill tokens beyond what continued chunks need).
    (tmp_path / "fit.json").write_text(json.dumps({"fit": {"a": 2.0, "b_padded": 0.0, "c_prefill": 0.0,
                                                           "d_decode": 0.0}}))
    assert sim.main([*base, "--step-fit", str(tmp_path / "fit.json"), "--fit-scale", "1.5", "3"]) == 0
    r = json.loads(out.read_text())["records"][0]
    assert abs(r["predicted_s"] - r["iterations"] * 3e-3) < 1e-9
    assert sim.main([*base, "--prefill-cap", "64"]) == 0
    paced = json.loads(out.read_text())["records"][0]
    assert paced["prefill_cap"] == 64 and round(paced["mean_tokens_per_iteration"] * paced["iterations"]) >= 40 * 95
    assert paced["iterations"] > r["iterations"]  # one 64-token prompt admitted per iteration at most


def test_gc_probe_script_runs_both_ways(tmp_path):
    """scripts/gc_probe.py (the GC stalls behind freezing queued requests) runs and reports both cases."""
    import json
    import runpy
    import sys
    from pathlib import Path

    out = tmp_path / "gc.json"
    argv = sys.argv
    sys.argv = ["gc_probe.py", "--requests", "48", "--prompt", "64", "--output", "8", "--dense-batch", "256",
                "--output-file", str(out)]
    try:
        with pytest.raises(SystemExit) as done:
            runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "gc_probe.py"), run_name="__main__")
    finally:
        sys.argv = argv
    assert done.value.code == 0
    records = json.loads(out.read_text())["records"]
    assert [r["freeze_after_add"] for r in records] == [False, True]
    assert all(r["steps"] > 0 for r in records) and records[0]["steps"] == records[1]["steps"]
