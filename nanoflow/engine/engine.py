"""The engine loop: scheduler (CPU) + model runner (device), synchronous or with asynchronous scheduling.

One ``step()``:
  sync:  plan_i = schedule(); run(plan_i); wait; update(plan_i)
  async: plan_i = schedule(); launch(plan_i); wait for plan_{i-1}; update(plan_{i-1})
In async mode the CPU forms and launches batch i while the GPU still runs batch i-1 (paper §4.2.1); a request that
finished in i-1 (EOS, stop string) may have been scheduled once more in i — that extra token is discarded by the
scheduler, never returned.
"""

from __future__ import annotations

import gc
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from nanoflow.config import ConfigError, EngineArgs
from nanoflow.engine.builder import kv_capacity_tokens, load_parts, resolve_device, resolve_kv_dtype
from nanoflow.engine.outputs import RequestMetrics, RequestOutput, TokenLogprob
from nanoflow.ops.sampling import PenaltyLists, PromptLogprobRows, SamplingTensors
from nanoflow.scheduler.batcher import BatchPlan, Scheduler
from nanoflow.scheduler.kv_cache import BlockManager
from nanoflow.scheduler.request import Request, RequestStatus, SamplingParams

log = logging.getLogger("nanoflow")


@dataclass
class _Tracked:
    request: Request
    output: RequestOutput
    detok: Any
    stop: list[str]
    emitted_tokens: int = 0
    prompt_logprob_next: int = 1  # the next prompt position whose logprob a step must compute (prompt_logprobs)


def freeze_gc() -> int:
    """Collect garbage once, then move every object the cyclic GC tracks into its permanent generation
    (:func:`gc.freeze`) and return how many there are.

    A built engine holds hundreds of thousands of long-lived objects (compiled graphs, Triton kernels, modules):
    SmolLM2 on the CPU after one request, 722k, which a full collection walks in 366 ms. Python runs one every so
    often as objects accumulate, and on an H200 the per-step timer of ``nanoflow bench`` showed 0.4-0.5 s stalls at
    a few iterations of every run (3% of a LLaMA-3-8B run). Frozen objects are never walked again; what requests
    allocate later is collected as usual. :meth:`Engine.close` unfreezes them (frozen cycles are never freed).
    """
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


class Engine:
    """Owns one model replica's scheduler and runner; not thread-safe (``AsyncEngine`` wraps it in a thread)."""

    simultaneous_offload = False
    """Stage every step's new KV in host memory (the ``kv_offload`` op); engines that consume it set this first."""

    def __init__(self, args: EngineArgs, parts: dict[str, Any] | None = None, comm: Any = None,
                 tp_rank: int = 0, tp_size: int = 1):
        self.args = args
        self.device = resolve_device(args.device)
        if args.batch_invariant and self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ConfigError("batch_invariant runs Triton kernels and needs a CUDA GPU (on a CPU only under "
                              "TRITON_INTERPRET=1, slow, for tests); drop --batch-invariant to run on the CPU")
        parts = parts or load_parts(args, self.device, tp_rank, tp_size)
        self.model = parts["model"]
        self.tokenizer = parts["tokenizer"]
        self.source = parts["source"]
        self.model_name = self.source.name
        spec = self.model.spec
        self.spec = spec
        if args.batch_invariant and spec.is_moe:
            raise ConfigError("batch_invariant is not supported for MoE models yet (the router and the grouped GEMM "
                              "pick kernels by rows per expert); drop it for this model")
        self.max_model_len = min(args.max_model_len or spec.max_position_embeddings, spec.max_position_embeddings)
        if args.max_model_len and args.max_model_len > spec.max_position_embeddings:
            raise ConfigError(f"max_model_len {args.max_model_len} exceeds the model's context "
                              f"{spec.max_position_embeddings}")
        self.kv_dtype = resolve_kv_dtype(args.kv_cache_dtype, parts["dtype"], self.device)
        self.dense_batch_size = args.dense_batch_size or self._default_dense_batch(self.kv_dtype)
        act_bytes = sum(b.width for b in self.model.buffer_specs().values()) * self.dense_batch_size * 2
        self.memory_profile = None  # engine/memory_profile.py: what sized the KV cache, with gpu_memory_utilization
        if args.gpu_memory_utilization is not None and self.device.type == "cuda":
            from nanoflow.engine.memory_profile import profile_kv_cache

            self.memory_profile = profile_kv_cache(replace(args, dense_batch_size=self.dense_batch_size), parts,
                                                   self.device)
            args = replace(args, kv_cache_tokens=self.memory_profile.kv_tokens, gpu_memory_utilization=None)
        elif args.gpu_memory_utilization is not None:
            log.warning("gpu_memory_utilization sizes a GPU's KV cache; on %s the default capacity applies "
                        "(--kv-cache-tokens sets it)", self.device)
        kv_tokens = kv_capacity_tokens(args, spec, self.device, self.kv_dtype, act_bytes, self.model.local_kv_heads)
        bs = args.block_size
        num_blocks = kv_tokens // bs + 1  # +1: the null block
        self.kv_tokens = kv_tokens
        self.blocks = BlockManager(num_blocks, bs)
        max_seqs = args.max_num_seqs or min(self.dense_batch_size, 1024)
        self.scheduler = Scheduler(self.blocks, self.dense_batch_size, max_seqs, self.max_model_len,
                                   admission_pace=args.admission_pace)
        pipeline = self._load_pipeline(args.pipeline)
        self.runner = self._make_runner(num_blocks, bs, pipeline, comm)
        self.eos_token_ids = tuple(spec.eos_token_ids) or (
            tuple(self.tokenizer.eos_token_ids) if self.tokenizer is not None else ())
        self._rng = random.Random(args.seed)
        self._tracked: dict[str, _Tracked] = {}
        # Tracked requests with logprobs, prompt logprobs, penalties or a logit bias (SamplingParams.has_extras): only
        # while there are any is a plan scanned for them.
        self._extra_requests = 0
        self._inflight: tuple[BatchPlan, Any] | None = None
        self._counter = 0
        self.stats_iterations = 0
        self.stats_tokens = 0
        self.stats_preemptions = 0  # requests preempted (their KV freed, to be recomputed)
        self.stats_sched_s = 0.0
        self.stats_launch_s = 0.0  # CPU time to build the ForwardBatch and launch (graph replay or eager kernels)
        self.stats_wall_s = 0.0
        self.last_iteration_s = 0.0
        self.plan_hook: Callable[[BatchPlan], None] | None = None  # benchmarks keep sample plans
        freeze_gc()

    def freeze_gc(self) -> int:
        """Exempt what exists now from Python's cyclic GC (:func:`freeze_gc`); call it again after CUDA-graph capture
        and the first compiled steps, which create many more long-lived objects."""
        return freeze_gc()

    def capture_all(self, segment_buckets: tuple[int, ...] = (4,)) -> float:
        """Capture every CUDA-graph token bucket now (before traffic, so first requests stay fast), then freeze the
        GC over what that built; seconds spent (0 without CUDA graphs). The TP leader overrides it to capture on
        every rank together."""
        graphs = self.runner.graphs
        if graphs is None:
            return 0.0
        seconds = graphs.capture_all(segment_buckets)
        self.freeze_gc()
        return seconds

    def _default_dense_batch(self, kv_dtype: torch.dtype) -> int:
        """Paper §4.1.1: from GPU memory, weights, the KV cache's element size and the expected workload
        (``extra["avg_prompt"/"avg_decode"]``, default 1,024 / 512); 256 on a CPU."""
        if self.device.type != "cuda":
            return 256
        from nanoflow.scheduler.memory import dense_batch_from_memory

        total = torch.cuda.get_device_properties(self.device).total_memory
        weight_bytes = sum(t.numel() * t.element_size() for t in self.model.weights.values())
        plan = dense_batch_from_memory(self.model.spec, total, weight_bytes,
                                       float(self.args.extra.get("avg_prompt", 1024)),
                                       float(self.args.extra.get("avg_decode", 512)),
                                       dtype_bytes=torch.finfo(kv_dtype).bits // 8, block_size=self.args.block_size)
        log.info("dense batch from memory: %d tokens (%d decode requests, %d KV tokens)", plan.dense_batch_size,
                 plan.max_decode_requests, plan.kv_tokens)
        return plan.dense_batch_size

    def _load_pipeline(self, name: str | None) -> Any:
        if not name or name in ("none", "sequential", "non-overlap"):
            return None
        from nanoflow.graphs.pipeline import DEFAULT_PRESET, PipelineSpec, default_preset, load_preset

        if name == "auto":  # a spec searched for this model, dense, TP, KV dtype and decode kernel, else a preset
            from nanoflow.search.cli import cached_pipeline

            found = cached_pipeline(self.model_name, self.dense_batch_size, self.model.tp_size,
                                    self.args.kv_cache_dtype, str(self.args.extra.get("decode_variant", "auto")))
            if found is not None:
                log.info("using the searched pipeline %s", found)
                return PipelineSpec.load(found)
            name = DEFAULT_PRESET
        if name == DEFAULT_PRESET:
            name = default_preset(self.model.graphs[0])
            log.info("using the overlap preset %s", name)

        spec = PipelineSpec.load(name) if name.endswith(".json") else load_preset(name)
        spec = spec.rescaled(self.dense_batch_size) if spec.dense_batch_size != self.dense_batch_size else spec
        share = self.args.extra.get("memory_share")  # a sweep override of the spec's shares (bench --memory-share)
        return spec if share is None else spec.with_memory_share(float(share), self.model.graphs[0])

    def _make_runner(self, num_blocks: int, block_size: int, pipeline: Any, comm: Any) -> Any:
        from nanoflow.graphs.resources import ResourceConfig
        from nanoflow.graphs.runner import ModelRunner

        return ModelRunner(self.model, num_blocks, block_size, self.dense_batch_size, self.max_model_len,
                           pipeline=pipeline, comm=comm, compile_glue=self.args.compile,
                           cuda_graphs=self.args.cuda_graphs, decode_cap=self.scheduler.max_num_seqs,
                           resources=ResourceConfig(knob=self.args.resource_knob,
                                                    ctas_per_sm=int(self.args.extra.get("decode_ctas_per_sm", 2))),
                           kv_offload=self.simultaneous_offload,
                           decode_variant=str(self.args.extra.get("decode_variant", "auto")),
                           decode_options=self.args.extra.get("decode_options"), kv_dtype=self.kv_dtype,
                           staging_slots=int(self.args.extra.get("kv_staging_slots", 3)),
                           batch_invariant=self.args.batch_invariant,
                           moe_backend=str(self.args.extra.get("moe_backend", "auto")),
                           # None: the fused RoPE + KV-write kernel wherever the runner can run it (a GPU)
                           fused_rope_kv=None if self.args.extra.get("fused_rope_kv", True) else False)

    # ---- requests --------------------------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, on_output: Callable[[RequestOutput], None] | None = None
                    ) -> RequestOutput:
        """Queue one request. A request that cannot be served finishes at once with ``finish_reason="error"``."""
        params = params or SamplingParams()
        if request_id is None:
            request_id = f"req-{self._counter}"
        self._counter += 1
        if request_id in self._tracked:
            raise ValueError(f"request id {request_id!r} is already in use")
        error, ids = None, []
        text_prompt = prompt if isinstance(prompt, str) else None
        if isinstance(prompt, str):
            if self.tokenizer is None:
                error = "this model has no tokenizer; pass prompts as token-id lists"
            else:
                ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            bad = [t for t in ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.spec.vocab_size]
            if bad:
                error = f"token id {bad[0]!r} is outside the vocabulary [0, {self.spec.vocab_size})"
        if error is None and params.logit_bias and max(params.logit_bias) >= self.spec.vocab_size:
            error = (f"logit_bias names token id {max(params.logit_bias)}, outside the vocabulary "
                     f"[0, {self.spec.vocab_size})")
        if params.seed is None:
            params = _with_seed(params, self._rng.randrange(2**31))
        req = Request(request_id, ids, params, arrival_time=time.monotonic(), eos_token_ids=self.eos_token_ids)
        out = RequestOutput(request_id, text_prompt, req.prompt_token_ids, metrics=RequestMetrics(req.arrival_time),
                            logprobs=None if params.logprobs is None else [],
                            prompt_logprobs=None if params.prompt_logprobs is None else [None] * len(ids))
        detok = None
        if self.tokenizer is not None:
            from nanoflow.models.tokenizer import IncrementalDetokenizer

            detok = IncrementalDetokenizer(self.tokenizer, ids)
        tracked = _Tracked(req, out, detok, list(params.stop or []))
        tracked.on_output = on_output  # type: ignore[attr-defined]
        self._tracked[request_id] = tracked
        self._extra_requests += params.has_extras
        if error is not None:
            req.status = RequestStatus.FINISHED_ERROR
            req.error = error
            self._emit_finished(tracked)
        else:
            self.scheduler.add_request(req)
        return out

    def abort(self, request_id: str) -> None:
        tracked = self._tracked.get(request_id)
        if tracked is None or tracked.output.finished:
            return
        self.scheduler.abort(request_id)
        tracked.request.status = RequestStatus.FINISHED_ABORTED
        self._emit_finished(tracked)

    def has_unfinished(self) -> bool:
        return any(not t.output.finished for t in self._tracked.values()) or self._inflight is not None

    # ---- the loop --------------------------------------------------------------------------------------------
    def step(self) -> None:
        t0 = time.perf_counter()
        for req in self.scheduler.take_finished():
            if req.request_id in self._tracked:
                self._emit_finished(self._tracked[req.request_id])
        plan = self.scheduler.schedule()
        if plan is not None:
            self.stats_preemptions += len(plan.preempted)
        launched = None
        if plan is not None and plan.num_tokens > 0:
            sampling = self._sampling_tensors(plan)
            t_sched = time.perf_counter()
            self.stats_sched_s += t_sched - t0
            extra = self._sampling_extras(plan) if self._extra_requests else {}
            result = self.runner.execute(plan, sampling, **extra)
            self.stats_launch_s += time.perf_counter() - t_sched
            launched = (plan, result)
            if self.plan_hook is not None:
                self.plan_hook(plan)
            self.stats_tokens += plan.num_tokens
            self.stats_iterations += 1
            for seq in plan.seqs:
                tr = self._tracked.get(seq.request_id)
                if tr is not None and tr.output.metrics and tr.output.metrics.first_scheduled_time is None:
                    tr.output.metrics.first_scheduled_time = time.monotonic()
        if self.args.async_scheduling:
            previous, self._inflight = self._inflight, launched
            if previous is not None:
                self._process(*previous)
        elif launched is not None:
            self._process(*launched)
        for req in self.scheduler.take_finished():
            if req.request_id in self._tracked:
                self._emit_finished(self._tracked[req.request_id])
        self.last_iteration_s = time.perf_counter() - t0
        self.stats_wall_s += self.last_iteration_s

    def _sampling_tensors(self, plan: BatchPlan) -> SamplingTensors | None:
        reqs = [self._tracked[s.request_id].request for s in plan.seqs if s.sample]
        if all(r.sampling_params.temperature == 0 for r in reqs):
            return None
        return SamplingTensors.build(
            [r.sampling_params.temperature for r in reqs], [r.sampling_params.top_p for r in reqs],
            [r.sampling_params.top_k for r in reqs], [r.sampling_params.seed for r in reqs],
            [len(r.output_token_ids) + r.num_pending - 1 for r in reqs], self.runner.device)

    def _sampling_extras(self, plan: BatchPlan) -> dict[str, Any]:
        """``runner.execute``'s keyword arguments for what ``plan``'s requests ask beyond sampling: ``logprobs``
        (the most alternatives a sampled request asks for), ``penalties`` and ``prompt_logprobs``."""
        sampled = [self._tracked[s.request_id].request for s in plan.seqs if s.sample]
        extra: dict[str, Any] = {}
        ks = [k for r in sampled if (k := r.sampling_params.logprobs) is not None]
        if ks:
            extra["logprobs"] = max(ks)
        if (pen := self._penalties(sampled)) is not None:
            extra["penalties"] = pen
        if rows := self._prompt_logprob_rows(plan):
            extra["prompt_logprobs"] = rows
        return extra

    def _penalties(self, sampled: list[Request]) -> PenaltyLists | None:
        """The penalties and logit biases of a plan's sampled requests (in row order), None when none has any.
        Penalties count every token generated so far, so the step in flight (under async scheduling) is processed
        first: a plan with penalised requests waits for the previous step, as under synchronous scheduling."""
        rows = [i for i, r in enumerate(sampled) if r.sampling_params.adjusts_logits]
        if not rows:
            return None
        reqs = [sampled[i] for i in rows]
        ps = [r.sampling_params for r in reqs]
        if self._inflight is not None and any(p.penalized for p in ps):  # a logit bias alone needs no counts
            previous, self._inflight = self._inflight, None
            self._process(*previous)
        return PenaltyLists(rows, [p.presence_penalty for p in ps], [p.frequency_penalty for p in ps],
                            [p.repetition_penalty for p in ps],
                            [list(r.output_token_ids) if p.penalized else [] for r, p in zip(reqs, ps)],
                            [list(r.prompt_token_ids) if p.repetition_penalty != 1.0 else [] for r, p in zip(reqs, ps)],
                            [sorted((p.logit_bias or {}).items()) for p in ps])

    def _prompt_logprob_rows(self, plan: BatchPlan) -> list[PromptLogprobRows]:
        """The prefill rows of ``plan`` that predict a prompt token whose logprob is still owed. A position is asked
        for once: a request recomputed after preemption is not asked again."""
        entries = []
        for i, seq in enumerate(plan.seqs):
            tr = self._tracked.get(seq.request_id)
            if tr is None or tr.request.sampling_params.prompt_logprobs is None:
                continue
            prompt = tr.request.prompt_token_ids
            # row j of the chunk predicts position start + j + 1; owed: [prompt_logprob_next, len(prompt))
            lo = max(tr.prompt_logprob_next, seq.start + 1)
            hi = min(len(prompt), seq.start + seq.num_tokens + 1)
            if lo >= hi:
                continue
            entries.append(PromptLogprobRows(i, lo - 1 - seq.start, list(prompt[lo:hi]),
                                             tr.request.sampling_params.prompt_logprobs, seq.request_id, lo))
            tr.prompt_logprob_next = hi
        return entries

    def _process(self, plan: BatchPlan, result: Any) -> None:
        tokens = result.tokens()
        logprobs = result.logprobs() if getattr(result, "host_logprobs", None) is not None else {}
        if getattr(result, "host_prompt_logprobs", None) is not None:
            for entry, values in result.prompt_logprobs():
                tr = self._tracked.get(entry.request_id)
                if tr is not None and tr.output.prompt_logprobs is not None:
                    for j, (lp, top) in enumerate(values):
                        tr.output.prompt_logprobs[entry.first_position + j] = TokenLogprob(
                            entry.targets[j], lp, top, -1)
        finished = {r.request_id for r in self.scheduler.update(plan, tokens)}
        now = time.monotonic()
        for rid in tokens:
            tr = self._tracked.get(rid)
            if tr is None or tr.output.finished:
                continue
            req = tr.request
            new = req.output_token_ids[tr.emitted_tokens:]
            if not new:
                continue
            tr.emitted_tokens = len(req.output_token_ids)
            out = tr.output
            out.token_ids = list(req.output_token_ids)
            if out.metrics and out.metrics.first_token_time is None:
                out.metrics.first_token_time = now
            if out.logprobs is not None and rid in logprobs:
                chosen, top = logprobs[rid]
                k = req.sampling_params.logprobs or 0
                out.logprobs.append(TokenLogprob(new[-1], chosen, top[:k], len(out.text)))
            if tr.detok is not None:
                out.text += tr.detok.add(new)
                if tr.stop and self._hit_stop(tr):
                    self.scheduler.finish_request(rid, RequestStatus.FINISHED_STOPPED)
                    finished.add(rid)
            if rid in finished:
                self._emit_finished(tr)
            else:
                self._emit(tr)

    @staticmethod
    def _hit_stop(tr: _Tracked) -> bool:
        text = tr.output.text
        found = [(i, s) for s in tr.stop if (i := text.find(s)) >= 0]
        if not found:
            return False
        cut, tr.output.stop_reason = min(found)
        tr.output.text = text[:cut]
        return True  # the caller finishes the request through the scheduler, which owns its status

    def _emit(self, tr: _Tracked) -> None:
        cb = getattr(tr, "on_output", None)
        if cb is not None:
            cb(tr.output)

    def _emit_finished(self, tr: _Tracked) -> None:
        if tr.output.finished:
            return
        req = tr.request
        out = tr.output
        out.token_ids = list(req.output_token_ids)
        out.finish_reason = req.status.finish_reason or "stop"
        out.error = req.error
        if out.metrics:
            out.metrics.finished_time = time.monotonic()
        if tr.detok is not None and not tr.stop and len(out.token_ids) > tr.emitted_tokens:
            out.text += tr.detok.add(out.token_ids[tr.emitted_tokens:])
        tr.emitted_tokens = len(out.token_ids)
        self._emit(tr)
        # Finished requests are forgotten: the caller holds the RequestOutput.
        if self._tracked.pop(req.request_id, None) is not None:
            self._extra_requests -= req.sampling_params.has_extras

    def prompt_logits(self, prompts: list[list[int]]) -> torch.Tensor:
        """fp32 logits after the last token of each prompt, from one prefill batch (correctness checks).

        Runs outside the scheduler: needs an idle engine and prompts that fit one dense batch together.
        """
        from nanoflow.scheduler.batcher import BatchPlan, ScheduledSeq

        if self.has_unfinished():
            raise RuntimeError("prompt_logits needs an idle engine")
        if sum(len(p) for p in prompts) > self.dense_batch_size:
            raise ValueError(f"prompts hold {sum(len(p) for p in prompts)} tokens; the dense batch holds "
                             f"{self.dense_batch_size}")
        reqs = [Request(f"logits-{i}", list(p), SamplingParams(), 0.0) for i, p in enumerate(prompts)]
        try:
            seqs = []
            for r in reqs:
                if not self.blocks.allocate(r, len(r.prompt_token_ids)):
                    raise RuntimeError("not enough KV blocks for prompt_logits")
                seqs.append(ScheduledSeq(r.request_id, 0, len(r.prompt_token_ids), list(r.prompt_token_ids), True,
                                         r.block_ids, r))
            plan = BatchPlan(-1, [], seqs, sum(s.num_tokens for s in seqs), self.dense_batch_size, [])
            return self.runner.forward(self.runner.prepare(plan))
        finally:
            for r in reqs:
                self.blocks.free(r)

    def close(self) -> None:
        """Release device memory (KV cache, activation buffers, CUDA graphs) before building another engine."""
        runner = self.runner
        if runner.graphs is not None:
            runner.graphs.close()
            runner.graphs = None
        runner.kv_cache = None
        runner.kv_staging = None
        runner.bufs = {}
        runner.glue = {}
        self._tracked.clear()
        self._extra_requests = 0
        self._inflight = None
        # Frozen objects are never collected: hand them back to the GC so that cycles through this engine's parts
        # can go (the next engine freezes what is alive then).
        gc.unfreeze()
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()

    def run_until_done(self, progress: Callable[[int], None] | None = None) -> None:
        while self.has_unfinished():
            before = len(self._tracked)
            self.step()
            if progress is not None:
                progress(before - len(self._tracked))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _with_seed(params: SamplingParams, seed: int) -> SamplingParams:
    from dataclasses import replace

    return replace(params, seed=seed)
