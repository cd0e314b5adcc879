"""Tensor-parallel engine: rank 0 leads, every other rank follows its plans (paper §2.3, §3.3).

Launch one process per GPU with torchrun or ``accelerate launch``; every process runs the same program.

- Every rank loads only its shard (``load_parts(args, device, rank, world)``) and builds an :class:`Engine` whose
  runner holds the rank's KV heads and does its collectives through a :class:`~nanoflow.ops.comm.Communicator`.
- Rank 0 owns the scheduler, the tokenizer-facing API and the outputs: :class:`DistributedEngine`. Before each
  forward it launches, it broadcasts a :class:`Message` over the host (gloo) control group: the plan's per-sequence
  facts (request id, start, token count, input ids, sample flag, block table — sent as the new tail since the last
  plan) and the sampling parameters as host lists (``None`` = all greedy).
- Ranks > 0 run :func:`follow`: receive, rebuild the same ``BatchPlan``, run it with their runner (same KV block
  ids, same sampling), repeat. Both sync and async scheduling work: a ``-1`` input ("the token sampled last
  iteration") is resolved by each rank's runner from its own previous samples, which are identical on every rank
  because all ranks sample from the same all-gathered logits with the same counter-based seeds.

Contract (``LLM(..., tp=N)`` / ``nanoflow run-offline --tp N``): on rank 0 ``LLM(...)`` returns and ``generate``
returns the outputs; only rank 0 writes files. On ranks > 0 ``LLM(...)`` does not return: the process follows rank 0
and exits with status 0 once rank 0's engine shuts down (``DistributedEngine.shutdown()``, registered with atexit),
or with status 1 and a message naming the failure when rank 0 is lost. A dead follower makes rank 0 fail with
:class:`~nanoflow.ops.comm.PeerLostError` (and torchrun stops the remaining ranks). Test hook: with
``NANOFLOW_TP_TEST_EXIT_AFTER=N`` in the environment, rank 1 exits with status 17 after following N forwards.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
from dataclasses import replace
from typing import Any, NamedTuple

import torch

from nanoflow.config import ConfigError, EngineArgs
from nanoflow.engine.builder import kv_capacity_tokens, load_parts, resolve_kv_dtype
from nanoflow.engine.engine import Engine
from nanoflow.ops.comm import Communicator, init_from_env, read_launch_env
from nanoflow.ops.sampling import SamplingTensors
from nanoflow.scheduler.batcher import BatchPlan, ScheduledSeq

log = logging.getLogger("nanoflow")

TEST_EXIT_STATUS = 17
SamplingLists = tuple[list[float], list[float], list[int], list[int], list[int]]


# ---- the wire format -------------------------------------------------------------------------------------------
class WireSeq(NamedTuple):
    """One ScheduledSeq on the wire; ``blocks`` is the whole table when ``full`` else the tail after the last send."""

    request_id: str
    start: int
    num_tokens: int
    input_token_ids: list[int]
    sample: bool
    blocks: list[int]
    full: bool


class WirePlan(NamedTuple):
    iteration: int
    decode: list[WireSeq]
    prefill: list[WireSeq]
    num_tokens: int
    dense_batch_size: int


class Message(NamedTuple):
    """Leader -> followers. kind: build (payload EngineArgs), execute ((WirePlan, SamplingLists | None,
    PenaltyLists | None, [PromptLogprobRows] | None)), forward (WirePlan, logits only), capture (segment buckets),
    close, stop."""

    kind: str
    payload: Any = None


class PlanEncoder:
    """Leader side: turns plans into WirePlans, sending each request's block table once and then only its new tail.

    Invariant shared with :class:`PlanDecoder`: after each plan both hold, for exactly the requests of that plan, the
    table prefix ``block_table[:ceil((start + num_tokens) / block_size)]`` that plan used.
    """

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._sent: dict[str, list[int]] = {}

    def encode(self, plan: BatchPlan) -> WirePlan:
        now: dict[str, list[int]] = {}

        def wire(s: ScheduledSeq) -> WireSeq:
            table = s.block_table[: -(-(s.start + s.num_tokens) // self.block_size)]
            prev = self._sent.get(s.request_id)
            full = prev is None or len(prev) > len(table) or table[: len(prev)] != prev
            now[s.request_id] = table
            blocks = table if full else table[len(prev):]  # type: ignore[arg-type]
            return WireSeq(s.request_id, s.start, s.num_tokens, list(s.input_token_ids), s.sample, blocks, full)

        out = WirePlan(plan.iteration, [wire(s) for s in plan.decode], [wire(s) for s in plan.prefill],
                       plan.num_tokens, plan.dense_batch_size)
        self._sent = now
        return out


class PlanDecoder:
    """Follower side: WirePlans back into BatchPlans (``request`` is ``None``: followers have no Request objects)."""

    def __init__(self) -> None:
        self._tables: dict[str, list[int]] = {}

    def decode(self, wp: WirePlan) -> BatchPlan:
        now: dict[str, list[int]] = {}

        def seq(w: WireSeq) -> ScheduledSeq:
            if w.full:
                table = list(w.blocks)
            elif w.request_id in self._tables:
                table = self._tables[w.request_id] + list(w.blocks)
            else:
                raise RuntimeError(f"plan {wp.iteration}: request {w.request_id} sent a block-table tail without its "
                                   "head; the leader and this follower are out of step")
            now[w.request_id] = table
            return ScheduledSeq(w.request_id, w.start, w.num_tokens, w.input_token_ids, w.sample, table, None)

        plan = BatchPlan(wp.iteration, [seq(w) for w in wp.decode], [seq(w) for w in wp.prefill], wp.num_tokens,
                         wp.dense_batch_size, [])
        self._tables = now
        return plan


def sampling_lists(plan: BatchPlan) -> SamplingLists:
    """Host-side sampling parameters of the plan's sampling rows, in row order.

    Mirrors ``Engine._sampling_tensors`` (the step index is the output token about to be sampled); keep the two in
    step. The leader computes them from the requests instead of reading the device tensors back, which would wait
    for the GPU and defeat async scheduling.
    """
    reqs = [s.request for s in plan.seqs if s.sample]
    return ([r.sampling_params.temperature for r in reqs], [r.sampling_params.top_p for r in reqs],
            [r.sampling_params.top_k for r in reqs], [r.sampling_params.seed for r in reqs],
            [len(r.output_token_ids) + r.num_pending - 1 for r in reqs])


# ---- building a rank's engine ----------------------------------------------------------------------------------
def _rank_args(args: EngineArgs, parts: dict[str, Any], comm: Communicator) -> EngineArgs:
    """``args`` for this rank: its own device, and a KV capacity every rank can hold (the minimum over ranks).

    The leader's scheduler hands out block ids for all ranks, so every rank must allocate the same number of blocks.
    """
    args = replace(args, device=str(comm.device), tp=comm.world_size)
    if args.kv_cache_tokens is None:
        model, device = parts["model"], comm.device
        # Same default as Engine.__init__ (the activation buffers are sized to the dense batch).
        dense = args.dense_batch_size or (2048 if device.type == "cuda" else 256)
        act_bytes = sum(b.width for b in model.buffer_specs().values()) * dense * 2
        kv_dtype = resolve_kv_dtype(args.kv_cache_dtype, parts["dtype"], device)
        mine = kv_capacity_tokens(args, model.spec, device, kv_dtype, act_bytes, model.local_kv_heads)
        args = replace(args, kv_cache_tokens=min(comm.all_gather_object(mine)))
    return args


def _build(args: EngineArgs, parts: dict[str, Any], comm: Communicator) -> Engine:
    return Engine(_rank_args(args, parts, comm), parts=parts, comm=comm, tp_rank=comm.rank,
                  tp_size=comm.world_size)


class LeaderRunner:
    """Rank 0's ModelRunner behind the broadcast: every forward is announced to the followers before it launches.

    Everything else (``graphs``, ``device``, ``kv_cache`` ...) reads and writes through to the wrapped runner.
    """

    _OWN = ("_runner", "_comm", "_encoder", "_prepared")

    def __init__(self, runner: Any, comm: Communicator, block_size: int):
        object.__setattr__(self, "_runner", runner)
        object.__setattr__(self, "_comm", comm)
        object.__setattr__(self, "_encoder", PlanEncoder(block_size))
        object.__setattr__(self, "_prepared", None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self._runner, name, value)

    def execute(self, plan: BatchPlan, sampling: SamplingTensors | None, logprobs: int | None = None,
                penalties: Any = None, prompt_logprobs: Any = None) -> Any:
        lists = None if sampling is None else sampling_lists(plan)
        # Every rank samples (its ids feed its next decode step), so the penalties go along, and every rank runs the
        # LM head (it gathers across ranks) over the prompt-logprob rows; the logprobs themselves are rank 0's.
        self._comm.broadcast_object(Message("execute", (self._encoder.encode(plan), lists, penalties,
                                                        prompt_logprobs)))
        return self._runner.execute(plan, sampling, logprobs, penalties, prompt_logprobs)

    def prepare(self, plan: BatchPlan) -> Any:
        self._prepared = plan
        return self._runner.prepare(plan)

    def forward(self, batch: Any) -> torch.Tensor:
        """Logits only (``Engine.prompt_logits``): ``batch`` must come from this runner's last ``prepare``."""
        if self._prepared is None:
            raise RuntimeError("LeaderRunner.forward needs the batch of LeaderRunner.prepare(plan)")
        plan, self._prepared = self._prepared, None
        self._comm.broadcast_object(Message("forward", self._encoder.encode(plan)))
        return self._runner.forward(batch)


class DistributedEngine(Engine):
    """Rank 0's engine under tensor parallelism; the API is Engine's. Build one only while followers run
    :func:`follow` (they build their shard's engine when this constructor announces it), and only one at a time per
    communicator: ``close()`` the previous one first (the followers hold one engine)."""

    def __init__(self, args: EngineArgs, comm: Communicator, parts: dict[str, Any] | None = None):
        if not comm.is_leader:
            raise RuntimeError(f"DistributedEngine runs on rank 0; rank {comm.rank} must call follow()")
        previous = comm.owner
        if previous is not None and not previous._closed:
            raise RuntimeError("another DistributedEngine on this communicator is still open; close() it first")
        parts = parts or load_parts(replace(args, device=str(comm.device)), comm.device, 0, comm.world_size)
        comm.broadcast_object(Message("build", args))
        super().__init__(_rank_args(args, parts, comm), parts=parts, comm=comm, tp_rank=0, tp_size=comm.world_size)
        self.comm = comm
        self.runner = LeaderRunner(self.runner, comm, self.args.block_size)
        self._closed = False
        self._stopped = False
        comm.owner = self

    def capture_all(self, segment_buckets: tuple[int, ...] = (4,)) -> float:
        """Capture every CUDA-graph bucket on all ranks together (capture runs collectives); seconds spent."""
        graphs = self.runner.graphs
        if graphs is None:
            return 0.0
        self.comm.broadcast_object(Message("capture", tuple(segment_buckets)))
        seconds = graphs.capture_all(segment_buckets)
        self.freeze_gc()
        return seconds

    def close(self) -> None:
        """Release this engine's device memory on every rank; the followers then wait for the next build."""
        if not self._closed:
            self._closed = True
            self.comm.broadcast_object(Message("close"))
        super().close()

    def shutdown(self) -> None:
        """Close, tell the followers to exit, and leave the process group (idempotent; runs at interpreter exit)."""
        if self._stopped:
            return
        self._stopped = True
        try:
            self.close()
            stop_followers(self.comm)
        except Exception as exc:  # a peer already gone: nothing left to tell it
            log.warning("tensor-parallel shutdown: %s", exc)


def stop_followers(comm: Communicator) -> None:
    """Rank 0: end every follower's :func:`follow` loop, then leave the process group."""
    comm.broadcast_object(Message("stop"))
    comm.close()


# ---- followers -------------------------------------------------------------------------------------------------
def follow(comm: Communicator, parts: dict[str, Any], exit_after: int | None = None) -> None:
    """Run rank 0's forwards on this rank's shard until rank 0 says stop.

    ``exit_after`` (test hook): exit the process with status ``TEST_EXIT_STATUS`` after that many forwards.
    """
    engine: Engine | None = None
    decoder = PlanDecoder()
    steps = 0
    while True:
        msg: Message = comm.broadcast_object(None)
        if msg.kind == "build":
            if engine is not None:
                engine.close()
            engine, decoder = None, PlanDecoder()
            try:
                engine = _build(msg.payload, parts, comm)
            except (ConfigError, ValueError) as exc:  # rank 0 hits the same error and moves on; so do we
                log.warning("rank %d: engine build failed like on rank 0: %s", comm.rank, exc)
        elif msg.kind == "stop":
            if engine is not None:
                engine.close()
            return
        elif engine is None:
            raise RuntimeError(f"rank {comm.rank}: got {msg.kind!r} before any engine was built")
        elif msg.kind == "execute":
            wire, lists, penalties, prompt_rows = msg.payload
            sampling = None if lists is None else SamplingTensors.build(*lists, engine.runner.device)
            engine.runner.execute(decoder.decode(wire), sampling, penalties=penalties, prompt_logprobs=prompt_rows)
            steps += 1
        elif msg.kind == "forward":
            runner = engine.runner
            runner.forward(runner.prepare(decoder.decode(msg.payload)))
            steps += 1
        elif msg.kind == "capture":
            if engine.runner.graphs is not None:
                engine.runner.graphs.capture_all(msg.payload)
                engine.freeze_gc()
        elif msg.kind == "close":
            engine.close()
            engine = None
        else:
            raise RuntimeError(f"rank {comm.rank}: unknown message {msg.kind!r} from rank 0 (mixed versions?)")
        if exit_after is not None and steps >= exit_after:
            print(f"rank {comm.rank}: exiting after {steps} forwards (NANOFLOW_TP_TEST_EXIT_AFTER)", file=sys.stderr,
                  flush=True)
            os._exit(TEST_EXIT_STATUS)


def make_engine(args: EngineArgs) -> DistributedEngine:
    """What ``LLM(..., tp=N)`` builds; on ranks > 0 it follows rank 0 and then ends the process (see module doc)."""
    launch = read_launch_env()
    if launch is None:
        raise ConfigError(f"tp={args.tp} needs one process per rank: launch with `torchrun --nproc-per-node "
                          f"{args.tp} -m nanoflow.cli run-offline --tp {args.tp} ...` or `accelerate launch "
                          f"--num_processes {args.tp} -m nanoflow.cli ...`")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    comm = init_from_env(device, expected_world_size=args.tp, launch=launch)
    assert comm is not None
    parts = load_parts(replace(args, device=str(comm.device)), comm.device, comm.rank, comm.world_size)
    if comm.is_leader:
        engine = DistributedEngine(args, comm, parts)
        atexit.register(engine.shutdown)
        return engine
    exit_after = launch.fail_after_steps if comm.rank == 1 else None
    try:
        follow(comm, parts, exit_after)
    except Exception as exc:
        print(f"rank {comm.rank}: stopped following rank 0: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from exc
    comm.close()
    raise SystemExit(0)
