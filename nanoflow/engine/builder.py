"""From ``EngineArgs`` to the parts of an engine: model spec, weights, tokenizer, cache and batch sizes.

Every user-facing choice is resolved here, once, with an error that says what to change when it cannot be met.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nanoflow.config import ConfigError, EngineArgs, ModelSpec, builtin_model_names

log = logging.getLogger("nanoflow")

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSource:
    spec: ModelSpec
    path: str | None  # weights folder / .gguf file, or None for dummy weights
    load_format: str  # "safetensors" | "gguf" | "dummy"
    name: str


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but no CUDA GPU is visible; use --device cpu")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ConfigError(f"device {device!r} is not supported; use auto, cpu or cuda[:N]")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, spec: ModelSpec) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not supported; use one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def resolve_kv_dtype(kv_cache_dtype: str, model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The KV cache's element type: the model's (``auto``) or float8 e4m3 (``fp8``). fp8 needs a GPU whose Triton
    converts float8 in registers (compute capability 8.9+: Ada, Hopper, Blackwell), or the CPU."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype != "fp8":
        raise ConfigError(f"kv_cache_dtype {kv_cache_dtype!r} is not supported; use auto or fp8")
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        name = torch.cuda.get_device_name(device)
        raise ConfigError(f"kv_cache_dtype='fp8' needs a GPU of compute capability 8.9 or newer; {name} is "
                          f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}: use kv_cache_dtype='auto'")
    from nanoflow.ops.kv_store import FP8

    return FP8


def kv_bytes_per_token(spec: ModelSpec, kv_heads_local: int, kv_dtype: torch.dtype) -> int:
    """Bytes one token's keys and values take in one rank's cache (all layers)."""
    return int(spec.kv_bytes_per_token(kv_heads_local, torch.finfo(kv_dtype).bits // 8))


def kv_token_bytes(args: EngineArgs, parts: dict[str, Any], device: torch.device) -> int:
    """:func:`kv_bytes_per_token` of the model in ``parts`` (from :func:`load_parts`) with ``args``' KV dtype."""
    model = parts["model"]
    kv_dtype = resolve_kv_dtype(args.kv_cache_dtype, parts["dtype"], device)
    return kv_bytes_per_token(model.spec, model.local_kv_heads, kv_dtype)


def resolve_source(model: str | None, load_format: str) -> ModelSource:
    """``None`` = the embedded SmolLM2-135M-Instruct GGUF; a short name; an HF folder; a ``.gguf`` file."""
    if model is None or str(model).endswith(".gguf") or model == "smollm2-135m":
        from nanoflow.models.gguf_loader import default_gguf_path, spec_from_gguf
    if model is None or (model == "smollm2-135m" and load_format in ("auto", "gguf")):
        path = str(default_gguf_path())
        return ModelSource(spec_from_gguf(path), path, "gguf", DEFAULT_MODEL_NAME)
    p = Path(model)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ConfigError(f"GGUF file {model} does not exist")
        fmt = "dummy" if load_format == "dummy" else "gguf"
        return ModelSource(spec_from_gguf(str(p)), str(p), fmt, p.stem)
    if p.is_dir():
        spec = ModelSpec.load(p)
        fmt = "dummy" if load_format == "dummy" else "safetensors"
        return ModelSource(spec, str(p), fmt, p.name)
    if model in builtin_model_names():
        if load_format not in ("auto", "dummy"):
            raise ConfigError(f"{model!r} is a built-in config without weights; use load_format='dummy' or pass a "
                              "folder with safetensors")
        if load_format == "auto":
            log.info("%s is a built-in config without weights: using random (dummy) weights", model)
        return ModelSource(ModelSpec.load(model), None, "dummy", model)
    raise ConfigError(f"model {model!r} is neither a folder, a .gguf file nor a built-in name "
                      f"({', '.join(builtin_model_names())})")


def kv_capacity_tokens(args: EngineArgs, spec: ModelSpec, device: torch.device, dtype: torch.dtype,
                       activation_bytes: int, kv_heads_local: int, fraction: float = 0.9) -> int:
    """KV tokens to allocate: ``kv_cache_tokens`` if given, else what free GPU memory holds in elements of ``dtype``
    (the KV cache's; CPU: 32,768)."""
    if args.kv_cache_tokens is not None:
        return args.kv_cache_tokens
    if device.type != "cuda":
        return 32768
    free, _total = torch.cuda.mem_get_info(device)
    per_token = kv_bytes_per_token(spec, kv_heads_local, dtype)
    budget = int(free * fraction) - activation_bytes - (2 << 30)
    if budget <= per_token * 1024:
        raise ConfigError(f"only {free / 2**30:.1f} GiB of GPU memory is free after the weights; not enough for a "
                          "KV cache. Use a smaller model, tensor parallelism (--tp) or --kv-cache-tokens")
    return budget // per_token


def load_parts(args: EngineArgs, device: torch.device, tp_rank: int = 0, tp_size: int = 1) -> dict[str, Any]:
    """Spec, weights, tokenizer and the model object for ``args``."""
    from nanoflow.models.loader import load_weights
    from nanoflow.models.registry import model_class

    source = resolve_source(args.model, args.load_format)
    dtype = resolve_dtype(args.dtype, device, source.spec)
    weights = load_weights(source.spec, source.path, load_format=source.load_format, dtype=dtype, device=device,
                           seed=args.seed, tp_rank=tp_rank, tp_size=tp_size, progress=tp_rank == 0)
    tokenizer = None
    if source.path is not None:
        from nanoflow.models.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(source.path)
    model = model_class(source.spec.architecture)(source.spec, weights, tp_rank=tp_rank, tp_size=tp_size)
    return {"source": source, "dtype": dtype, "model": model, "tokenizer": tokenizer}


def create_engine(args: EngineArgs) -> Any:
    """The engine ``args`` ask for: the tensor-parallel leader (``tp > 1``; other ranks follow inside and never
    return), the KV-offloading engine (``extra["kv_offload"]``, one device only), else the plain engine."""
    if args.tp == 1 and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        log.warning("launched with WORLD_SIZE=%s but tp=1: every rank runs a full copy; pass --tp to shard the model",
                    os.environ["WORLD_SIZE"])
    if args.tp > 1 and args.extra.get("kv_offload"):
        raise ConfigError("KV offload/reuse runs on one device only; drop --kv-offload or use --tp 1")
    if args.tp > 1:
        from nanoflow.engine.distributed import make_engine

        return make_engine(args)
    if args.extra.get("kv_offload"):
        from nanoflow.engine.kv_reuse import OffloadingEngine

        return OffloadingEngine(args)
    from nanoflow.engine.engine import Engine

    return Engine(args)
