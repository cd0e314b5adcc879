"""Capture and replay of the whole forward pass (embedding + all layers, every stream) per ``BatchShape``.

A captured graph reads only static device buffers: token ids, positions, KV slots and, per attention range, the
decode rows' page tables and lengths and the prefill segments' offsets, lengths and page tables — each sized to a
capacity. Replay copies the iteration's facts into them (rows past the real ones get length 0, which the kernels
skip) and launches the graph. Shapes are captured lazily the first time a batch needs them (warm-up run first, so
torch.compile and Triton autotuning happen outside capture), all into one shared memory pool. A batch that fits no
capacity (too many prefill segments, more tokens than the dense batch) runs eagerly. With KV offload the graph
writes a fixed pinned host staging buffer, so each shape is captured once per staging slot.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from nanoflow.graphs.forward_batch import DecodeMeta, ForwardBatch, PrefillMeta, RangeMeta

log = logging.getLogger("nanoflow")

SEGMENT_BUCKETS = (4, 16, 64)


@dataclass(frozen=True)
class BatchShape:
    """What a captured graph is specialised to: padded token rows, prefill segments per attention range and the KV
    staging slot its ``kv_offload`` ops write (always 0 without KV offload)."""

    num_tokens: int
    prefill_segments: int
    staging_slot: int = 0


def token_buckets(dense: int, fine: int = 128, coarse: int = 256, fine_up_to: int = 1024) -> list[int]:
    """The token counts graphs are captured for, largest first: ``dense``, multiples of ``coarse`` below it down to
    ``fine_up_to``, then multiples of ``fine``. A batch of ``n`` tokens runs the smallest one ``>= n``, padded.

    Halvings (2,048, 1,024, 512, 256, 128) padded a decode-only batch of 513-560 rows to 1,024: 41.6 ms a step against
    28.7 ms for 480-512 rows (LLaMA-3-8B, H200, s8-bench-fp8kv-gcfreeze-h200-llama3-8b.json). A step model with the
    padded size as a term fits those runs' traces (rms 1.8 ms LLaMA-3-8B, 2.1 ms Mixtral-8x7B) and predicts these
    12 buckets save 1.4% of the LLaMA run's GPU time and 3.6% of Mixtral's (drain and decode-only steps), for 2.4x
    the capture time of the 5 halvings.
    """
    sizes = {dense}
    s = fine
    while s < dense:
        sizes.add(s)
        s += fine if s < fine_up_to else coarse
    return sorted(sizes, reverse=True)


def halving_buckets(dense: int, smallest: int = 128) -> list[int]:
    """The token counts graphs were captured for before :func:`token_buckets` (runs up to session 8): ``dense`` halved
    down to ``smallest``, largest first. Kept to model those runs' traces (``scripts/step_model.py``,
    ``scripts/sim_admission.py``)."""
    sizes = [dense]
    while sizes[-1] // 2 >= smallest and sizes[-1] % 2 == 0:
        sizes.append(sizes[-1] // 2)
    return sizes


@dataclass
class _Captured:
    shape: BatchShape
    graph: torch.cuda.CUDAGraph
    batch: ForwardBatch  # the static buffers the graph reads


class CudaGraphRunner:
    """Owns the captured graphs of one ModelRunner."""

    def __init__(self, runner: Any, max_blocks: int, decode_cap: int, compile_glue: bool,
                 glue: dict[str, Any] | None = None):
        """``glue``: the runner's glue ops (the fused RoPE + KV write, batch-invariant mode's GEMMs and norms), used
        in every capture; with ``compile_glue`` the other element-wise ops are the torch.compile'd ones."""
        self.runner = runner
        self.device = runner.device
        self.max_blocks = max_blocks
        self.decode_cap = decode_cap
        self.sizes = token_buckets(runner.max_tokens)
        self.pool = None
        self.captured: dict[BatchShape, _Captured] = {}
        self.glue: dict[str, Any] = dict(glue or {})
        if compile_glue:
            from nanoflow.graphs.glue import compiled_glue

            self.glue = {**compiled_glue(), **self.glue}
        self.capture_seconds = 0.0
        self.replays = 0
        self.eager_runs = 0

    # ---- choosing a shape ------------------------------------------------------------------------------------
    def padded_tokens(self, n: int) -> int:
        """Rows a batch of ``n`` real tokens is padded to (the smallest captured size that holds it)."""
        return next((s for s in reversed(self.sizes) if s >= n), n)

    def shape_for(self, batch: ForwardBatch) -> BatchShape | None:
        t = next((s for s in reversed(self.sizes) if s >= batch.num_tokens), None)
        if t is None:
            return None
        segs = max((m.prefill.num_segments for m in batch.ranges.values() if m.prefill is not None), default=0)
        bucket = next((b for b in SEGMENT_BUCKETS if b >= segs), None)
        if bucket is None:
            return None
        decode_rows = max((m.decode.rows for m in batch.ranges.values() if m.decode is not None), default=0)
        if decode_rows > self.decode_cap:
            return None
        return BatchShape(t, bucket, batch.staging_slot)

    def run(self, batch: ForwardBatch) -> bool:
        """Replay the graph for ``batch``'s shape (capturing it first if needed); False = caller runs eagerly."""
        shape = self.shape_for(batch)
        if shape is None:
            self.eager_runs += 1
            return False
        cap = self.captured.get(shape)
        if cap is None:
            cap = self._capture(shape)
        self._load(cap.batch, batch, shape)
        cap.graph.replay()
        self.replays += 1
        # Rows the caller reads (sample rows) index the shared activation buffers, which the graph wrote.
        return True

    # ---- static buffers --------------------------------------------------------------------------------------
    def _static_batch(self, shape: BatchShape) -> ForwardBatch:
        dev, t = self.device, shape.num_tokens
        i32 = dict(dtype=torch.int32, device=dev)
        batch = ForwardBatch(
            num_tokens=t, num_real_tokens=t,
            input_ids=torch.zeros(t, dtype=torch.int64, device=dev),
            prev_index=torch.full((t,), -1, dtype=torch.int64, device=dev),
            positions=torch.zeros(t, dtype=torch.int64, device=dev),
            slot_mapping=torch.zeros(t, dtype=torch.int64, device=dev),
            sample_rows=torch.zeros(0, dtype=torch.int64, device=dev),
            sample_request_ids=[],
            staging_slot=shape.staging_slot,
        )
        programs = self.runner.executor.decode_programs(t)
        for lo, hi in self.runner.executor.attention_ranges(t):
            rows = max(0, min(hi, self.decode_cap) - lo)
            dec = None
            if rows > 0:
                dec = DecodeMeta(rows=rows, block_tables=torch.zeros(rows, self.max_blocks, **i32),
                                 seq_lens=torch.zeros(rows, **i32))
                dec.num_splits, dec.workspace = self._decode_workspace(rows)
                dec.max_programs = programs.get((lo, hi))
            s = shape.prefill_segments
            pre = PrefillMeta(num_segments=s, q_start=torch.zeros(s, **i32), q_len=torch.zeros(s, **i32),
                              ctx_len=torch.zeros(s, **i32), block_tables=torch.zeros(s, self.max_blocks, **i32),
                              max_q_len=hi - lo)
            batch.ranges[(lo, hi)] = RangeMeta(dec, pre)
        return batch

    def _decode_workspace(self, rows: int) -> Any:
        from nanoflow.ops.attention.split_kv import decode_workspace, default_num_splits

        spec = self.runner.spec
        model = self.runner.model
        # The row decode kernel has one program per row (all kv heads), the packed one per (row, group of kv heads),
        # the split kernel one per (row, kv head).
        variant = getattr(self.runner.attention, "decode_variant", "split")
        per_row = model.local_kv_heads
        if variant in ("row", "row_flat"):
            per_row = 1
        elif variant == "packed":
            from nanoflow.ops.attention.decode_packed import default_head_group

            options = getattr(self.runner.attention, "decode_options", {})
            per_row //= options.get("head_group") or default_head_group(per_row, model.local_heads // per_row)
        splits = self.runner.attention.num_splits or default_num_splits(rows, per_row, self.device)
        return splits, decode_workspace(rows, model.local_heads, spec.head_dim, splits, self.device)

    def _load(self, static: ForwardBatch, batch: ForwardBatch, shape: BatchShape) -> None:
        n = batch.num_tokens  # already padded by the runner to shape.num_tokens
        static.input_ids[:n].copy_(batch.input_ids, non_blocking=True)
        static.positions[:n].copy_(batch.positions, non_blocking=True)
        static.slot_mapping[:n].copy_(batch.slot_mapping, non_blocking=True)
        static.prev_index.fill_(-1)
        if batch.prev_index is not None:
            static.prev_index[:n].copy_(batch.prev_index, non_blocking=True)
        for key, meta in static.ranges.items():
            self._load_range(meta, batch.ranges.get(key, RangeMeta(None, None)))

    @staticmethod
    def _load_range(dst: RangeMeta, src: RangeMeta) -> None:
        if dst.decode is not None:
            d, s = dst.decode, src.decode
            d.seq_lens.zero_()
            if s is not None:
                w = s.block_tables.shape[1]
                d.block_tables[: s.rows, :w].copy_(s.block_tables, non_blocking=True)
                d.seq_lens[: s.rows].copy_(s.seq_lens, non_blocking=True)
        if dst.prefill is not None:
            d, s = dst.prefill, src.prefill
            d.q_len.zero_()
            if s is not None:
                k, w = s.num_segments, s.block_tables.shape[1]
                d.q_start[:k].copy_(s.q_start, non_blocking=True)
                d.q_len[:k].copy_(s.q_len, non_blocking=True)
                d.ctx_len[:k].copy_(s.ctx_len, non_blocking=True)
                d.block_tables[:k, :w].copy_(s.block_tables, non_blocking=True)

    # ---- capture ---------------------------------------------------------------------------------------------
    def capture_all(self, segment_buckets: tuple[int, ...] = (4,)) -> float:
        """Capture every token bucket (largest first, so later captures reuse the pool) before serving.

        Returns the seconds spent. Shapes with more prefill segments are still captured on first use.
        """
        t0 = time.perf_counter()
        slots = range(self.runner.kv_staging.shape[0]) if self.runner.kv_staging is not None else (0,)
        for t in self.sizes:
            for seg in segment_buckets:
                for slot in slots:
                    shape = BatchShape(t, seg, slot)
                    if shape not in self.captured:
                        self._capture(shape)
        return time.perf_counter() - t0

    def close(self) -> None:
        """Drop every graph and its static buffers (frees the shared pool once nothing else holds it)."""
        self.captured.clear()
        self.pool = None
        self.glue = {}

    def _capture(self, shape: BatchShape) -> _Captured:
        t0 = time.perf_counter()
        static = self._static_batch(shape)
        runner = self.runner
        # Warm-up on a side stream (compiles, autotunes, allocates), as CUDA-graph capture requires.
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):
                runner.run_layers(static, glue=self.glue)
        torch.cuda.current_stream(self.device).wait_stream(side)
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            runner.run_layers(static, glue=self.glue)
        if self.pool is None:
            self.pool = graph.pool()
        torch.cuda.synchronize(self.device)
        cap = _Captured(shape, graph, static)
        self.captured[shape] = cap
        dt = time.perf_counter() - t0
        self.capture_seconds += dt
        log.info("captured CUDA graph for %s in %.1f s", shape, dt)
        return cap
