"""What every model class shares: the per-iteration context its ops read, and the decoder-model base class.

Data flow of one iteration: ``Request`` (scheduler) -> ``BatchPlan`` (tokens per request) -> ``ForwardBatch``
(device tensors, built by ``graphs.runner``) -> a :class:`StepContext` per layer handed to each op's
``run(ctx, lo, hi)``. Ops read and write rows ``[lo, hi)`` of the preallocated activation buffers in
``ctx.bufs``; attention ops find the metadata of their token range with ``ctx.batch.attn_meta(lo, hi)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from nanoflow.config import ModelSpec
from nanoflow.graphs.nanoop import LayerGraph


class AttentionBackend(Protocol):
    """Paged attention over one token range; ``meta`` objects come from ``ForwardBatch.attn_meta``."""

    def decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: Any,
               out: torch.Tensor) -> None: ...

    def prefill(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: Any,
                out: torch.Tensor, k_new: torch.Tensor | None = None,
                v_new: torch.Tensor | None = None) -> None: ...


class BatchView(Protocol):
    """The parts of a ForwardBatch that ops read."""

    positions: torch.Tensor  # [T] int64
    slot_mapping: torch.Tensor  # [T] int64

    def attn_meta(self, lo: int, hi: int) -> Any: ...


@dataclass
class StepContext:
    """Everything an op of layer ``layer`` needs besides its weights (bound in the op's closure)."""

    layer: int
    bufs: dict[str, torch.Tensor]
    batch: BatchView
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    cos_sin: torch.Tensor  # [max_positions, head_dim] fp32
    attention: AttentionBackend
    comm: Any = None  # tensor-parallel communicator (None at TP=1)
    glue: dict[str, Callable[..., Any]] = field(default_factory=dict)  # possibly torch.compile'd glue functions
    kv_staging: torch.Tensor | None = None  # [layers, 2, T, kv_heads, head_dim] host rows kv_offload writes
    moe_backend: str | None = None  # the grouped GEMM of MoE layers (ops.moe.GROUPED_MM_BACKENDS); None: its default


@dataclass(frozen=True)
class BufferSpec:
    """An activation buffer of ``[tokens, width]`` elements (dtype ``None`` = the model dtype)."""

    width: int
    dtype: torch.dtype | None = None


class DecoderModel:
    """A decoder-only model as embedding -> ``num_layers`` op graphs -> final norm + LM head.

    Subclasses implement :meth:`layer_graph` (usually by calling a builder from ``models.layers``) and, if their
    weights differ from the LLaMA names, :meth:`buffer_specs`.
    """

    def __init__(self, spec: ModelSpec, weights: dict[str, torch.Tensor], tp_rank: int = 0, tp_size: int = 1):
        self.spec = spec
        self.weights = weights
        self.tp_rank = tp_rank
        self.tp_size = tp_size
        self._graphs: list[LayerGraph] | None = None

    # ---- sizes of this rank's shard ------------------------------------------------------------------------
    @property
    def local_heads(self) -> int:
        return self.spec.num_heads // self.tp_size

    @property
    def local_kv_heads(self) -> int:
        return max(1, self.spec.num_kv_heads // self.tp_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.weights["embed.weight"].dtype

    @property
    def device(self) -> torch.device:
        return self.weights["embed.weight"].device

    def buffer_specs(self) -> dict[str, BufferSpec]:
        s, d = self.spec, self.spec.head_dim
        q, kv = self.local_heads * d, self.local_kv_heads * d
        inter = s.intermediate_size // self.tp_size
        return {
            "hidden": BufferSpec(s.hidden_size),
            "residual": BufferSpec(s.hidden_size),
            "x_attn": BufferSpec(s.hidden_size),
            "qkv": BufferSpec(q + 2 * kv),
            "q": BufferSpec(q),
            "attn": BufferSpec(q),
            "attn_out": BufferSpec(s.hidden_size),
            "x_ffn": BufferSpec(s.hidden_size),
            "gate_up": BufferSpec(2 * inter),
            "act": BufferSpec(inter),
        }

    def layer_graph(self, layer: int) -> LayerGraph:
        raise NotImplementedError

    @property
    def graphs(self) -> list[LayerGraph]:
        if self._graphs is None:
            self._graphs = [self.layer_graph(i) for i in range(self.spec.num_layers)]
        return self._graphs

    # ---- ends of the network -------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor, out: torch.Tensor, comm: Any = None) -> None:
        """Write embeddings of ``input_ids [T]`` into ``out [T, hidden]`` (vocab-parallel under TP)."""
        table = self.weights["embed.weight"]
        if self.tp_size == 1:
            torch.index_select(table, 0, input_ids, out=out)
            return
        rows = table.shape[0]
        local = input_ids - self.tp_rank * rows
        valid = (local >= 0) & (local < rows)
        out.copy_(table[local.clamp(0, rows - 1)] * valid[:, None].to(table.dtype))
        comm.all_reduce(out)

    def logits(self, hidden: torch.Tensor, residual: torch.Tensor, comm: Any = None,
               glue: dict[str, Callable[..., Any]] | None = None) -> torch.Tensor:
        """Final residual add + norm + LM head for the rows to sample; fp32 ``[rows, vocab]``. ``glue`` may replace
        the norm (``add_rms_norm``) and the GEMM (``linear_into``), as batch-invariant mode does."""
        from nanoflow.ops.norm import add_rms_norm

        glue = glue or {}
        x, _ = glue.get("add_rms_norm", add_rms_norm)(hidden, residual, self.weights["norm.weight"],
                                                      self.spec.rms_norm_eps)
        head = self.weights.get("lm_head.weight", self.weights["embed.weight"])
        if "linear_into" in glue:
            out = torch.empty(x.shape[0], head.shape[0], dtype=x.dtype, device=x.device)
            glue["linear_into"](x, head, None, out)
            out = out.float()
        else:
            out = torch.mm(x, head.t()).float()
        if self.tp_size > 1:
            out = comm.all_gather_last_dim(out)
        return out[:, : self.spec.vocab_size]
