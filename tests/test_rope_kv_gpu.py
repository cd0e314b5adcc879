"""The fused RoPE + KV-write kernel on a GPU at LLaMA-3-8B shapes (marked ``gpu``; scripts/device/rope_kv_run.sh).

Against the unfused path (``rope_qkv_into`` then ``store_kv``): bit for bit the eager one; the same values as the
torch.compile'd one the engine ran before, but where that compiler contracted a product and a sum (near-zero values);
the QKV rows hold what the cache holds; a CUDA graph replays it on new positions and slots; and the time of the
fused and the compiled path at 2,048 tokens.
"""

from __future__ import annotations

from functools import partial

import pytest
import torch

from nanoflow.models.layers import rope_qkv_into
from nanoflow.ops.kv_store import FP8, store_kv
from nanoflow.ops.rope_kv import rope_kv_store
from nanoflow.ops.rotary import cos_sin_cache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

H, KV, D, T, BLOCK = 32, 8, 128, 2048, 16
BLOCKS = 4096


def _inputs(seed: int, rows: int = T):
    g = torch.Generator(device="cuda").manual_seed(seed)
    qkv = torch.randn(rows, (H + 2 * KV) * D, device="cuda", generator=g).to(torch.bfloat16) * 4
    pos = torch.randint(0, 8000, (rows,), device="cuda", generator=g)
    slots = torch.randperm(BLOCKS * BLOCK, device="cuda", generator=g)[:rows]
    return qkv, pos, slots


def _paths(kv_dtype):
    """The fused kernel, the unfused path eagerly, and the unfused path as the engine ran it (torch.compile'd)."""
    from nanoflow.graphs.glue import compiled_glue

    table = cos_sin_cache(D, 8192, 500000.0, None, "cuda")
    compiled = compiled_glue()["rope_qkv_into"]

    def fused(qkv, pos, slots, q_out, kc, vc):
        rope_kv_store(qkv, table, pos, slots, q_out, kc, vc, H, KV, D)

    def unfused(qkv, pos, slots, q_out, kc, vc, into=rope_qkv_into):
        k, v = into(qkv, table[pos], H, KV, D, q_out, kv_dtype)
        store_kv(k, v, kc, vc, slots)

    return fused, unfused, partial(unfused, into=compiled)


def _buffers(kv_dtype, rows=T):
    q_out = torch.zeros(rows, H * D, device="cuda", dtype=torch.bfloat16)
    kc = torch.zeros(BLOCKS, BLOCK, KV, D, device="cuda", dtype=kv_dtype)
    return q_out, kc, torch.zeros_like(kc)


def _at(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    """The cache's rows at ``slots`` (gathered as bytes: torch does not index float8 tensors everywhere)."""
    if cache.dtype == FP8:
        return cache.view(torch.uint8).view(-1, KV, D)[slots].view(FP8)
    return cache.view(-1, KV, D)[slots]


def _steps(a: torch.Tensor, b: torch.Tensor) -> tuple[int, float]:
    """(largest distance in representable steps, share of equal elements)."""
    bits = torch.uint8 if a.dtype == FP8 else torch.int16
    ia, ib = a.view(bits).int(), b.view(bits).int()
    return int((ia - ib).abs().max()), float((ia == ib).float().mean())


@pytest.mark.parametrize("kv_dtype", [FP8, torch.bfloat16], ids=["fp8", "bf16"])
def test_fused_equals_the_unfused_path(kv_dtype, record_property):
    fused, eager, compiled = _paths(kv_dtype)
    qkv, pos, slots = _inputs(1)
    results = []
    for fn in (fused, eager, compiled):
        buf = qkv.clone()
        q_out, kc, vc = _buffers(kv_dtype)
        fn(buf, pos, slots, q_out, kc, vc)
        results.append((buf, q_out, _at(kc, slots), _at(vc, slots)))
    report = {}
    named = list(zip(("qkv_rows", "q_out", "k_cache", "v_cache"), *results))
    for name, a, b, _ in named:
        assert _steps(a, b) == (0, 1.0), name  # bit for bit the eager path
    if kv_dtype == FP8:
        # Under a float8 cache the rows' k and v are float8 values held in bfloat16: compare them as float8 (one
        # e4m3 step is 16 bfloat16 steps) and the rows' q part as bfloat16.
        (_, rows_fused, _, rows_compiled) = named[0]
        named[0:1] = [("qkv_rows_q", rows_fused[:, :H * D], None, rows_compiled[:, :H * D]),
                      ("qkv_rows_kv", rows_fused[:, H * D:].to(FP8), None, rows_compiled[:, H * D:].to(FP8))]
    for name, a, _, c in named:
        # The compiled path may contract a product and a sum (one rounding less): the same values but near zero,
        # and, where a value is then rounded to float8 (the cache; k and v in the rows under a float8 cache), now
        # and then the neighbouring e4m3 value (one step: at most an eighth of the value). How often depends on how
        # many rounding boundaries the inputs straddle: 3.1% of the rotated k in the cache on an H100 (s15), so
        # for float8 values only the one-step bound is checked, not a share.
        steps, equal = _steps(a, c)
        diff, ref = (a.float() - c.float()).abs(), c.float().abs()
        err = float(diff.max())
        report[name] = {"vs_compiled_max_steps": steps, "vs_compiled_equal_share": equal, "vs_compiled_max_abs": err}
        to_fp8 = a.dtype == FP8
        ok = (diff <= ref / 8 + 2.0 ** -9).all() if to_fp8 else err <= 0.02 * float(ref.max())
        assert bool(ok) and (steps <= 1 if to_fp8 else equal > 0.99), (name, steps, equal, err)
    buf, _, k_slots, v_slots = results[0]
    assert torch.equal(buf[:, H * D:(H + KV) * D].view(T, KV, D), k_slots.to(torch.bfloat16))
    if kv_dtype == FP8:
        assert torch.equal(buf[:, (H + KV) * D:].view(T, KV, D), v_slots.to(torch.bfloat16))
    record_property("agreement", report)
    print(f"{kv_dtype}: {report}")


@pytest.mark.parametrize("kv_dtype", [FP8, torch.bfloat16], ids=["fp8", "bf16"])
def test_fused_is_faster_and_replays_in_a_graph(kv_dtype, record_property):
    fused, _, unfused = _paths(kv_dtype)
    qkv, pos, slots = _inputs(2)
    q_out, kc, vc = _buffers(kv_dtype)
    times = {}
    for name, fn in (("fused", fused), ("unfused_compiled", unfused)):
        for _ in range(3):
            fn(qkv, pos, slots, q_out, kc, vc)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            fn(qkv, pos, slots, q_out, kc, vc)
        end.record()
        torch.cuda.synchronize()
        times[name] = start.elapsed_time(end) / 50 * 1e3  # us per call
    record_property("us_per_call", times)
    print(f"{kv_dtype} at {T} tokens: {times}")
    assert times["fused"] < times["unfused_compiled"]

    # Captured once, replayed on other positions and slots written into the same static tensors.
    static_qkv, static_pos, static_slots = qkv.clone(), pos.clone(), slots.clone()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fused(static_qkv, static_pos, static_slots, q_out, kc, vc)
    qkv2, pos2, slots2 = _inputs(3)
    static_qkv.copy_(qkv2), static_pos.copy_(pos2), static_slots.copy_(slots2)
    graph.replay()
    q_ref, kc_ref, vc_ref = _buffers(kv_dtype)
    fused(qkv2.clone(), pos2, slots2, q_ref, kc_ref, vc_ref)
    torch.cuda.synchronize()
    assert torch.equal(q_out, q_ref)
    assert _steps(_at(kc, slots2), _at(kc_ref, slots2)) == (0, 1.0)
    assert _steps(_at(vc, slots2), _at(vc_ref, slots2)) == (0, 1.0)
