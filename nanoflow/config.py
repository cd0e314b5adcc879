"""Frozen configuration objects.

``ModelSpec`` is a parsed Hugging Face ``config.json``: the few fields every layer needs, with derived sizes as
properties. ``CacheSpec`` fixes the paged KV-cache layout, ``EngineArgs`` the user's engine options. Environment
variables are read in exactly one place (:func:`env_flag`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any

# The decode-attention kernels (nanoflow.ops.attention.backends), and "auto": the CUDA one where it applies, else split.
DECODE_VARIANTS = ("split", "row", "row_flat", "packed", "cuda")
DECODE_CHOICES = ("auto", *DECODE_VARIANTS)
# Integer-valued options of the decode-attention kernel that EngineArgs.extra["decode_options"] and the command
# lines' --decode-options may set (nanoflow.ops.attention.decode.decode_attention's keywords of the same names).
DECODE_OPTION_KEYS = ("block_n", "num_warps", "num_stages", "prefetch", "f16_tiles", "tma", "head_group", "maxnreg")

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM", "MixtralForCausalLM")
DTYPES = ("float32", "bfloat16", "float16")
# KV-cache element types: "auto" = the model's dtype; "fp8" = float8 e4m3 with unit scale (values clamped to +-448),
# half the bytes of bf16, so twice the tokens fit (what vLLM calls kv_cache_dtype="fp8" without calibrated scales).
KV_CACHE_DTYPES = ("auto", "fp8")
MOE_BACKENDS = ("auto", "triton", "torch")  # nanoflow.ops.moe.grouped_mm
DECODE_VARIANT_HELP = ("decode-attention kernel on a GPU: auto = the hand-written CUDA kernel where it applies (float8 "
                       "KV cache, head_dim 128, nvcc present to build it once), else the Triton split kernel; or name "
                       "one: " + ", ".join(DECODE_VARIANTS))
BATCH_INVARIANT_HELP = ("make every request's tokens independent of its batch (nano-batch cuts, prefill chunks, the "
                        "other requests), like vLLM's VLLM_BATCH_INVARIANT: Triton GEMMs and norms with fixed tiles, "
                        "decode attention with one KV split. Slower; needs a GPU (dense models, tp <= 2)")
MOE_BACKEND_HELP = ("grouped GEMM of MoE experts on a GPU: auto = time triton and torch (torch._grouped_mm) once per "
                    "shape while warming up and keep the faster; or name one")
KV_CACHE_DTYPE_HELP = ("KV-cache element type: auto = the model's dtype; fp8 = float8 e4m3 with unit scale, half "
                       "the bytes of bf16, so about twice the KV tokens fit (on a GPU: compute capability 8.9+)")

ADMISSION_PACE = 0.0  # off: simulations predicted it 6% slower to 9% faster (docs/performance.md, session 18)
PACED_MARGIN = 1.05  # the margin bench mode non-overlap-paced runs when --admission-pace is 0
ADMISSION_PACE_HELP = ("admission pacing, e.g. 1.05: when the KV cache, not the dense batch, limits the running "
                       "requests, admit new prefill at most this many times the cache's steady-state rate (paper "
                       "§4.1.1: R * p / d tokens an iteration, R = KV tokens / (p + d/2), p and d the running "
                       "requests' mean prompt and predicted decode lengths), so requests of one age do not fill the "
                       "cache together and stall admission until they end; 0 (default) = admit whenever the "
                       "predicted peak KV fits")
GPU_MEMORY_UTILIZATION_HELP = (
    "size the KV cache by measurement, as vLLM's flag of that name does: the engine may hold this share of the GPU's "
    "total memory (weights, activations, CUDA graphs and KV cache), e.g. 0.95. A probe engine with a small cache "
    "first captures every CUDA graph and runs a full dense batch and a full decode step, and the cache gets what "
    "that leaves. Default: --kv-cache-tokens, else 0.9 of the free memory less an estimate of the activations")


class ConfigError(ValueError):
    """A model or engine configuration that NanoFlow cannot serve; the message says what to change."""


def env_flag(name: str, default: bool = False) -> bool:
    """Read a boolean environment variable (``1/true/yes``); the only place the package reads the environment."""
    value = os.environ.get(name)
    if value is None:
        return default
    return value.strip().lower() in ("1", "true", "yes", "on")


def cache_root() -> Path:
    """Where NanoFlow keeps what it derives once and reuses (kernel profiles, searched pipelines, converted
    tokenizers): ``$NANOFLOW_CACHE``, else ``~/.cache/nanoflow``."""
    return Path(os.environ.get("NANOFLOW_CACHE", Path.home() / ".cache" / "nanoflow"))


def builtin_model_names() -> list[str]:
    """Short names of the model configs shipped in ``nanoflow/configs``."""
    folder = resources.files("nanoflow") / "configs"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def builtin_config_path(name: str) -> Path:
    path = Path(str(resources.files("nanoflow") / "configs" / f"{name}.json"))
    if not path.is_file():
        raise ConfigError(f"unknown model short name {name!r}; known: {', '.join(builtin_model_names())}")
    return path


@dataclass(frozen=True)
class RopeScaling:
    """LLaMA-3.1 style (``rope_type == "llama3"``) frequency scaling; ``None`` on ModelSpec means plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelSpec:
    """The architecture facts of one model, independent of weights and devices."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    rope_scaling: RopeScaling | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    num_experts: int = 0
    num_experts_per_tok: int = 0
    torch_dtype: str = "bfloat16"
    name: str = ""

    # ---- derived sizes -------------------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def gqa_ratio(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def layer_params(self) -> int:
        """Weight elements of one decoder layer (projections, norms, biases, router)."""
        h, i = self.hidden_size, self.intermediate_size
        attn = h * (self.q_size + 2 * self.kv_size) + self.q_size * h
        if self.attention_bias:
            attn += self.q_size + 2 * self.kv_size
        mlp = 3 * h * i
        if self.is_moe:
            mlp = self.num_experts * mlp + h * self.num_experts
        return attn + mlp + 2 * h

    @property
    def num_params(self) -> int:
        """Total parameter count (embedding and LM head counted once each unless tied)."""
        emb = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else emb
        return self.num_layers * self.layer_params + emb + head + self.hidden_size

    @property
    def active_params(self) -> int:
        """Parameters touched per token (MoE: only ``num_experts_per_tok`` experts); P_model of the paper's eq. 5."""
        if not self.is_moe:
            return self.num_params
        h, i = self.hidden_size, self.intermediate_size
        inactive = (self.num_experts - self.num_experts_per_tok) * 3 * h * i
        return self.num_params - self.num_layers * inactive

    def kv_bytes_per_token(self, kv_heads: int | None = None, elem_bytes: float = 2) -> float:
        """Bytes one token's keys and values take over all layers: ``2 * layers * kv_heads * head_dim * elem_bytes``.

        ``kv_heads``: the heads one cache holds (default all of the model's; one rank's share under tensor
        parallelism); ``elem_bytes``: bytes an element (2 for bf16/fp16, 1 for float8)."""
        heads = self.num_kv_heads if kv_heads is None else kv_heads
        return 2 * self.num_layers * heads * self.head_dim * elem_bytes

    # ---- parsing -------------------------------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict[str, Any], name: str = "") -> ModelSpec:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else ""
        if arch not in SUPPORTED_ARCHITECTURES:
            from nanoflow.models.registry import registered_architectures

            known = registered_architectures()
            if arch not in known:
                raise ConfigError(
                    f"unsupported architecture {arch or '(none given)'!r}; supported: {', '.join(known)}"
                )
        if cfg.get("use_sliding_window") or (arch == "MistralForCausalLM" and cfg.get("sliding_window")):
            raise ConfigError(f"{arch} with a sliding window is not supported; set sliding_window to null")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act {act!r} is not supported; only 'silu' (SwiGLU) models are")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        # transformers >= 5 writes "rope_parameters" (theta inside); older configs "rope_scaling" + "rope_theta".
        rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
        theta = cfg.get("rope_theta") or (rs or {}).get("rope_theta") or 10000.0
        scaling = None
        if rs:
            kind = rs.get("rope_type", rs.get("type"))
            if kind == "llama3":
                scaling = RopeScaling(
                    factor=float(rs["factor"]),
                    low_freq_factor=float(rs["low_freq_factor"]),
                    high_freq_factor=float(rs["high_freq_factor"]),
                    original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
                )
            elif kind not in (None, "default"):
                raise ConfigError(f"rope_scaling type {kind!r} is not supported; supported: 'llama3' or none")
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
        is_qwen2 = arch == "Qwen2ForCausalLM"
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)) or is_qwen2,
            rope_scaling=scaling,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            num_experts=int(cfg.get("num_local_experts", 0) or 0),
            num_experts_per_tok=int(cfg.get("num_experts_per_tok", 0) or 0),
            torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16"),
            name=name,
        )

    @classmethod
    def load(cls, model: str | os.PathLike[str]) -> ModelSpec:
        """A short name (``llama-3-8b``), a folder holding ``config.json``, or a ``config.json`` path."""
        path = Path(model)
        if path.is_dir():
            path = path / "config.json"
            if not path.is_file():
                raise ConfigError(f"{model} has no config.json")
        elif not path.is_file():
            path = builtin_config_path(str(model))
        with open(path) as f:
            cfg = json.load(f)
        return cls.from_hf_config(cfg, name=path.parent.name if path.name == "config.json" else path.stem)

    def replace(self, **changes: Any) -> ModelSpec:
        from dataclasses import replace

        return replace(self, **changes)


@dataclass(frozen=True)
class CacheSpec:
    """Paged KV-cache layout: ``num_blocks`` pages of ``block_size`` tokens per layer.

    The device tensor is ``[num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim]`` (K then V); a token's
    *slot* is ``block_id * block_size + offset``.
    """

    num_blocks: int
    block_size: int = 16

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size


@dataclass(frozen=True)
class EngineArgs:
    """Options of one engine instance (what ``LLM(...)`` and the CLI take)."""

    model: str | None = None
    dtype: str = "auto"
    device: str = "auto"
    load_format: str = "auto"
    dense_batch_size: int | None = None
    max_model_len: int | None = None
    kv_cache_tokens: int | None = None
    # Share of the GPU's total memory this engine may hold; the KV cache gets what a probe run leaves
    # (engine/memory.py). None: kv_cache_tokens, else the free-memory estimate (engine/builder.kv_capacity_tokens).
    gpu_memory_utilization: float | None = None
    block_size: int = 16
    max_num_seqs: int | None = None
    tp: int = 1
    seed: int = 0
    async_scheduling: bool = True
    cuda_graphs: bool = True
    compile: bool = True
    pipeline: str | None = None
    resource_knob: str = "grid"  # how nano-op shares are enforced: grid|partition|green|none (graphs/resources.py)
    kv_cache_dtype: str = "auto"  # KV_CACHE_DTYPES
    # Every request's tokens independent of its batch (nano-batch cuts, prefill chunks, other requests), at a cost in
    # speed: Triton GEMMs and norms with fixed tiles, fixed attention tiles (ops/batch_invariant.py).
    batch_invariant: bool = False
    # Admission pacing (scheduler/batcher.py): prefill admits new requests at most this many times the KV cache's
    # steady-state rate (paper §4.1.1's R * p / d), so a KV-bound engine runs steady instead of in waves; 0 = off.
    admission_pace: float = ADMISSION_PACE
    # Free-form options, among them: moe_backend (MOE_BACKENDS: the grouped GEMM of MoE layers, default auto),
    # decode_variant ("auto"|"split"|"row"|...|"cuda", the decode-attention kernel), decode_options (its
    # block_n/num_warps/num_stages/kv_evict), decode_ctas_per_sm, memory_share, avg_prompt/avg_decode, kv_* (offload),
    # fused_rope_kv (default True: RoPE and the KV write in one Triton kernel on a GPU, ops/rope_kv.py).
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", *DTYPES):
            raise ConfigError(f"dtype {self.dtype!r} is not supported; use one of auto, {', '.join(DTYPES)}")
        if self.load_format not in ("auto", "dummy", "safetensors", "gguf"):
            raise ConfigError(f"load_format {self.load_format!r} is not supported; use auto, dummy, safetensors or "
                              "gguf")
        for name in ("dense_batch_size", "max_model_len", "kv_cache_tokens", "max_num_seqs"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{name} must be positive, got {value}")
        pace = self.admission_pace
        if isinstance(pace, bool) or not isinstance(pace, (int, float)) or not 0.0 <= pace < float("inf"):
            raise ConfigError(f"admission_pace must be >= 0 (0 turns admission pacing off), got {self.admission_pace}")
        util = self.gpu_memory_utilization
        if util is not None:
            if isinstance(util, bool) or not isinstance(util, (int, float)) or not 0.0 < util <= 1.0:
                raise ConfigError(f"gpu_memory_utilization must be a fraction in (0, 1], e.g. 0.9; got {util!r}")
            if self.kv_cache_tokens is not None:
                raise ConfigError("give kv_cache_tokens or gpu_memory_utilization, not both: the first fixes the KV "
                                  "cache's size, the second measures it")
            if self.tp > 1:
                raise ConfigError("gpu_memory_utilization measures one GPU's memory; under tensor parallelism give "
                                  "kv_cache_tokens (--kv-cache-tokens), the capacity every rank allocates")
        if self.tp < 1:
            raise ConfigError(f"tp must be >= 1, got {self.tp}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ConfigError(f"kv_cache_dtype {self.kv_cache_dtype!r} is not supported; use one of "
                              f"{', '.join(KV_CACHE_DTYPES)}")
        if self.block_size <= 0 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size must be a positive power of two, got {self.block_size}")
        if self.extra.get("decode_variant", "auto") not in DECODE_CHOICES:
            raise ConfigError(f"decode_variant {self.extra['decode_variant']!r} is not supported; use one of "
                              f"{', '.join(DECODE_CHOICES)}")
        if self.batch_invariant:
            if self.extra.get("decode_variant", "auto") not in ("auto", "split") or self.extra.get("decode_options"):
                raise ConfigError("batch_invariant fixes the decode-attention kernel (the split variant with fixed "
                                  "tiles): drop decode_variant/decode_options or batch_invariant")
            if self.tp > 2:
                raise ConfigError(f"batch_invariant holds for tp <= 2 (a sum of two partial results rounds alike in "
                                  f"any order; NCCL may order more by message size); got tp {self.tp}")
        if self.extra.get("moe_backend", "auto") not in MOE_BACKENDS:
            raise ConfigError(f"moe_backend {self.extra['moe_backend']!r} is not supported; use one of "
                              f"{', '.join(MOE_BACKENDS)}")

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineArgs:
        """``EngineArgs`` from keyword arguments as ``LLM(...)`` takes them: the fields by name, every other keyword
        (``moe_backend``, ``decode_variant``, ``kv_offload`` ...) into ``extra``."""
        names = {f.name for f in fields(cls)} - {"extra"}
        extra = {**kwargs.pop("extra", {}), **{k: kwargs.pop(k) for k in list(kwargs) if k not in names}}
        return cls(**kwargs, extra=extra)
