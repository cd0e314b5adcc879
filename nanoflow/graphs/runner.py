"""ModelRunner: ``BatchPlan`` -> ``ForwardBatch`` -> logits -> sampled token ids, all on the device.

The runner owns the paged KV cache, the activation buffers (sized to the dense batch), the RoPE table and the
executor. ``execute`` returns at once with the sampled ids still on the device (plus a non-blocking copy to pinned
host memory and an event), so the engine can form the next plan while the GPU works (async scheduling, paper §4.2.1).
A decode whose input token is not yet known on the CPU (``-1`` in the plan) takes it from the previous iteration's
sampled ids on the device.

KV offload (``kv_offload=True``, paper §4.2.2): every layer graph gets the ``kv_offload`` op, which copies the K/V of
the step's tokens into a pinned host staging buffer ``kv_staging [2, layers, 2, max_tokens, kv_heads, head_dim]``
while the step runs. There are ``staging_slots`` (default 3) slots, used by steps in turn
(``ForwardBatch.staging_slot``; each CUDA-graph shape is captured once per slot): the engine reads step i's rows only
after launching step i+1, and with three slots a consumer of step i's rows has until step i+3 is launched -- a whole
step of GPU time -- where two slots left it only the CPU's planning time between step i's end and step i+2's launch
(on an H200, 421 of ~430 offloading steps waited for the worker, 2.2 s of a 20 s run; s5-offload-throughput-h200.json).
``StepResult.kv_rows`` is the slot a step wrote (``StepResult.staging_slot`` its index); read it after ``tokens()``
(which waits for the step). A consumer that reads the slot later (the offloading engine's background worker) sets
``staging_guard``: ``forward`` calls it with the slot just before launching a step that overwrites that slot, and it
must return only once the slot's previous rows have been consumed.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from nanoflow.graphs.executor import Executor
from nanoflow.graphs.forward_batch import ForwardBatch, HostSeq, build_range_meta, to_device, token_arrays
from nanoflow.models.base import DecoderModel, StepContext
from nanoflow.ops.attention.backends import make_backend, resolve_decode_variant
from nanoflow.ops.rotary import cos_sin_cache
from nanoflow.ops.sampling import (
    PenaltyLists,
    PenaltyTensors,
    PromptLogprobRows,
    SamplingTensors,
    apply_penalties,
    sample,
)


@dataclass
class StepResult:
    """Sampled ids of one iteration; ``tokens()`` waits for the device copy."""

    request_ids: list[str]
    device_ids: torch.Tensor  # [n] int64 on the device
    host_ids: torch.Tensor  # [n] int64, pinned when on a GPU
    event: Any
    kv_rows: torch.Tensor | None = None  # [layers, 2, T, kv_heads, head_dim] staged K/V rows (kv_offload only)
    staging_slot: int = 0  # which staging slot kv_rows is
    host_logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # chosen [n], top ids/lps [n, k]
    prompt_rows: list[PromptLogprobRows] | None = None
    host_prompt_logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # over prompt_rows' rows

    def tokens(self) -> dict[str, int]:
        if self.event is not None:
            self.event.synchronize()
        return dict(zip(self.request_ids, self.host_ids.tolist()))

    def logprobs(self) -> dict[str, tuple[float, tuple[tuple[int, float], ...]]]:
        """Per request: the sampled token's logprob and the top ``(id, logprob)`` pairs (after :meth:`tokens`)."""
        if self.host_logprobs is None:
            return {}
        chosen, top_ids, top_lps = (t.tolist() for t in self.host_logprobs)
        return {rid: (c, tuple(zip(i, lp))) for rid, c, i, lp in zip(self.request_ids, chosen, top_ids, top_lps)}

    def prompt_logprobs(self) -> list[tuple[PromptLogprobRows, list[tuple[float, tuple[tuple[int, float], ...]]]]]:
        """Per entry of ``prompt_rows``: each row's target logprob and top ``(id, logprob)`` pairs (after
        :meth:`tokens`)."""
        if self.host_prompt_logprobs is None or not self.prompt_rows:
            return []
        chosen, top_ids, top_lps = (t.tolist() for t in self.host_prompt_logprobs)
        out, at = [], 0
        for entry in self.prompt_rows:
            n = len(entry.targets)
            out.append((entry, [(chosen[r], tuple(zip(top_ids[r][:entry.k], top_lps[r][:entry.k])))
                                for r in range(at, at + n)]))
            at += n
        return out


PROMPT_LOGPROB_ROWS = 256  # prompt rows per LM-head slice: [256, vocab] fp32 logits at a time (128 MB at 128k)


def token_logprobs(logits: torch.Tensor, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
    """``(logprob of ids [n], top-k ids [n, k], their logprobs [n, k])`` under ``log_softmax(logits)`` in fp32."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    chosen = lp.gather(1, ids.view(-1, 1)).view(-1)
    top_lps, top_ids = lp.topk(k, dim=-1) if k > 0 else (lp[:, :0], ids.view(-1, 1)[:, :0])
    return chosen, top_ids, top_lps


def _to_pinned(t: torch.Tensor) -> torch.Tensor:
    host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    host.copy_(t, non_blocking=True)
    return host


class ModelRunner:
    def __init__(self, model: DecoderModel, num_blocks: int, block_size: int, max_tokens: int,
                 max_model_len: int, attention: str | None = None, pipeline: Any = None, comm: Any = None,
                 compile_glue: bool = False, cuda_graphs: bool = False, decode_cap: int | None = None,
                 resources: Any = None, kv_offload: bool = False, decode_variant: str = "split",
                 decode_options: dict[str, Any] | None = None, kv_dtype: torch.dtype | None = None,
                 staging_slots: int = 3, batch_invariant: bool = False, moe_backend: str | None = None,
                 fused_rope_kv: bool | None = None):
        self.model = model
        self.spec = model.spec
        self.device = model.device
        self.block_size = block_size
        self.max_tokens = max_tokens
        self.comm = comm
        dtype = model.dtype
        cache_shape = (self.spec.num_layers, 2, num_blocks, block_size, model.local_kv_heads, self.spec.head_dim)
        # kv_dtype: the model's dtype, or float8 (store_kv rounds into it; the attention kernels widen on load).
        self.kv_cache = torch.zeros(cache_shape, dtype=kv_dtype or dtype, device=self.device)
        self.bufs = {
            name: torch.zeros(max_tokens, b.width, dtype=b.dtype or dtype, device=self.device)
            for name, b in model.buffer_specs().items()
        }
        self.cos_sin = cos_sin_cache(self.spec.head_dim, max(max_model_len, 1) + 1, self.spec.rope_theta,
                                     self.spec.rope_scaling, self.device)
        self.batch_invariant = batch_invariant
        self.moe_backend = moe_backend  # this engine's grouped GEMM backend (MoE models), passed to every op
        backend = attention or ("triton" if self.device.type == "cuda" or batch_invariant else "torch")
        if batch_invariant:  # ops.batch_invariant; the decode kernel is fixed by the backend
            if self.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                raise ValueError("batch-invariant mode runs Triton kernels: it needs a CUDA GPU (on a CPU only under "
                                 "TRITON_INTERPRET=1, which is slow and meant for tests)")
            if decode_variant == "auto":  # TritonAttention refuses any other kernel or tiles
                decode_variant = "split"
        elif backend == "triton":
            decode_variant = resolve_decode_variant(decode_variant, self.kv_cache[0, 0], self.kv_cache[0, 1],
                                                    model.local_heads, block_size, decode_options, dtype)
        self.attention = make_backend(backend, 1.0 / math.sqrt(self.spec.head_dim), block_size,
                                      decode_variant=decode_variant, decode_options=decode_options,
                                      batch_invariant=batch_invariant)
        graphs = model.graphs
        self.kv_staging: torch.Tensor | None = None
        self._staging_slot = 0
        self.staging_guard: Callable[[int], None] | None = None  # see the module docstring
        if kv_offload:
            from nanoflow.models.layers import with_kv_offload

            graphs = [with_kv_offload(g) for g in graphs]
            if staging_slots < 2:
                raise ValueError(f"staging_slots must be >= 2 (a step's rows are read after the next launch), "
                                 f"got {staging_slots}")
            self.kv_staging = torch.zeros((staging_slots, *cache_shape[:2], max_tokens, *cache_shape[4:]),
                                          dtype=self.kv_cache.dtype, pin_memory=self.device.type == "cuda")
        self.executor = Executor(graphs, pipeline, self.device, resources=resources)
        self.glue: dict[str, Any] = {}
        if batch_invariant:  # its GEMMs and norms; the element-wise glue runs eagerly (never compiled per shape)
            from nanoflow.ops.batch_invariant import batch_invariant_glue

            self.glue = batch_invariant_glue()
            compile_glue = False
        # RoPE and the KV write in one Triton kernel (ops.rope_kv); by default on a GPU. It computes each token alone,
        # so batch-invariant mode keeps it.
        if fused_rope_kv is None:
            fused_rope_kv = self.device.type == "cuda"
        if fused_rope_kv:
            from nanoflow.ops.rope_kv import rope_kv_store

            self.glue["rope_kv_store"] = rope_kv_store
        self.fused_rope_kv = fused_rope_kv
        self.compile_glue = compile_glue
        self.max_seqs = max_tokens
        # The previous iteration's sampled ids live in a static buffer so captured graphs can read them.
        self.prev_ids = torch.zeros(self.max_seqs, dtype=torch.int64, device=self.device)
        self._prev_rows: dict[str, int] = {}
        self.graphs: Any = None
        if cuda_graphs and self.device.type == "cuda":
            from nanoflow.graphs.cuda_graph import CudaGraphRunner

            max_blocks = -(-(max_model_len + 1) // block_size)
            self.graphs = CudaGraphRunner(self, max_blocks, decode_cap or max_tokens, compile_glue, glue=self.glue)

    # ---- building the forward batch ---------------------------------------------------------------------------
    def prepare(self, plan: Any) -> ForwardBatch:
        decode, prefill, ids = [], [], []
        unresolved: list[tuple[int, str]] = []
        row = 0
        for seq in plan.decode:
            decode.append(HostSeq(row, seq.start, seq.num_tokens, seq.block_table))
            if seq.input_token_ids[0] < 0:
                unresolved.append((row, seq.request_id))
            ids.extend(seq.input_token_ids)
            row += seq.num_tokens
        for seq in plan.prefill:
            prefill.append(HostSeq(row, seq.start, seq.num_tokens, seq.block_table))
            ids.extend(seq.input_token_ids)
            row += seq.num_tokens
        if row > self.max_tokens:
            raise ValueError(f"plan has {row} tokens; the runner was sized for {self.max_tokens}")
        # With CUDA graphs the batch is padded to a captured size; padding rows write KV into the null block.
        num_tokens = self.graphs.padded_tokens(row) if self.graphs is not None else row
        ids.extend([0] * (num_tokens - row))
        positions, slots = token_arrays(decode, prefill, self.block_size, num_tokens)
        dev = self.device
        input_ids = torch.tensor(ids, dtype=torch.int64)
        prev_index = None
        if unresolved:
            idx = np.full(num_tokens, -1, dtype=np.int64)
            for r, rid in unresolved:
                if rid not in self._prev_rows:
                    raise RuntimeError(f"request {rid} needs the previous iteration's token, which it did not sample")
                idx[r] = self._prev_rows[rid]
            prev_index = to_device(torch.from_numpy(idx), dev)
        sample_rows, sample_ids = [], []
        for s, seq in zip(decode + prefill, plan.decode + plan.prefill):
            if seq.sample:
                sample_rows.append(s.row + s.num_tokens - 1)
                sample_ids.append(seq.request_id)
        batch = ForwardBatch(
            num_tokens=num_tokens,
            num_real_tokens=row,
            input_ids=to_device(input_ids, dev),
            prev_index=prev_index,
            positions=to_device(torch.from_numpy(positions), dev),
            slot_mapping=to_device(torch.from_numpy(slots), dev),
            sample_rows=to_device(torch.tensor(sample_rows, dtype=torch.int64), dev),
            sample_request_ids=sample_ids,
        )
        if self.kv_staging is not None:
            batch.staging_slot = self._staging_slot
            self._staging_slot = (self._staging_slot + 1) % self.kv_staging.shape[0]
        keep_host = self.attention.name == "torch"
        programs = self.executor.decode_programs(num_tokens)
        for lo, hi in self.executor.attention_ranges(num_tokens):
            meta = batch.ranges[(lo, hi)] = build_range_meta(decode, prefill, lo, hi, dev, keep_host)
            if meta.decode is not None:
                meta.decode.max_programs = programs.get((lo, hi))
        return batch

    # ---- running ---------------------------------------------------------------------------------------------
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Run all layers (replaying a captured CUDA graph when one fits); fp32 logits of the sampling rows."""
        if self.kv_staging is not None and self.staging_guard is not None:
            self.staging_guard(batch.staging_slot)  # the slot's previous rows must be consumed before it is rewritten
        if self.graphs is None or not self.graphs.run(batch):
            self.run_layers(batch)
        rows = batch.sample_rows
        return self.model.logits(self.bufs["hidden"][rows], self.bufs["residual"][rows], self.comm, glue=self.glue)

    def run_layers(self, batch: ForwardBatch, glue: dict[str, Any] | None = None) -> None:
        """Embedding + every layer over ``batch.num_tokens`` rows, leaving ``hidden``/``residual`` in the buffers."""
        t = batch.num_tokens
        ids = batch.input_ids
        if batch.prev_index is not None:
            prev = self.prev_ids
            ids = torch.where(batch.prev_index >= 0, prev[batch.prev_index.clamp(min=0)], ids)
        self.model.embed(ids, self.bufs["hidden"][:t], self.comm)
        self.bufs["residual"][:t].zero_()
        glue = self.glue if glue is None else glue
        staging = None if self.kv_staging is None else self.kv_staging[batch.staging_slot]

        def make_ctx(layer: int) -> StepContext:
            return StepContext(layer=layer, bufs=self.bufs, batch=batch, k_cache=self.kv_cache[layer, 0],
                               v_cache=self.kv_cache[layer, 1], cos_sin=self.cos_sin, attention=self.attention,
                               comm=self.comm, glue=glue, kv_staging=staging, moe_backend=self.moe_backend)

        self.executor.run(make_ctx, t)

    def execute(self, plan: Any, sampling: SamplingTensors | None, logprobs: int | None = None,
                penalties: PenaltyLists | None = None,
                prompt_logprobs: list[PromptLogprobRows] | None = None) -> StepResult:
        """Run ``plan`` and sample; ``logprobs`` (the most any sampled request asks for, None = none) adds every
        sampled row's logprobs (of the model's logits, before penalties) to the result; ``penalties`` change the
        logits the penalised rows sample from; ``prompt_logprobs`` adds those prefill rows' prompt-token logprobs."""
        batch = self.prepare(plan)
        logits = self.forward(batch)
        prompt_lp = None if not prompt_logprobs else self._prompt_logprobs(plan, prompt_logprobs)
        scores = logits if penalties is None else apply_penalties(logits, PenaltyTensors.build(penalties, self.device))
        if sampling is None:
            ids = scores.argmax(dim=-1)
        else:
            ids = sample(scores, sampling)
        result = self._finish(batch.sample_request_ids, ids, None if logprobs is None else
                              token_logprobs(logits, ids, logprobs), prompt_lp)
        result.prompt_rows = prompt_logprobs
        if self.kv_staging is not None:
            result.kv_rows = self.kv_staging[batch.staging_slot]
            result.staging_slot = batch.staging_slot
        return result

    def _prompt_logprobs(self, plan: Any, entries: list[PromptLogprobRows]) -> tuple[torch.Tensor, ...]:
        """Log-softmax of the LM head over the entries' prefill rows (read from the hidden-state buffers the forward
        left), in slices of PROMPT_LOGPROB_ROWS rows: ``(target logprobs, top ids, top logprobs)`` over all rows."""
        starts, at = [], 0
        for seq in plan.seqs:
            starts.append(at)
            at += seq.num_tokens
        rows = to_device(torch.tensor([starts[e.seq_index] + e.first_row + j for e in entries
                                       for j in range(len(e.targets))], dtype=torch.int64), self.device)
        targets = to_device(torch.tensor([t for e in entries for t in e.targets], dtype=torch.int64), self.device)
        k = max(e.k for e in entries)
        parts = []
        for lo in range(0, rows.shape[0], PROMPT_LOGPROB_ROWS):
            r = rows[lo:lo + PROMPT_LOGPROB_ROWS]
            logits = self.model.logits(self.bufs["hidden"][r], self.bufs["residual"][r], self.comm, glue=self.glue)
            parts.append(token_logprobs(logits, targets[lo:lo + PROMPT_LOGPROB_ROWS], k))
        return tuple(torch.cat(p) for p in zip(*parts))

    def _finish(self, request_ids: list[str], ids: torch.Tensor, logprobs: tuple[torch.Tensor, ...] | None = None,
                prompt_logprobs: tuple[torch.Tensor, ...] | None = None) -> StepResult:
        def pinned(ts: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...] | None:
            return None if ts is None else tuple(_to_pinned(t) for t in ts)

        if self.device.type == "cuda":
            host, host_lp, host_plp = _to_pinned(ids), pinned(logprobs), pinned(prompt_logprobs)
            event = torch.cuda.Event()
            event.record()
        else:
            host, host_lp, host_plp, event = ids, logprobs, prompt_logprobs, None
        result = StepResult(request_ids, ids, host, event, host_logprobs=host_lp, host_prompt_logprobs=host_plp)
        self.prev_ids[: ids.shape[0]].copy_(ids)
        self._prev_rows = {rid: i for i, rid in enumerate(request_ids)}
        return result
