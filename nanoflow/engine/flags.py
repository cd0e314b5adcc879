"""The engine flags every command that builds an engine shares (``run-offline``, ``serve``, ``chat``), and the
``EngineArgs`` they make. No torch import here: ``--help`` stays fast."""

from __future__ import annotations

import argparse
from typing import Any

from nanoflow.config import (
    ADMISSION_PACE,
    ADMISSION_PACE_HELP,
    BATCH_INVARIANT_HELP,
    DECODE_CHOICES,
    DECODE_VARIANT_HELP,
    DTYPES,
    GPU_MEMORY_UTILIZATION_HELP,
    KV_CACHE_DTYPE_HELP,
    KV_CACHE_DTYPES,
    MOE_BACKEND_HELP,
    MOE_BACKENDS,
    EngineArgs,
)
from nanoflow.engine.kv_flags import kv_offload_extra


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def memory_fraction(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1], e.g. 0.9; got {text}")
    return value


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Register the engine's flags on ``p``."""
    from nanoflow.graphs.pipeline import list_presets  # JSON files only: --help imports no torch

    p.add_argument("--model", default=None,
                   help="built-in short name (e.g. llama-3-8b), HF folder with config.json + safetensors, or a .gguf "
                        "file; default: the embedded SmolLM2-135M-Instruct")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="weight/activation dtype; auto = bfloat16 on GPU, float32 on CPU")
    p.add_argument("--load-format", default="auto", choices=["auto", "dummy", "safetensors", "gguf"],
                   help="dummy = random weights from the config (throughput runs)")
    p.add_argument("--tp", type=positive_int, default=1,
                   help="tensor-parallel degree: one process per GPU, launched with `torchrun --nproc-per-node N` or "
                        "`accelerate launch --num_processes N` (rank 0 does the command's work, the others follow)")
    p.add_argument("--dense-batch-size", type=positive_int, default=None,
                   help="tokens per iteration (decode + prefill chunks); default: 2048 on GPU, 256 on CPU")
    p.add_argument("--max-model-len", type=positive_int, default=None,
                   help="longest prompt + output; default: the model's")
    kv = p.add_mutually_exclusive_group()
    kv.add_argument("--kv-cache-tokens", type=positive_int, default=None,
                    help="KV-cache capacity in tokens; default: from free GPU memory (0.9 of it, less the activation "
                         "buffers and 2 GiB), 32,768 on a CPU")
    kv.add_argument("--gpu-memory-utilization", type=memory_fraction, default=None, help=GPU_MEMORY_UTILIZATION_HELP)
    p.add_argument("--max-num-seqs", type=positive_int, default=None, help="most requests running at once")
    p.add_argument("--admission-pace", type=float, default=ADMISSION_PACE, help=ADMISSION_PACE_HELP)
    p.add_argument("--pipeline", default=None,
                   help=f"nano-batch pipeline: a preset name ({', '.join(list_presets())}), a spec .json, 'auto' (the "
                        "newest spec `nanoflow search` cached for this model, dense batch, TP, KV-cache dtype and "
                        "--decode-variant, else the model's overlap preset), 'preset' (the model's overlap preset: "
                        "mixtral-overlap for MoE models, else llama-8b-overlap; under --tp mixtral-tp-overlap / "
                        "llama-70b-tp-overlap) or 'none'")
    p.add_argument("--resource-knob", default="grid", choices=["grid", "partition", "green", "none"],
                   help="how nano-op shares are enforced on the GPU: decode persistent grid; partition (that grid plus "
                        "a cuBLASLt SM target for the GEMMs beside it); green contexts; or none")
    p.add_argument("--kv-cache-dtype", default="auto", choices=KV_CACHE_DTYPES, help=KV_CACHE_DTYPE_HELP)
    p.add_argument("--decode-variant", default="auto", choices=DECODE_CHOICES, help=DECODE_VARIANT_HELP)
    p.add_argument("--moe-backend", default="auto", choices=MOE_BACKENDS, help=MOE_BACKEND_HELP)
    p.add_argument("--batch-invariant", action="store_true", help=BATCH_INVARIANT_HELP)
    p.add_argument("--no-async", action="store_true", help="schedule synchronously (batch i+1 after batch i ends)")
    p.add_argument("--no-cuda-graphs", action="store_true", help="run the forward eagerly on the GPU")
    p.add_argument("--no-compile", action="store_true", help="do not torch.compile the glue ops")
    p.add_argument("--seed", type=int, default=0, help="seed for dummy weights and unseeded sampling")


def engine_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``LLM(**engine_kwargs(args))``: the parsed flags as keyword arguments (``--kv-offload``'s too, if present)."""
    kw = dict(model=args.model, device=args.device, dtype=args.dtype, load_format=args.load_format, tp=args.tp,
              dense_batch_size=args.dense_batch_size, max_model_len=args.max_model_len,
              kv_cache_tokens=args.kv_cache_tokens, gpu_memory_utilization=args.gpu_memory_utilization,
              max_num_seqs=args.max_num_seqs, pipeline=args.pipeline,
              async_scheduling=not args.no_async, cuda_graphs=not args.no_cuda_graphs,
              compile=not args.no_compile, seed=args.seed, resource_knob=args.resource_knob,
              kv_cache_dtype=args.kv_cache_dtype, decode_variant=args.decode_variant, moe_backend=args.moe_backend,
              batch_invariant=args.batch_invariant, admission_pace=args.admission_pace)
    if hasattr(args, "kv_offload"):
        kw.update(kv_offload_extra(args))
    return kw


def engine_args(args: argparse.Namespace) -> EngineArgs:
    """The parsed flags as ``EngineArgs`` (what ``serve`` and ``chat`` build their engine from)."""
    return EngineArgs.from_kwargs(**engine_kwargs(args))
