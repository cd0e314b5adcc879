"""Mixture-of-experts routing and expert computation (Mixtral), with a float64-capable torch reference.

The routed computation of ``n`` tokens, each sent to ``k`` experts, as the ``experts`` op runs it:

1. :func:`route`: top-k of the softmax over all experts, renormalised over the chosen k (Hugging Face Mixtral's
   order: softmax in fp32, top-k, divide by the sum).
2. :func:`sort_by_expert`: the ``n * k`` (token, choice) pairs in expert order — a counting sort built from
   element-wise ops and a cumulative sum only, so it is deterministic, stable (token order kept inside an expert),
   never reads a device value on the host and can be captured in a CUDA graph.
3. gather the tokens into that order, grouped GEMM with each expert's ``w13`` (gate and up), SiLU * up, grouped GEMM
   with ``w2`` (:func:`grouped_mm`), then each token's k rows are summed back in token order, each scaled by its
   routing weight: in the down GEMM's epilogue, then :func:`combine_into` (gather + sum, no atomics), or, when
   ``torch._grouped_mm`` runs it, in :func:`combine_weighted_into`.

:func:`grouped_mm` has three backends on a GPU: ``triton`` (:mod:`nanoflow.ops.grouped_gemm`, writes the caller's
buffer, applies the routing weight to the fp32 accumulator), ``torch`` (``torch._grouped_mm``, PyTorch's CUTLASS
grouped GEMM: it returns a new tensor and has no epilogue, so :func:`experts_forward` applies the routing weights
in the combine instead, :func:`combine_weighted_into`) and ``auto`` (the default): the first time a shape
``(rows, N, K, experts)`` is seen outside CUDA-graph capture, both run on the rows split as a random routing splits
them (:func:`typical_offsets`) and the faster is kept for that shape (:func:`grouped_mm_choices` lists what was
picked and the timings). The two win at different sizes (an H100 at Mixtral's shapes, s11-moe-grouped-gemm-h100.json:
Triton at 2,048 routed rows for gate/up, torch at 4,096 for both; end to end on a 16-layer Mixtral,
s11-bench-fp8kv-moe-backends-h100-*: auto +5.5% over Triton alone). Both read the offsets on the device, so either
can be captured. Off the GPU the loop over experts runs (``torch`` still calls ``torch._grouped_mm``, for tests).

Under tensor parallelism each rank holds a slice of every expert's intermediate dim; routing is replicated and the
per-rank sums are partial, completed by the layer's ``ffn_all_reduce``.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from statistics import NormalDist
from typing import NamedTuple

import torch

from nanoflow.config import MOE_BACKENDS as GROUPED_MM_BACKENDS
from nanoflow.ops.activation import silu_and_mul_into

log = logging.getLogger(__name__)


class MoEInputError(ValueError):
    """Router or expert tensors whose shapes, dtypes or devices do not fit together."""


class ExpertOrder(NamedTuple):
    """The (token, choice) pairs of a routing, sorted by expert.

    With ``flat = experts.reshape(-1)`` (pair ``i`` is token ``i // k``, choice ``i % k``):
    ``order [n*k]`` int64: sorted row ``j`` holds pair ``order[j]``; ``offsets [E+1]`` int32: expert ``e`` owns
    sorted rows ``[offsets[e], offsets[e+1])``, ``offsets[0] == 0``, ``offsets[E] == n*k``; ``position [n*k]``
    int64: the sorted row of pair ``i`` (the inverse permutation, ``order[position[i]] == i``).
    """

    order: torch.Tensor
    offsets: torch.Tensor
    position: torch.Tensor


def route(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(weights [n, k] fp32, experts [n, k] int64)``: top-k of softmax(logits), renormalised to sum to 1."""
    if logits.dim() != 2 or not 1 <= top_k <= logits.shape[1]:
        raise MoEInputError(f"route needs logits [tokens, experts] and 1 <= top_k <= experts; got "
                            f"{tuple(logits.shape)} and top_k={top_k}")
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), experts


def sort_by_expert(experts: torch.Tensor, num_experts: int) -> ExpertOrder:
    """Counting sort of the flattened ``experts`` ids (values in ``[0, num_experts)``) on their device."""
    flat = experts.reshape(-1).long()
    ids = torch.arange(num_experts, device=flat.device)
    # [E, n*k] one-hot, built without a host check. Expert-major so that the scan below runs along the contiguous
    # dim: a CUDA cumsum along the outer dim of a [n*k, E] tensor scans each of the E columns serially. On an H200,
    # 2,048 tokens top-2: the whole sort 0.43 ms against 0.78 ms token-major, timed eagerly (launches included;
    # benchmarks/results/2026-12-02-s7-moe-grouped-gemm-h200.json).
    hit = (ids[:, None] == flat[None, :]).to(torch.int32)
    counts = hit.sum(dim=1, dtype=torch.int64)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(counts, dim=0, out=offsets[1:])
    # Rank of pair i among the pairs of its expert that come before it (stable order inside an expert).
    rank = torch.cumsum(hit, dim=1).gather(0, flat[None, :].clamp(0, num_experts - 1)).squeeze(0) - 1
    position = offsets[flat.clamp(0, num_experts - 1)] + rank
    order = torch.empty_like(position).scatter_(0, position, torch.arange(flat.numel(), device=flat.device))
    return ExpertOrder(order, offsets.to(torch.int32), position)


def grouped_mm_reference(x: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor,
                         row_scale: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """Torch loop over experts: ``out[rows of e] = (x[rows of e] @ w[e].T) * row_scale`` in ``x.dtype``.

    Same contract as :func:`nanoflow.ops.grouped_gemm.grouped_gemm`, including that rows at or past
    ``offsets[-1]`` are left untouched. Reads ``offsets`` on the host (not for CUDA-graph capture). The product is
    accumulated in fp32 for 16-bit inputs (as cuBLAS does) and scaled before the cast.
    """
    if out is None:
        out = torch.empty(x.shape[0], w.shape[1], dtype=x.dtype, device=x.device)
    bounds = offsets.tolist()
    acc = torch.float32 if x.dtype in (torch.bfloat16, torch.float16) else x.dtype
    for e in range(w.shape[0]):
        lo, hi = bounds[e], bounds[e + 1]
        if hi <= lo:
            continue
        y = torch.mm(x[lo:hi].to(acc), w[e].t().to(acc))
        if row_scale is not None:
            y = y * row_scale[lo:hi, None].to(acc)
        out[lo:hi] = y.to(out.dtype)
    return out


def grouped_mm_torch(x: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor,
                     row_scale: torch.Tensor | None = None) -> torch.Tensor:
    """``torch._grouped_mm`` with this module's contract, into a new ``[M, N]`` tensor: ``offsets`` is ``[E+1]``
    starting at 0 (PyTorch takes the ``E`` group ends), ``w`` is ``[E, N, K]`` (PyTorch takes ``[E, K, N]``, here a
    transposed view); the row scale multiplies the result after its cast, in fp32. Rows at or past ``offsets[E]``
    are undefined."""
    if not hasattr(torch, "_grouped_mm"):
        raise MoEInputError(f"torch {torch.__version__} has no torch._grouped_mm (added in 2.8); use the triton or "
                            "auto grouped GEMM backend")
    y = torch._grouped_mm(x, w.transpose(1, 2), offs=offsets[1:])
    if row_scale is not None:
        y.mul_(row_scale[:, None])
    return y


class _Shape(NamedTuple):
    """What ``auto`` picks for: the routed rows rounded up to a multiple of :data:`ROW_BUCKET` (so an engine without
    CUDA graphs, whose row counts vary every step, times a few sizes, not every one), the GEMM and the epilogue."""

    device: str
    rows: int
    n: int
    k: int
    experts: int
    dtype: str
    row_scale: bool


class _Choice(NamedTuple):
    backend: str
    ms: dict[str, float | None]


ROW_BUCKET = 256
_choices: dict[_Shape, _Choice] = {}


def _checked(name: str) -> str:
    if name not in GROUPED_MM_BACKENDS:
        raise MoEInputError(f"unknown grouped GEMM backend {name!r}; use one of {', '.join(GROUPED_MM_BACKENDS)}")
    return name


def grouped_mm_choices() -> list[dict]:
    """What ``auto`` picked so far: one record per shape, with each backend's time in ms (None: it failed)."""
    return [{**key._asdict(), "backend": c.backend, "ms": c.ms} for key, c in _choices.items()]


def _time_ms(fn: Callable[[], object], reps: int = 5) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


def typical_offsets(rows: int, experts: int) -> list[int]:
    """``[experts + 1]`` offsets of ``rows`` split the way a random routing splits them, not evenly: expert ``i``
    gets ``rows / experts + sqrt(rows / experts) * z_i`` rows, ``z_i`` the normal quantile at ``(i + 0.5) / experts``
    (a binomial count's spread, about). An even split puts every expert exactly on a GEMM tile boundary whenever
    ``rows / experts`` is a multiple of the tile (4,096 rows, 8 experts: 512 each), where a real routing sends some
    experts a few rows over and so a whole tile more: session 11 timed torch's grouped GEMM at 1.76 ms for Mixtral's
    gate/up on 4,096 randomly routed rows (the most an expert got: 549), session 17 at 1.31 ms on an even split."""
    if rows < 0 or experts < 1:
        raise MoEInputError(f"need rows >= 0 and experts >= 1, got {rows} and {experts}")
    mean = rows / experts
    dist = NormalDist()
    counts = [max(0, round(mean + math.sqrt(mean) * dist.inv_cdf((i + 0.5) / experts))) for i in range(experts)]
    counts[-1 if sum(counts) < rows else counts.index(max(counts))] += rows - sum(counts)
    while min(counts) < 0:  # too few rows for the spread: take the deficit from the largest
        i = counts.index(min(counts))
        counts[counts.index(max(counts))] += counts[i]
        counts[i] = 0
    return [0, *itertools.accumulate(counts)]


def _auto_backend(x: torch.Tensor, w: torch.Tensor, scaled: bool, rounds: int = 3) -> str:
    """The faster backend for this call's shape (``scaled``: with a row scale), timed once per :class:`_Shape` on
    rows split as a random routing splits them (:func:`typical_offsets`): after the device is idle, ``rounds``
    alternating rounds of each, the best round kept. Triton is timed with the scale in its epilogue, torch without
    it: :func:`experts_forward` folds the scale into the combine when torch runs the GEMM."""
    from nanoflow.ops.grouped_gemm import grouped_gemm

    m, e, n, k = x.shape[0], w.shape[0], w.shape[1], w.shape[2]
    key = _Shape(str(x.device), -(-m // ROW_BUCKET) * ROW_BUCKET, n, k, e, str(x.dtype).removeprefix("torch."),
                 scaled)
    found = _choices.get(key)
    if found is not None:
        return found.backend
    if x.is_cuda and torch.cuda.is_current_stream_capturing():
        # Timing is impossible inside a capture; the engine warms every shape up eagerly first, so this is rare.
        log.warning("grouped GEMM %s seen first during CUDA-graph capture: using triton untimed", key)
        return "triton"
    split = torch.tensor(typical_offsets(m, e), dtype=torch.int32, device=x.device)
    scratch = torch.empty(m, n, dtype=x.dtype, device=x.device)
    row_scale = torch.ones(m, dtype=torch.float32, device=x.device) if scaled else None
    runs = {"torch": lambda: grouped_mm_torch(x, split, w),
            "triton": lambda: grouped_gemm(x, split, w, out=scratch, row_scale=row_scale)}
    ms: dict[str, float | None] = {}
    for name, fn in runs.items():  # compile / autotune / allocate; a backend that cannot run drops out
        try:
            fn()
            ms[name] = float("inf")
        except (RuntimeError, NotImplementedError, MoEInputError) as exc:  # a dtype, GPU or torch it lacks
            if name == "triton":
                raise
            log.info("torch._grouped_mm cannot run %s: %s", key, exc)
            ms[name] = None
    if x.is_cuda:
        torch.cuda.synchronize(x.device)  # other streams' work (a nano-batch pipeline's warm-up) must not count
    for r in range(rounds):
        for name in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
            if ms[name] is not None:
                ms[name] = min(ms[name], _time_ms(runs[name]))
    best = "torch" if ms["torch"] is not None and ms["torch"] < ms["triton"] else "triton"
    _choices[key] = _Choice(best, ms)
    log.info("grouped GEMM rows=%d n=%d k=%d experts=%d: %s -> %s", m, n, k, e,
             ", ".join(f"{b} {t:.3f} ms" for b, t in ms.items() if t is not None), best)
    return best


def resolve_backend(x: torch.Tensor, w: torch.Tensor, scaled: bool, backend: str | None = None) -> str:
    """The backend a call runs: ``"torch"``, ``"triton"`` or, off the GPU, ``"loop"`` (``auto`` resolved per shape,
    ``None`` = ``auto``)."""
    name = _checked(backend or "auto")
    if name == "torch":
        return name
    if not x.is_cuda:
        return "loop"
    return _auto_backend(x, w, scaled) if name == "auto" else name


def grouped_mm(x: torch.Tensor, offsets: torch.Tensor, w: torch.Tensor, out: torch.Tensor,
               row_scale: torch.Tensor | None = None, backend: str | None = None) -> torch.Tensor:
    """Per-expert ``(x_e @ w_e^T) * row_scale``; returns the result, which is ``out`` except with the ``torch``
    backend (a new tensor). ``backend``: one of :data:`GROUPED_MM_BACKENDS`, default ``auto`` (see the module
    docstring). Off the GPU, ``auto`` and ``triton`` run the torch loop."""
    name = resolve_backend(x, w, row_scale is not None, backend)
    if name == "torch":
        return grouped_mm_torch(x, offsets, w, row_scale)
    if name == "loop":
        return grouped_mm_reference(x, offsets, w, row_scale=row_scale, out=out)
    from nanoflow.ops.grouped_gemm import grouped_gemm

    return grouped_gemm(x, offsets, w, out=out, row_scale=row_scale)


class MoEScratch(NamedTuple):
    """Preallocated views for one call over ``n`` tokens with ``k`` choices each (rows = ``n * k``).

    ``sorted_x [n*k, hidden]``,
    ``gate_up [n*k, 2*inter]``, ``act [n*k, inter]``, ``expert_out [n*k, hidden]``; all in the model dtype.
    """

    sorted_x: torch.Tensor
    gate_up: torch.Tensor
    act: torch.Tensor
    expert_out: torch.Tensor


def check_experts(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> tuple[int, int]:
    """``(num_experts, inter)`` after checking ``w13 [E, 2*inter, hidden]`` and ``w2 [E, hidden, inter]``."""
    hidden = x.shape[-1]
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[0] != w2.shape[0] or w13.shape[1] % 2:
        raise MoEInputError(f"expert weights must be w13 [E, 2*inter, hidden] and w2 [E, hidden, inter]; got "
                            f"{tuple(w13.shape)} and {tuple(w2.shape)}")
    inter = w13.shape[1] // 2
    if w13.shape[2] != hidden or tuple(w2.shape[1:]) != (hidden, inter):
        raise MoEInputError(f"x has hidden size {hidden}, but w13 is {tuple(w13.shape)} and w2 {tuple(w2.shape)}; "
                            f"expected [E, 2*inter, {hidden}] and [E, {hidden}, inter]")
    return w13.shape[0], inter


def combine_into(expert_out: torch.Tensor, position: torch.Tensor, out: torch.Tensor) -> None:
    """``out[t] = sum_j expert_out[position[t * k + j]]`` (summed in fp32): each token's ``k`` expert rows, already
    scaled by their routing weights, gathered back from expert order. Compiled (``graphs.glue``), the gather, the sum
    and the cast are one kernel writing ``out``."""
    out.copy_(expert_out[position].view(out.shape[0], -1, expert_out.shape[1]).sum(dim=1, dtype=torch.float32))


def combine_weighted_into(expert_out: torch.Tensor, position: torch.Tensor, weights: torch.Tensor,
                          out: torch.Tensor) -> None:
    """``out[t] = sum_j weights[t, j] * expert_out[position[t * k + j]]`` (in fp32): the combine for expert rows not
    yet scaled by their routing weights (the ``torch`` grouped-GEMM backend has no epilogue to scale them in).
    Compiled (``graphs.glue``), one kernel as :func:`combine_into`."""
    n, k = weights.shape
    rows = expert_out[position].view(n, k, expert_out.shape[1]).float()
    out.copy_((rows * weights.float()[:, :, None]).sum(dim=1))


def experts_forward(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor, out: torch.Tensor, scratch: MoEScratch,
                    act_into: Callable[[torch.Tensor, torch.Tensor], None] = silu_and_mul_into,
                    combine: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None] = combine_into,
                    combine_weighted: Callable[..., None] = combine_weighted_into,
                    backend: str | None = None) -> torch.Tensor:
    """``out[t] = sum_j weights[t, j] * expert_{experts[t, j]}(x[t])`` for the ``n`` rows of ``x``.

    ``x``, ``out``: ``[n, hidden]``; ``weights``/``experts``: ``[n, k]`` from :func:`route`. Every intermediate
    goes to ``scratch`` (its views need exactly ``n * k`` rows; the ``torch`` grouped-GEMM backend allocates its two
    results instead); ``out`` is written, not accumulated into.
    ``act_into``, ``combine`` and ``combine_weighted`` default to the eager ops; the engine passes their compiled
    forms. The routing weights scale the down GEMM's rows in its epilogue (Triton, the loop) or, with the ``torch``
    backend, in the combine. ``backend``: the grouped GEMMs' (:data:`GROUPED_MM_BACKENDS`; ``None`` = ``auto``), the
    engine's ``moe_backend``.
    """
    num_experts, _ = check_experts(x, w13, w2)
    n, k = experts.shape
    if x.shape[0] != n or weights.shape != experts.shape or out.shape != x.shape:
        raise MoEInputError(f"x {tuple(x.shape)}, out {tuple(out.shape)}, weights {tuple(weights.shape)} and "
                            f"experts {tuple(experts.shape)} must agree on [tokens, hidden] and [tokens, top_k]")
    rows = n * k
    if any(t.shape[0] != rows for t in scratch):
        raise MoEInputError(f"every scratch view needs {rows} rows (tokens * top_k); got "
                            f"{[tuple(t.shape) for t in scratch]}")
    if n == 0:
        return out
    sort = sort_by_expert(experts, num_experts)
    torch.index_select(x, 0, sort.order // k, out=scratch.sorted_x)
    gate_up = grouped_mm(scratch.sorted_x, sort.offsets, w13, out=scratch.gate_up, backend=backend)
    act_into(gate_up, scratch.act)
    down = resolve_backend(scratch.act, w2, scaled=True, backend=backend)
    if down == "torch":
        combine_weighted(grouped_mm_torch(scratch.act, sort.offsets, w2), sort.position, weights, out)
        return out
    row_scale = weights.reshape(-1).float().index_select(0, sort.order)
    expert_out = grouped_mm(scratch.act, sort.offsets, w2, out=scratch.expert_out, row_scale=row_scale,
                            backend=None if down == "loop" else down)  # resolved once ("loop" is not a name)
    combine(expert_out, sort.position, out)
    return out


def moe_reference(x: torch.Tensor, router_w: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, top_k: int,
                  dtype: torch.dtype | None = None) -> torch.Tensor:
    """The whole sparse MoE block, token-major and loop-over-experts, computed in ``dtype`` (default ``x.dtype``).

    Independent of the sorted path: routing masks tokens per expert directly, no sort and no grouped GEMM.
    Returns ``[n, hidden]`` in ``dtype``.
    """
    dtype = dtype or x.dtype
    num_experts, inter = check_experts(x, w13, w2)
    if router_w.shape != (num_experts, x.shape[-1]):
        raise MoEInputError(f"router weight must be [{num_experts}, {x.shape[-1]}]; got {tuple(router_w.shape)}")
    xd = x.to(dtype)
    probs = torch.softmax((xd @ router_w.to(dtype).t()).to(torch.float64), dim=-1)
    top, chosen = torch.topk(probs, top_k, dim=-1)
    top = top / top.sum(dim=-1, keepdim=True)
    out = torch.zeros_like(xd)
    for e in range(num_experts):
        token, choice = torch.nonzero(chosen == e, as_tuple=True)
        if token.numel() == 0:
            continue
        h = xd[token] @ w13[e].to(dtype).t()
        y = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]) @ w2[e].to(dtype).t()
        out.index_add_(0, token, y * top[token, choice, None].to(dtype))
    return out
