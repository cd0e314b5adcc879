"""Decode attention over a float8 cache, hand-written in CUDA (``variant="cuda"``; source ``csrc/decode_fp8.cu``).

The Triton kernels cannot reach the per-SM rate that overlap needs (see ``decode.py``: ~27 G K/V elements/s per SM,
bound by ~0.16 warp instructions per element). This kernel copies K/V tiles into a per-warp ring of shared-memory stages
(``cp.async``, several tiles in flight per warp) and reads each lane's fragments as whole 16-byte words for its
tensor-core products (one warp per (row, kv head, split), ``mma.sync`` with head dims and output dims permuted so that
no byte is moved alone), about 0.07 warp instructions per K/V element by its SASS.

It is compiled on first use with the CUDA toolkit's ``nvcc`` into ``$NANOFLOW_CACHE/cuda`` (default
``~/.cache/nanoflow/cuda``, keyed by the source's hash and the GPU's architecture) and called through ``ctypes`` on
PyTorch's current stream, so it is captured by CUDA graphs like any kernel. Scope: a float8 (e4m3) cache, a bfloat16
query and output, ``head_dim`` 128, at most 8 query heads per kv head, pages of a multiple of 16 tokens, compute
capability 8.9 or newer. Several splits are combined by the Triton reduce kernel of ``split_kv.py``.

Measured on an H100 (640 rows x 1,280 tokens, benchmarks/results/2026-12-06-s10-green-decode-cuda-ring-h100.json):
2.90 TB/s on all 132 SMs (the Triton float8 default 2.78); inside green contexts 1.12 / 2.21 / 2.92 TB/s on 16 / 32 /
48 SMs (Triton 0.45 / 0.91 / 1.35). With the next tile prefetched into registers instead of the ring it reached only
0.59 / 1.14 / 1.58 (s10-green-decode-cuda-h100.json): bytes in flight per SM were then the limit. End to end
(LLaMA-3-8B, float8 KV, non-overlap) +3.7% over the Triton kernel in the same call.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from nanoflow.ops.attention.online_softmax import LOG2E
from nanoflow.ops.attention.reference import AttentionInputError
from nanoflow.ops.attention.split_kv import (
    check_programs,
    check_splits,
    default_num_splits,
    reduce_splits,
    split_outputs,
)
from nanoflow.ops.kv_store import FP8

SOURCE = Path(__file__).parent / "csrc" / "decode_fp8.cu"
TILE = 16  # tokens per tile of the kernel (its split arithmetic, shared with the reduce kernel)
WARPS = 4  # work-item warps per thread block
MAX_GROUP = 8
HEAD_DIM = 128
STAGES = (2, 3, 4, 6, 8)  # the instantiated shared-memory ring depths
DEFAULT_STAGES = 4
L2_HINTS = {"": 0, "evict_first": 1, "evict_last": 2}  # kv_evict -> Params::l2_hint


class _Params(ctypes.Structure):
    """Mirror of ``struct Params`` in ``decode_fp8.cu`` (passed by value)."""

    _fields_ = [(name, ctypes.c_void_p) for name in ("q", "k", "v", "block_tables", "seq_lens", "out", "po", "plse")]
    _fields_ += [(name, ctypes.c_int) for name in ("rows", "kv_heads", "group", "num_splits", "page_shift",
                                                   "l2_hint")]
    _fields_ += [("scale_log2", ctypes.c_float)]
    _fields_ += [(name, ctypes.c_longlong) for name in (
        "q_row", "q_head", "k_page", "k_slot", "k_head", "v_page", "v_slot", "v_head", "bt_row", "o_row", "o_head",
        "po_row", "po_head", "po_split", "plse_row", "plse_head")]


_LIBS: dict[str, ctypes.CDLL] = {}
_LOCK = threading.Lock()


def find_nvcc() -> str:
    """``$NANOFLOW_NVCC``, else ``$CUDA_HOME/bin/nvcc``, else ``nvcc`` on ``PATH``, else /usr/local/cuda's."""
    for cand in (os.environ.get("NANOFLOW_NVCC"),
                 os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc") if os.environ.get("CUDA_HOME") else None,
                 shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    raise AttentionInputError("decode variant 'cuda' compiles its kernel with nvcc, which was not found; install the "
                              "CUDA toolkit, set CUDA_HOME or NANOFLOW_NVCC, or use a Triton variant "
                              "(--decode-variant split)")


def _arch(device: torch.device) -> str:
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise AttentionInputError(f"decode variant 'cuda' needs compute capability >= 8.9 (float8 conversions), this "
                                  f"GPU has {major}.{minor}; use a Triton variant (--decode-variant split)")
    return f"{major}{minor}"


def build_command(nvcc: str, arch: str, out: str) -> list[str]:
    return [nvcc, "-O3", "-std=c++17", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-shared", "-Xcompiler",
            "-fPIC", "-o", out, str(SOURCE)]


def load_library(device: torch.device) -> ctypes.CDLL:
    """The compiled kernel library for ``device``'s architecture, built once per source version (thread-safe; a
    finished build is renamed into place, so concurrent processes never load a partial file)."""
    arch = _arch(device)
    with _LOCK:
        if arch in _LIBS:
            return _LIBS[arch]
        digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
        cache = Path(os.environ.get("NANOFLOW_CACHE", Path.home() / ".cache" / "nanoflow")) / "cuda"
        lib_path = cache / f"decode_fp8-{digest}-sm{arch}.so"
        if not lib_path.exists():
            cache.mkdir(parents=True, exist_ok=True)
            nvcc = find_nvcc()
            with tempfile.TemporaryDirectory(dir=cache) as tmp:
                tmp_lib = os.path.join(tmp, lib_path.name)
                res = subprocess.run(build_command(nvcc, arch, tmp_lib), capture_output=True, text=True)
                if res.returncode != 0:
                    raise RuntimeError(f"nvcc failed to build {SOURCE.name} for sm_{arch}:\n{res.stderr[-4000:]}")
                os.replace(tmp_lib, lib_path)
        lib = ctypes.CDLL(str(lib_path))
        lib.nf_decode_fp8.argtypes = [_Params, ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        lib.nf_decode_fp8.restype = ctypes.c_int
        lib.nf_params_size.restype = ctypes.c_int
        if lib.nf_params_size() != ctypes.sizeof(_Params):
            raise RuntimeError(f"{lib_path} was built from another Params layout; delete it to rebuild")
        _LIBS[arch] = lib
        return lib


def check_cuda_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                      page: int, group: int) -> None:
    """The kernel's scope, checked before launch (each message says what to change)."""
    alternative = "; use a Triton variant (--decode-variant split) for this model"
    if q.device.type != "cuda":
        raise AttentionInputError("decode variant 'cuda' runs on CUDA devices only" + alternative)
    if k_cache.dtype != FP8 or v_cache.dtype != FP8:
        raise AttentionInputError(f"decode variant 'cuda' reads a float8 (e4m3) cache, got {k_cache.dtype}; start "
                                  f"the engine with --kv-cache-dtype fp8" + alternative)
    if q.dtype != torch.bfloat16 or out.dtype != torch.bfloat16:
        raise AttentionInputError(f"decode variant 'cuda' takes a bfloat16 query and output, got {q.dtype} / "
                                  f"{out.dtype}" + alternative)
    if q.shape[-1] != HEAD_DIM or group > MAX_GROUP:
        raise AttentionInputError(f"decode variant 'cuda' is built for head_dim {HEAD_DIM} and at most {MAX_GROUP} "
                                  f"query heads per kv head, got head_dim {q.shape[-1]}, group {group}" + alternative)
    if page % TILE:
        raise AttentionInputError(f"decode variant 'cuda' needs pages of a multiple of {TILE} tokens, got {page}; "
                                  f"set --block-size {TILE}" + alternative)
    for name, t in (("q", q), ("out", out), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * t.element_size() % 16 for s in t.stride()[:-1]):
            raise AttentionInputError(f"decode variant 'cuda' loads 16-byte vectors: {name} needs unit stride along "
                                      f"head_dim and 16-byte aligned rows, got strides {t.stride()}" + alternative)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.shape[0] * t.stride(0) >= 2**32:
            raise AttentionInputError(f"decode variant 'cuda' addresses one layer's pages with 32-bit offsets; "
                                      f"{name} spans {t.shape[0] * t.stride(0)} bytes" + alternative)


def unavailable_reason(k_cache: torch.Tensor, v_cache: torch.Tensor, num_heads: int, page: int,
                       q_dtype: torch.dtype = torch.bfloat16, num_stages: int | None = None) -> str | None:
    """Why this kernel cannot serve one layer's ``k_cache``/``v_cache`` (``[pages, page, kv_heads, head_dim]``) for
    ``num_heads`` query heads of ``q_dtype`` (and ring depth ``num_stages``), or None when it can; building its
    library (nvcc, once) is part of the check. The engine's ``decode_variant="auto"`` picks it when this is None, else
    the Triton split kernel."""
    if num_stages is not None and num_stages not in STAGES:
        return f"num_stages={num_stages} is not one of its ring depths {STAGES}"
    heads = num_heads // max(1, k_cache.shape[-2])
    q = k_cache.new_empty((1, num_heads, k_cache.shape[-1]), dtype=q_dtype)
    try:
        check_cuda_inputs(q, k_cache, v_cache, q, page, heads)
        load_library(k_cache.device)
    except (AttentionInputError, RuntimeError, OSError) as exc:
        return str(exc)
    return None


def decode_cuda(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                seq_lens: torch.Tensor, out: torch.Tensor, scale: float, num_splits: int | None, workspace,
                max_programs: int | None, page: int, group: int, num_stages: int | None = None,
                kv_evict: str = "evict_first") -> torch.Tensor:
    """Launch on the current stream; the caller (``decode_attention``) has checked shapes and index tensors.
    ``max_programs`` bounds the grid: thread blocks of ``WARPS`` work-item warps, which then loop over the items.
    ``num_stages``: tiles in flight per warp's shared-memory ring (one of ``STAGES``; default ``DEFAULT_STAGES``).
    ``kv_evict``: the L2 policy of the K/V copies (``L2_HINTS``; ``evict_first`` keeps an overlapped GEMM's reused
    tiles in L2 ahead of the streamed cache)."""
    check_cuda_inputs(q, k_cache, v_cache, out, page, group)
    stages = DEFAULT_STAGES if num_stages is None else num_stages
    if stages not in STAGES:
        raise AttentionInputError(f"decode variant 'cuda' takes num_stages in {STAGES}, got {num_stages}")
    if kv_evict not in L2_HINTS:
        raise AttentionInputError(f"kv_evict must be one of {sorted(L2_HINTS)}, got {kv_evict!r}")
    rows, num_heads, _ = q.shape
    kv_heads = k_cache.shape[2]
    num_splits = check_splits(num_splits or default_num_splits(rows, kv_heads, q.device))
    if max_programs is not None:
        check_programs(max_programs)
    direct, po, plse, partial_strides = split_outputs(out, workspace, num_splits)
    lib = load_library(q.device)
    params = _Params(
        q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), block_tables.data_ptr(), seq_lens.data_ptr(),
        out.data_ptr(), po.data_ptr(), plse.data_ptr(),
        rows, kv_heads, group, num_splits, page.bit_length() - 1, L2_HINTS[kv_evict],
        scale * LOG2E,
        *q.stride()[:2], *k_cache.stride()[:3], *v_cache.stride()[:3], block_tables.stride(0), *out.stride()[:2],
        *partial_strides)
    stream = ctypes.c_void_p(torch.cuda.current_stream(q.device).cuda_stream)
    err = lib.nf_decode_fp8(params, stages, max_programs or 0, stream)
    if err:
        raise RuntimeError(f"decode variant 'cuda' failed to launch (cudaError {err})")
    if not direct:
        reduce_splits(seq_lens, out, po, plse, partial_strides, num_splits, TILE)
    return out
