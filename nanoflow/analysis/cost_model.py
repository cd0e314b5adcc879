"""The paper's cost model of LLM serving (§3.2-3.5): per-operation costs, T_R and optimal throughput.

Inputs: a :class:`~nanoflow.config.ModelSpec`, a :class:`~nanoflow.analysis.hardware.GPUSpec`, the tensor-parallel
degree ``n_gpu``, the dense batch ``B`` (tokens per iteration), a :class:`Workload` (average prompt ``p`` and decode
``d`` lengths) and the bytes per element ``S`` (weights, activations and KV cache alike).

Conventions (all chosen so that Table 2 of the paper is reproduced; see tests/test_analysis.py):

- Every quantity is *aggregate*: summed over all layers and all ``n_gpu`` GPUs. A time is that quantity divided by
  the aggregate rate of the ``n_gpu`` GPUs (compute, memory bandwidth, one-way network bandwidth); with perfect
  tensor-parallel sharding this equals the per-GPU time. GB are 10^9 bytes, GFLOP 10^9 FLOP.
- Token split: in steady state a request contributes ``p`` prefill and ``d`` decode tokens, so of the ``B`` tokens
  of a dense batch ``B*d/(p+d)`` are decode tokens and ``B*p/(p+d)`` prefill tokens (fractional expectations).
- Context: a decode token attends to ``p + d/2`` earlier tokens on average; a prefill token's attention is counted
  over the whole prompt, ``p`` (an unmasked ``p x p`` score matrix, as the paper's PfAttn row counts it; causal
  masking would halve the real work).
- Table 2 is LLaMA-2-70B on 8 x A100-80GB (2,000 GB/s is the bandwidth that gives its T_mem column; 312 TFLOP/s
  and 300 GB/s one-way NVLink give T_comp and T_net), B = 2048 and the decode-heavy workload p = 512, d = 1024
  (§6.4's "Input 512, Output 1024"): 1365.3 decode tokens at context 1024 and 682.7 prefill tokens of 512-token
  prompts reproduce DecAttn/PfAttn FLOPs within 0.03%, DecAttn memory within 0.1%; PfAttn memory comes out
  2.01 GB against the paper's 2.1.

Rows (``L`` layers, hidden ``D``, query width ``Q = heads*head_dim``, KV width ``K = kv_heads*head_dim``,
intermediate ``I``; ``n_dec``/``n_pf`` decode/prefill tokens; ``c`` = ``p + d/2``):

- ``kqv``: FLOP ``2*B*D*(Q+2K)*L``; memory ``S*L*(D*(Q+2K) + B*D + B*(Q+2K))`` (weights, input, output).
- ``o``: FLOP ``2*B*Q*D*L``; memory ``S*L*(Q*D + B*Q + B*D)``.
- ``ug``: FLOP ``2*B*D*2I*L``; memory ``S*L*(D*2I + B*D + B*2I)``.
- ``d``: FLOP ``2*B*I*D*L``; memory ``S*L*(I*D + B*I + B*D)``.
  MoE models: FLOP and activations use the ``k`` active experts per token, weights all experts a batch touches
  (``min(E, B*k)``); the router GEMM is added to ``ug``.
- ``dec_attn``: FLOP ``4*Q*c*n_dec*L`` (QK^T and PV); memory ``S*L*n_dec*(2*K'*c + 2Q + 2K)`` (the KV cache of
  the context, plus q, new k/v and the output). ``K'`` counts KV heads replicated when ``n_gpu`` exceeds them.
- ``pf_attn``: FLOP ``4*Q*p*n_pf*L``; memory ``S*L*n_pf*(2Q + 2K)``.
- ``net``: two all-reduces of ``[B, D]`` per layer (after ``o`` and ``d``). A ring all-reduce sends
  ``2(N-1)/N*B*D*S`` bytes per GPU, so the aggregate traffic is ``4*(N-1)*B*D*S*L`` (eq. 3); memory traffic is the
  same bytes; FLOP ``2*(N-1)*B*D*L`` (the reduction adds). All zero when ``n_gpu == 1``.

The equation-level model of §3.2-3.5 is reported beside the rows: eq. (1) ``T_mem = MemSize/MemBW``, eq. (2)
``T_compute = 2*B*P/Compute`` with ``P`` the active parameters, eq. (3) ``T_net``, eq. (4) ``T_R = T_mem/T_compute``
and eq. (5) ``Compute/(2P)`` tokens/s/GPU. Memory model for the maximum dense batch: see :func:`memory_plan`.
"""

from __future__ import annotations

import enum
import math
import re
from dataclasses import asdict, dataclass
from types import MappingProxyType
from typing import Any

from nanoflow.analysis.hardware import GPUSpec
from nanoflow.config import ModelSpec

OP_NAMES = ("kqv", "o", "ug", "d", "dec_attn", "pf_attn", "net")


class AnalysisError(ValueError):
    """Inputs the cost model cannot evaluate; the message says what to change."""


class Bottleneck(enum.Enum):
    """The resource that bounds an iteration."""

    COMPUTE = "compute-bound"
    MEMORY = "memory-bound"
    NETWORK = "network-bound"

    @property
    def is_compute_bound(self) -> bool:
        return self is Bottleneck.COMPUTE


@dataclass(frozen=True)
class Workload:
    """Average request shape: ``prompt_len`` prefill tokens (p) then ``decode_len`` decode tokens (d)."""

    prompt_len: float
    decode_len: float
    name: str = ""

    def __post_init__(self) -> None:
        if self.prompt_len < 0 or self.decode_len <= 0:
            raise AnalysisError(
                f"workload needs prompt_len >= 0 and decode_len > 0, got {self.prompt_len}/{self.decode_len}"
            )

    @property
    def label(self) -> str:
        return self.name or f"{self.prompt_len:g}/{self.decode_len:g}"

    @property
    def decode_fraction(self) -> float:
        """Share of a dense batch's tokens that are decode tokens: d / (p + d)."""
        return self.decode_len / (self.prompt_len + self.decode_len)

    @property
    def mean_decode_context(self) -> float:
        """Average context of a decode token (and average KV length of a running request): p + d/2."""
        return self.prompt_len + self.decode_len / 2


# The paper's Table 4 dataset averages (input/output tokens).
WORKLOADS: MappingProxyType[str, Workload] = MappingProxyType(
    {
        "splitwise": Workload(1155, 211, "splitwise"),
        "lmsys": Workload(102, 222, "lmsys"),
        "sharegpt": Workload(246, 322, "sharegpt"),
    }
)
TABLE2_WORKLOAD = Workload(512, 1024, "512/1024")
"""The workload that reproduces the attention rows of Table 2 (see the module docstring)."""


def parse_workload(text: str) -> Workload:
    """``"1024/512"`` (prompt/decode, constant lengths) or a Table 4 name: splitwise, lmsys, sharegpt."""
    key = text.strip().lower()
    if key in ("lmsys-chat", "lmsys-chat-1m"):
        key = "lmsys"
    if key in WORKLOADS:
        return WORKLOADS[key]
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*/\s*(\d+(?:\.\d+)?)", key)
    if match is None:
        raise AnalysisError(
            f"unknown workload {text!r}; give prompt/decode lengths like '1024/512' or one of {', '.join(WORKLOADS)}"
        )
    return Workload(float(match[1]), float(match[2]), key.replace(" ", ""))


@dataclass(frozen=True)
class OpCost:
    """One row of Table 2: aggregate work of one operation over all layers and GPUs, and its estimated times."""

    name: str
    gflop: float
    mem_gb: float
    net_gb: float
    t_compute_ms: float
    t_mem_ms: float
    t_net_ms: float

    @property
    def t_op_ms(self) -> float:
        """max(T_compute, T_mem, T_net): the estimated time if the op is bound by its scarcest resource."""
        return max(self.t_compute_ms, self.t_mem_ms, self.t_net_ms)

    @property
    def bottleneck(self) -> Bottleneck:
        times = {Bottleneck.COMPUTE: self.t_compute_ms, Bottleneck.MEMORY: self.t_mem_ms,
                 Bottleneck.NETWORK: self.t_net_ms}
        return max(times, key=lambda b: times[b])


@dataclass(frozen=True)
class MemoryPlan:
    """How many requests fit in memory, and the dense batch they sustain (see :func:`memory_plan`)."""

    capacity_gb: float
    weights_gb: float
    kv_bytes_per_token: float
    kv_gb_per_request: float
    max_concurrent_requests: int
    max_dense_batch: int

    @property
    def weights_fit(self) -> bool:
        return self.weights_gb < self.capacity_gb


@dataclass(frozen=True)
class CostReport:
    """Everything :func:`analyze` derives; ``ops`` follow :data:`OP_NAMES` order and ``totals`` sums them.

    ``t_*_eq*_ms`` are the paper's closed forms (eqs. 1-3), ``t_r`` is eq. (4) and decides ``classification``;
    ``totals.bottleneck`` is the per-op view (largest summed column), which may differ when the batch is far from
    the memory-limited maximum that eq. (1) assumes. ``optimal_tokens_per_s_per_gpu`` is eq. (5);
    ``overlap_bound_tokens_per_s_per_gpu`` is ``B / max(summed T_compute, T_mem, T_net) / n_gpu``: the per-op
    model's ceiling at this batch if every resource overlapped perfectly (what NanoFlow's pipelining aims at).
    """

    model: str
    gpu: GPUSpec
    n_gpu: int
    dense_batch: int
    workload: Workload
    dtype_bytes: float
    compute_tflops_per_gpu: float
    ops: tuple[OpCost, ...]
    totals: OpCost
    t_mem_eq1_ms: float
    t_compute_eq2_ms: float
    t_net_eq3_ms: float
    t_r: float
    net_over_compute: float
    classification: Bottleneck
    memory: MemoryPlan
    active_params: int
    optimal_tokens_per_s_per_gpu: float
    overlap_bound_tokens_per_s_per_gpu: float

    def op(self, name: str) -> OpCost:
        for row in self.ops:
            if row.name == name:
                return row
        raise KeyError(f"no op {name!r}; ops are {', '.join(OP_NAMES)}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: ``ops`` rows, ``totals``, the equation-level values and the memory plan."""
        row = {k: v for k, v in asdict(self.totals).items() if k != "name"}
        return {
            "model": self.model,
            "gpu": self.gpu.name,
            "n_gpu": self.n_gpu,
            "dense_batch": self.dense_batch,
            "prompt_len": self.workload.prompt_len,
            "decode_len": self.workload.decode_len,
            "workload": self.workload.label,
            "dtype_bytes": self.dtype_bytes,
            "compute_tflops_per_gpu": self.compute_tflops_per_gpu,
            "ops": [asdict(r) for r in self.ops],
            "totals": row,
            "t_mem_eq1_ms": self.t_mem_eq1_ms,
            "t_compute_eq2_ms": self.t_compute_eq2_ms,
            "t_net_eq3_ms": self.t_net_eq3_ms,
            "t_r": self.t_r,
            "net_over_compute": self.net_over_compute,
            "classification": self.classification.value,
            "per_op_bottleneck": self.totals.bottleneck.value,
            "memory": asdict(self.memory),
            "max_dense_batch": self.memory.max_dense_batch,
            "active_params": self.active_params,
            "optimal_tokens_per_s_per_gpu": self.optimal_tokens_per_s_per_gpu,
            "overlap_bound_tokens_per_s_per_gpu": self.overlap_bound_tokens_per_s_per_gpu,
        }


def _stored_kv_heads(model: ModelSpec, n_gpu: int) -> int:
    # Tensor parallelism splits KV heads across GPUs; with more GPUs than KV heads each head is replicated so that
    # every GPU holds one, which multiplies the aggregate KV footprint and traffic.
    return max(model.num_kv_heads, n_gpu)


def kv_bytes_per_token(model: ModelSpec, n_gpu: int = 1, dtype_bytes: float = 2) -> float:
    """Aggregate KV-cache bytes one token occupies over all layers and GPUs (kv heads replicated where a GPU needs
    one and there are fewer heads than GPUs)."""
    return model.kv_bytes_per_token(_stored_kv_heads(model, n_gpu), dtype_bytes)


def memory_plan(
    model: ModelSpec, gpu: GPUSpec, n_gpu: int, workload: Workload, dtype_bytes: float = 2, mem_fraction: float = 1.0,
    kv_dtype_bytes: float | None = None,
) -> MemoryPlan:
    """The largest batch the memory of ``n_gpu`` GPUs sustains (paper §3.1: weights + all KV caches fit).

    Memory model: capacity ``n_gpu * mem_gb * mem_fraction``; weights ``num_params * S`` (sharded, not replicated);
    activations ignored (< 5% per the paper's footnote 2). A running request holds the KV of ``p + d/2`` tokens on
    average over its life (prompt plus half its decode), so ``R = floor((capacity - weights) / ((p + d/2) * kv))``
    requests run concurrently. Each iteration they emit ``R`` decode tokens, and keeping ``R`` constant admits
    ``R*p/d`` prefill tokens, so the dense batch is ``floor(R * (p + d) / d)``. Both are 0 when weights do not fit.
    ``kv_dtype_bytes``: bytes per KV-cache element when they differ from the weights' (1 for a float8 cache).
    """
    if not 0 < mem_fraction <= 1:
        raise AnalysisError(f"mem_fraction must be in (0, 1], got {mem_fraction}")
    capacity = n_gpu * gpu.mem_gb * 1e9 * mem_fraction
    weights = model.num_params * dtype_bytes
    per_token = kv_bytes_per_token(model, n_gpu, dtype_bytes if kv_dtype_bytes is None else kv_dtype_bytes)
    per_request = workload.mean_decode_context * per_token
    requests = max(0, math.floor((capacity - weights) / per_request)) if per_request > 0 else 0
    dense = math.floor(requests / workload.decode_fraction)
    return MemoryPlan(capacity / 1e9, weights / 1e9, per_token, per_request / 1e9, requests, dense)


def optimal_throughput(compute_tflops_per_gpu: float, params: float) -> float:
    """Eq. (5): ``Compute / (2 * P_model)`` tokens/s/GPU; independent of batch, workload, memory and network."""
    if compute_tflops_per_gpu <= 0 or params <= 0:
        raise AnalysisError("optimal throughput needs positive compute (TFLOP/s) and parameter count")
    return compute_tflops_per_gpu * 1e12 / (2 * params)


def op_costs(
    model: ModelSpec,
    gpu: GPUSpec,
    n_gpu: int,
    dense_batch: float,
    workload: Workload,
    dtype_bytes: float = 2,
    compute_tflops_per_gpu: float | None = None,
    kv_dtype_bytes: float | None = None,
) -> tuple[OpCost, ...]:
    """The seven Table 2 rows, in :data:`OP_NAMES` order (formulas in the module docstring); ``kv_dtype_bytes``
    prices decode attention's KV-cache reads when the cache's elements differ from ``dtype_bytes``."""
    s, b, n_layers = dtype_bytes, float(dense_batch), model.num_layers
    s_kv = s if kv_dtype_bytes is None else kv_dtype_bytes
    d_model, q, kv, inter = model.hidden_size, model.q_size, model.kv_size, model.intermediate_size
    kv_stored = _stored_kv_heads(model, n_gpu) * model.head_dim
    n_dec = b * workload.decode_fraction
    n_pf = b - n_dec
    ctx = workload.mean_decode_context
    experts, active = (model.num_experts, model.num_experts_per_tok) if model.is_moe else (1, 1)
    touched = min(experts, b * active)
    router_flop = 2 * b * d_model * experts if model.is_moe else 0.0
    router_w = d_model * experts if model.is_moe else 0.0

    # name -> (FLOP, memory bytes, network bytes) of one layer, summed over GPUs; multiplied by L below.
    per_layer = {
        "kqv": (2 * b * d_model * (q + 2 * kv), s * (d_model * (q + 2 * kv) + b * d_model + b * (q + 2 * kv)), 0.0),
        "o": (2 * b * q * d_model, s * (q * d_model + b * q + b * d_model), 0.0),
        "ug": (
            2 * b * active * d_model * 2 * inter + router_flop,
            s * (touched * d_model * 2 * inter + router_w + b * d_model + b * active * 2 * inter),
            0.0,
        ),
        "d": (
            2 * b * active * inter * d_model,
            s * (touched * inter * d_model + b * active * inter + b * d_model),
            0.0,
        ),
        "dec_attn": (4 * q * ctx * n_dec, s_kv * n_dec * 2 * kv_stored * ctx + s * n_dec * (2 * q + 2 * kv), 0.0),
        "pf_attn": (4 * q * workload.prompt_len * n_pf, s * n_pf * (2 * q + 2 * kv), 0.0),
    }
    net_bytes = 4 * (n_gpu - 1) * b * d_model * s
    per_layer["net"] = (2 * (n_gpu - 1) * b * d_model, net_bytes, net_bytes)

    compute = (compute_tflops_per_gpu * 1e12 if compute_tflops_per_gpu else gpu.fp16_gflops * 1e9) * n_gpu
    mem_bw = gpu.mem_bw_gbps * 1e9 * n_gpu
    net_bw = gpu.net_bw_one_way_gbps * 1e9 * n_gpu
    rows = []
    for name in OP_NAMES:
        flop, mem, net = (x * n_layers for x in per_layer[name])
        rows.append(OpCost(name, flop / 1e9, mem / 1e9, net / 1e9, 1e3 * flop / compute, 1e3 * mem / mem_bw,
                           1e3 * net / net_bw))
    return tuple(rows)


def _sum_rows(rows: tuple[OpCost, ...]) -> OpCost:
    fields = ("gflop", "mem_gb", "net_gb", "t_compute_ms", "t_mem_ms", "t_net_ms")
    return OpCost("total", *(sum(getattr(r, f) for r in rows) for f in fields))


def analyze(
    model: ModelSpec,
    gpu: GPUSpec,
    n_gpu: int = 1,
    dense_batch: int | None = None,
    workload: Workload = TABLE2_WORKLOAD,
    dtype_bytes: float = 2,
    peak_tflops: float | None = None,
    mem_fraction: float = 1.0,
    kv_dtype_bytes: float | None = None,
) -> CostReport:
    """Evaluate the cost model; ``dense_batch=None`` uses the largest batch memory sustains (:func:`memory_plan`).

    ``peak_tflops`` (per GPU) replaces the spec's FP16 compute everywhere: the rows' T_compute, eq. (2) and
    eq. (5) (the paper uses a profiled 280 TFLOP/s for the A100 in §3.5, against 312 in Table 1).
    Classification: network-bound if eq. (3) exceeds eqs. (1) and (2); otherwise compute-bound iff T_R < 1.
    ``kv_dtype_bytes`` (e.g. 1 for a float8 KV cache) sizes the KV cache and decode attention's reads; default
    ``dtype_bytes``.
    """
    if n_gpu < 1:
        raise AnalysisError(f"n_gpu (tensor-parallel degree) must be >= 1, got {n_gpu}")
    if dtype_bytes <= 0:
        raise AnalysisError(f"dtype_bytes must be positive (2 for FP16/BF16), got {dtype_bytes}")
    if peak_tflops is not None and peak_tflops <= 0:
        raise AnalysisError(f"peak_tflops must be positive, got {peak_tflops}")
    if kv_dtype_bytes is not None and kv_dtype_bytes <= 0:
        raise AnalysisError(f"kv_dtype_bytes must be positive (1 for a float8 cache), got {kv_dtype_bytes}")
    plan = memory_plan(model, gpu, n_gpu, workload, dtype_bytes, mem_fraction, kv_dtype_bytes)
    if dense_batch is None:
        if plan.max_dense_batch < 1:
            raise AnalysisError(
                f"{model.name or 'the model'} needs {plan.weights_gb:.1f} GB of weights plus KV cache but "
                f"{n_gpu} x {gpu.name} hold {plan.capacity_gb:.1f} GB; use more GPUs (--tp), a larger GPU, "
                "or give --dense-batch explicitly"
            )
        dense_batch = plan.max_dense_batch
    if dense_batch < 1:
        raise AnalysisError(f"dense_batch must be >= 1 token, got {dense_batch}")

    tflops = peak_tflops if peak_tflops is not None else gpu.fp16_gflops / 1e3
    rows = op_costs(model, gpu, n_gpu, dense_batch, workload, dtype_bytes, tflops, kv_dtype_bytes)
    totals = _sum_rows(rows)
    params = model.active_params
    t_mem = 1e3 * gpu.mem_size_over_bw_s
    t_compute = 1e3 * 2 * dense_batch * params / (n_gpu * tflops * 1e12)
    net_bytes = 4 * (n_gpu - 1) * dense_batch * model.hidden_size * dtype_bytes * model.num_layers
    t_net = 1e3 * net_bytes / (n_gpu * gpu.net_bw_one_way_gbps * 1e9)
    if t_net > max(t_mem, t_compute):
        cls = Bottleneck.NETWORK
    else:
        cls = Bottleneck.COMPUTE if t_mem < t_compute else Bottleneck.MEMORY
    slowest_s = totals.t_op_ms / 1e3
    return CostReport(
        model=model.name,
        gpu=gpu,
        n_gpu=n_gpu,
        dense_batch=int(dense_batch),
        workload=workload,
        dtype_bytes=dtype_bytes,
        compute_tflops_per_gpu=tflops,
        ops=rows,
        totals=totals,
        t_mem_eq1_ms=t_mem,
        t_compute_eq2_ms=t_compute,
        t_net_eq3_ms=t_net,
        t_r=t_mem / t_compute,
        net_over_compute=t_net / t_compute,
        classification=cls,
        memory=plan,
        active_params=params,
        optimal_tokens_per_s_per_gpu=optimal_throughput(tflops, params),
        overlap_bound_tokens_per_s_per_gpu=dense_batch / slowest_s / n_gpu,
    )
