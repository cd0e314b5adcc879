"""The fused RoPE + KV-write kernel (ops/rope_kv.py) under Triton's CPU interpreter, against the unfused path
(``rope_qkv_into`` then ``store_kv``, plain torch).

float32 results are equal bit for bit. The interpreter narrows float32 to bfloat16 by truncation and rounds float8
ties upwards (a GPU rounds to nearest even), so bfloat16 results are held to one unit in the last place, and the
float8 store is checked exactly where no rounding happens (position 0, values on the e4m3 grid or beyond +-448),
plus, for random values, that the QKV rows hold exactly what the cache holds.
"""

from __future__ import annotations

import zlib

from interpreted import fresh_interpreter_test, import_interpreted, interpret_env, is_interpreted  # noqa: F401

(rk,) = import_interpreted("nanoflow.ops.rope_kv")

import pytest  # noqa: E402
import torch  # noqa: E402

from nanoflow.models.layers import rope_qkv_into  # noqa: E402
from nanoflow.ops.kv_store import FP8, store_kv  # noqa: E402
from nanoflow.ops.rotary import cos_sin_cache  # noqa: E402

IN_PROCESS = is_interpreted(rk._rope_kv_kernel)
in_process = pytest.mark.skipif(not IN_PROCESS, reason="triton was imported compiled; covered by the subprocess run")
test_whole_file_in_fresh_interpreter = fresh_interpreter_test(__file__, IN_PROCESS)

BLOCK, BLOCKS = 4, 8


def seeded(*case: object) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(case).encode()))


def _run(fused: bool, qkv: torch.Tensor, pos: torch.Tensor, slots: torch.Tensor, heads: int, kv_heads: int,
         head_dim: int, kv_dtype: torch.dtype, lo: int, hi: int):
    """Both paths on a row slice ``lo:hi`` of a copy of ``qkv``; returns (qkv copy, q_out, k_cache, v_cache)."""
    table = cos_sin_cache(head_dim, 64, 10000.0, None, "cpu")
    buf = qkv.clone()
    q_out = torch.full((qkv.shape[0], heads * head_dim), -7.0, dtype=qkv.dtype)
    kc = torch.zeros(BLOCKS, BLOCK, kv_heads, head_dim, dtype=kv_dtype)
    vc = torch.zeros_like(kc)
    if fused:
        rk.rope_kv_store(buf[lo:hi], table, pos[lo:hi], slots[lo:hi], q_out[lo:hi], kc, vc, heads, kv_heads, head_dim)
    else:
        k, v = rope_qkv_into(buf[lo:hi], table[pos[lo:hi]], heads, kv_heads, head_dim, q_out[lo:hi], kv_dtype)
        store_kv(k, v, kc, vc, slots[lo:hi])
    return buf, q_out, kc, vc


def _ulps(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between ``a`` and ``b`` in representable steps (same-sign values of one float type)."""
    bits = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32, FP8: torch.uint8}
    ia, ib = a.view(bits[a.dtype]).int(), b.view(bits[b.dtype]).int()
    return int((ia - ib).abs().max()) if a.numel() else 0


def _case(heads, kv_heads, head_dim, dtype, rows=11, scale=3.0):
    g = seeded(heads, kv_heads, head_dim, dtype)
    qkv = (torch.randn(rows, (heads + 2 * kv_heads) * head_dim, generator=g) * scale).to(dtype)
    pos = torch.randint(0, 60, (rows,), generator=g)
    slots = torch.randperm(BLOCKS * BLOCK, generator=g)[:rows]
    return qkv, pos, slots


SHAPES = [(4, 2, 16), (3, 1, 12), (9, 3, 64), (8, 8, 8)]  # GQA, head_dim/2 not a power of two, SmolLM2's, MHA


@in_process
@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_unfused_path(heads, kv_heads, head_dim, dtype):
    qkv, pos, slots = _case(heads, kv_heads, head_dim, dtype)
    lo, hi = 2, 9  # a nano-batch's rows: a strided view, rows outside it untouched
    fused = _run(True, qkv, pos, slots, heads, kv_heads, head_dim, dtype, lo, hi)
    plain = _run(False, qkv, pos, slots, heads, kv_heads, head_dim, dtype, lo, hi)
    names = ("qkv rows", "q_out", "k cache", "v cache")
    for name, a, b in zip(names, fused, plain):
        if dtype == torch.float32:
            assert torch.equal(a, b), name
        else:
            assert _ulps(a, b) <= 1, name
    assert torch.equal(fused[0][:lo], qkv[:lo]) and torch.equal(fused[0][hi:], qkv[hi:])
    assert (fused[1][:lo] == -7).all() and (fused[1][hi:] == -7).all()
    written = torch.zeros(BLOCKS * BLOCK, dtype=torch.bool)
    written[slots[lo:hi]] = True
    assert (fused[2].view(BLOCKS * BLOCK, -1)[~written] == 0).all()  # only the batch's slots are written


@in_process
@pytest.mark.parametrize("heads,kv_heads,head_dim", SHAPES[:3])
def test_float8_cache_without_rounding_is_exact(heads, kv_heads, head_dim):
    """At position 0 the rotation is the identity; values on the e4m3 grid (and beyond +-448, clamped) store
    exactly, so both paths must write the same bytes to the cache and the same values back into the QKV rows."""
    qkv, _, slots = _case(heads, kv_heads, head_dim, torch.bfloat16, scale=100.0)
    qkv = qkv.clamp(-448, 448).to(FP8).to(torch.bfloat16)
    qkv[0, -3:] = torch.tensor([1000.0, -3000.0, 448.0])  # clamped to +-448 on the way into the cache
    pos = torch.zeros(qkv.shape[0], dtype=torch.int64)
    fused = _run(True, qkv, pos, slots, heads, kv_heads, head_dim, FP8, 0, qkv.shape[0])
    plain = _run(False, qkv, pos, slots, heads, kv_heads, head_dim, FP8, 0, qkv.shape[0])
    assert torch.equal(fused[0], plain[0]) and torch.equal(fused[1], plain[1])
    assert torch.equal(fused[2].view(torch.uint8), plain[2].view(torch.uint8))
    assert torch.equal(fused[3].view(torch.uint8), plain[3].view(torch.uint8))


@in_process
def test_float8_rows_hold_what_the_cache_holds():
    """Prefill reads the chunk's own K/V from the QKV rows: they must equal what the cache will give back."""
    heads, kv_heads, d = 4, 2, 16
    qkv, pos, slots = _case(heads, kv_heads, d, torch.bfloat16, scale=40.0)
    buf, q_out, kc, vc = _run(True, qkv, pos, slots, heads, kv_heads, d, FP8, 0, qkv.shape[0])
    k_rows = buf[:, heads * d:(heads + kv_heads) * d].view(-1, kv_heads, d)
    v_rows = buf[:, (heads + kv_heads) * d:].view(-1, kv_heads, d)
    assert torch.equal(k_rows, kc.view(-1, kv_heads, d)[slots].to(torch.bfloat16))
    assert torch.equal(v_rows, vc.view(-1, kv_heads, d)[slots].to(torch.bfloat16))
    ref = _run(False, qkv, pos, slots, heads, kv_heads, d, FP8, 0, qkv.shape[0])
    assert _ulps(q_out, ref[1]) <= 1  # q does not go through float8
    # The cache bytes themselves are compared on a GPU (tests/test_rope_kv_gpu.py): the interpreter's float8
    # rounding is not the GPU's (ties go up, and a carry out of the mantissa can halve a value).


@in_process
def test_rejects_bad_shapes():
    table = cos_sin_cache(16, 8, 10000.0, None, "cpu")
    kc = torch.zeros(2, 4, 2, 16)
    with pytest.raises(ValueError, match="heads"):
        rk.rope_kv_store(torch.zeros(3, 100), table, torch.zeros(3, dtype=torch.int64),
                         torch.zeros(3, dtype=torch.int64), torch.zeros(3, 64), kc, kc.clone(), 4, 2, 16)
    with pytest.raises(ValueError, match="even head_dim"):
        rk.rope_kv_store(torch.zeros(3, 8 * 15), table, torch.zeros(3, dtype=torch.int64),
                         torch.zeros(3, dtype=torch.int64), torch.zeros(3, 60), kc, kc.clone(), 4, 2, 15)
    with pytest.raises(ValueError, match="share dtype"):
        rk.rope_kv_store(torch.zeros(3, 128), table, torch.zeros(3, dtype=torch.int64),
                         torch.zeros(3, dtype=torch.int64), torch.zeros(3, 64), kc, kc.to(torch.bfloat16), 4, 2, 16)
    rk.rope_kv_store(torch.zeros(0, 128), table, torch.zeros(0, dtype=torch.int64),  # no rows: nothing to do
                     torch.zeros(0, dtype=torch.int64), torch.zeros(0, 64), kc, kc.clone(), 4, 2, 16)


# ---- the engine ------------------------------------------------------------------------------------------------
transformers = pytest.importorskip("transformers")


@in_process
def test_engine_logits_equal_with_the_fused_kernel(tmp_path):
    """A tiny float32 LLaMA through the engine (chunked prefill over pages, decode, the overlap preset's nano-batches):
    the fused kernel's logits equal the unfused path's at every step."""
    from tiny_models import save_tiny_llama, step_logits

    from nanoflow.config import EngineArgs
    from nanoflow.engine.engine import Engine
    from nanoflow.graphs.executor import Executor
    from nanoflow.graphs.pipeline import load_preset

    path = save_tiny_llama(tmp_path / "tiny", hidden_size=64, intermediate_size=96, num_attention_heads=4,
                           num_key_value_heads=2)
    g = seeded("prompts")
    prompts = [torch.randint(0, 128, (n,), generator=g).tolist() for n in (7, 45, 30, 3)]

    def logits(fused: bool) -> dict[str, list[torch.Tensor]]:
        engine = Engine(EngineArgs(model=str(path), device="cpu", dtype="float32", dense_batch_size=32,
                                   kv_cache_tokens=1024))
        assert not engine.runner.fused_rope_kv  # off by default on a CPU
        if fused:
            def counted(*args):
                calls.append(args[0].shape[0])
                rk.rope_kv_store(*args)

            engine.runner.glue["rope_kv_store"] = counted
        engine.runner.executor = Executor(engine.model.graphs, load_preset("llama-8b-overlap").rescaled(32))
        seen = step_logits(engine, prompts, max_tokens=5)
        engine.close()
        return seen

    calls: list[int] = []
    fused, plain = logits(True), logits(False)
    assert len(calls) > 2 * 5  # every layer of every step, per nano-batch
    assert fused.keys() == plain.keys() and len(fused) == 4
    for rid in plain:
        assert len(fused[rid]) == len(plain[rid]) == 5
        assert all(torch.equal(a, b) for a, b in zip(fused[rid], plain[rid])), rid
