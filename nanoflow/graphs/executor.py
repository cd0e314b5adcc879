"""Runs every layer's ops over the dense batch, following a pipeline spec.

- No spec (or the trivial one): each op once over all rows, in graph order, on the current stream — the
  non-overlapped baseline.
- A spec with several nano-batches on one stream, or any spec on a CPU: nano-ops one after another in the spec's
  issue order (same kernels, smaller batches: the "nano-batch only" ablation).
- A multi-stream spec on a GPU: each nano-op is launched on its stream after waiting for the events of the nano-ops
  it depends on (paper §4.1.2 rule, plus the wrap from layer l into l+1), so compute-, memory- and network-bound
  nano-ops of different nano-batches overlap. Everything stays capturable into one CUDA graph: the side streams fork
  from and join back into the capturing stream through events.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from nanoflow.graphs.nanoop import LayerGraph, ResourceKind
from nanoflow.graphs.resources import ResourceConfig, decode_programs, gemm_carveout, make_streams, sm_target
from nanoflow.models.base import StepContext

ContextFactory = Callable[[int], StepContext]


def clip_range(lo: int, hi: int, num_tokens: int) -> tuple[int, int]:
    return min(lo, num_tokens), min(hi, num_tokens)


class Executor:
    """Lays the nano-ops of all layers on streams; ``spec=None`` means the sequential baseline."""

    def __init__(self, graphs: list[LayerGraph], spec: Any = None, device: torch.device | None = None,
                 timeline: Any = None, resources: Any = None):
        self.resources = resources or ResourceConfig()
        self.graphs = graphs
        self.spec = spec
        self.device = device or torch.device("cpu")
        self.timeline = timeline
        self._plan: Any = None
        self._streams: list[torch.cuda.Stream] | None = None
        if spec is not None:
            from nanoflow.graphs.pipeline import PipelineSpec

            assert isinstance(spec, PipelineSpec)
            self.spec = spec.for_graph(graphs[0])
            self.spec.validate(graphs[0])

    @property
    def multi_stream(self) -> bool:
        return self.spec is not None and self.spec.num_streams > 1 and self.device.type == "cuda"

    def attention_ranges(self, num_tokens: int) -> list[tuple[int, int]]:
        """Token ranges whose attention metadata the runner must build for a batch of ``num_tokens`` rows."""
        if self.spec is None:
            return [(0, num_tokens)]
        ranges = set()
        for nop in self.spec.nano_ops:
            if nop.op in ("decode_attn", "prefill_attn"):
                lo, hi = clip_range(nop.lo, nop.hi, num_tokens)
                if lo < hi:
                    ranges.add((lo, hi))
        return sorted(ranges)

    def decode_programs(self, num_tokens: int) -> dict[tuple[int, int], int | None]:
        """Persistent-grid size of each decode nano-op's range (the grid knob); only when streams overlap."""
        if not self.multi_stream:
            return {}
        out: dict[tuple[int, int], int | None] = {}
        for nop in self.spec.nano_ops:
            if nop.op == "decode_attn":
                lo, hi = clip_range(nop.lo, nop.hi, num_tokens)
                if lo < hi:
                    out[(lo, hi)] = decode_programs(nop.share, self.device, self.resources)
        return out

    def run(self, make_ctx: ContextFactory, num_tokens: int) -> None:
        if self.spec is None:
            for layer, graph in enumerate(self.graphs):
                ctx = make_ctx(layer)
                for op in graph.ops:
                    self._launch(op, ctx, layer, 0, num_tokens)
        elif not self.multi_stream:
            for layer, graph in enumerate(self.graphs):
                ctx = make_ctx(layer)
                for nop in self.spec.nano_ops:
                    lo, hi = clip_range(nop.lo, nop.hi, num_tokens)
                    if lo < hi:
                        self._launch(graph.op(nop.op), ctx, layer, lo, hi)
        else:
            self._run_streams(make_ctx, num_tokens)

    def _launch(self, op: Any, ctx: StepContext, layer: int, lo: int, hi: int, stream_label: str = "s0",
                carveout: int | None = None) -> None:
        if carveout is not None:  # a partitioned GEMM: launch it with its SM target, then restore the default
            with sm_target(carveout):
                self._launch(op, ctx, layer, lo, hi, stream_label)
            return
        if self.timeline is not None:
            self.timeline.begin(layer, op.name, lo, hi, stream_label)
            op.run(ctx, lo, hi)
            self.timeline.end()
        else:
            op.run(ctx, lo, hi)

    # ---- multi-stream ----------------------------------------------------------------------------------------
    def _prepare_streams(self) -> None:
        if self._plan is not None:
            return
        graph = self.graphs[0]
        spec = self.spec
        self._deps = spec.dependencies(graph)
        self._wrap = spec.wrap_dependencies(graph)
        self._streams = make_streams(spec, self.device, self.resources)
        # SM carve-out of each COMPUTE nano-op under the ``partition`` knob (None elsewhere).
        self._carveouts = [gemm_carveout(nop.share, self.device, self.resources)
                           if graph.op(nop.op).kind is ResourceKind.COMPUTE else None for nop in spec.nano_ops]
        self._plan = True

    def _run_streams(self, make_ctx: ContextFactory, num_tokens: int) -> None:
        self._prepare_streams()
        spec, streams = self.spec, self._streams
        assert streams is not None
        origin = torch.cuda.current_stream(self.device)
        fork = torch.cuda.Event()
        fork.record(origin)
        for s in streams:
            s.wait_event(fork)
        prev_events: list[torch.cuda.Event | None] = [None] * len(spec.nano_ops)
        for layer, graph in enumerate(self.graphs):
            ctx = make_ctx(layer)
            events: list[torch.cuda.Event | None] = [None] * len(spec.nano_ops)
            for i, nop in enumerate(spec.nano_ops):
                stream = streams[nop.stream]
                waits = [events[j] for j in self._deps[i]]
                if layer > 0:
                    waits += [prev_events[j] for j in self._wrap[i]]
                for ev in waits:
                    if ev is not None:
                        stream.wait_event(ev)
                lo, hi = clip_range(nop.lo, nop.hi, num_tokens)
                with torch.cuda.stream(stream):
                    if lo < hi:
                        self._launch(graph.op(nop.op), ctx, layer, lo, hi, f"s{nop.stream}", self._carveouts[i])
                    ev = torch.cuda.Event()
                    ev.record(stream)
                events[i] = ev
            prev_events = events
        for s in streams:
            done = torch.cuda.Event()
            done.record(s)
            origin.wait_event(done)
