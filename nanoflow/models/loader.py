"""Weight loading: HF safetensors, GGUF and "dummy" random weights, into NanoFlow's fused parameter layout.

NanoFlow's parameter names (what the model code reads), for layer ``i``::

    embed.weight                [vocab, hidden]
    layers.i.attn_norm.weight   [hidden]
    layers.i.qkv.weight         [q_size + 2 * kv_size, hidden]   = cat(q_proj, k_proj, v_proj) along dim 0
    layers.i.qkv.bias           [q_size + 2 * kv_size]           only when spec.attention_bias (Qwen2)
    layers.i.o_proj.weight      [hidden, q_size]
    layers.i.ffn_norm.weight    [hidden]                          (HF post_attention_layernorm)
    layers.i.gate_up.weight     [2 * intermediate, hidden]       = cat(gate_proj, up_proj)       dense models
    layers.i.down.weight        [hidden, intermediate]                                            dense models
    layers.i.router.weight      [experts, hidden]                                                 MoE (Mixtral)
    layers.i.experts.w13        [experts, 2 * intermediate, hidden]  per expert cat(w1, w3)       MoE
    layers.i.experts.w2         [experts, hidden, intermediate]                                   MoE
    norm.weight                 [hidden]
    lm_head.weight              [vocab, hidden]                   absent when spec.tie_word_embeddings

Tensor parallelism (``tp_size > 1``) gives every rank its local shard under the same names: q/k/v heads and
gate/up rows are sharded *separately* and then fused, so a rank's ``qkv`` is ``cat(q_r, k_r, v_r)``; o_proj and down
(and each expert's w2) are sharded along their input dim; embed and lm_head along the vocab (rows), with the vocab
padded up to a multiple of ``tp_size`` by zero rows — the model must drop logits at ids >= ``spec.vocab_size``
after gathering them. Norms and the router are replicated. With fewer KV heads than ranks, each KV head is
replicated on ``tp_size // num_kv_heads`` consecutive ranks. See :class:`ShardLayout`.

Loading is tensor by tensor: each fused target is allocated on ``device`` in the final dtype and its pieces are
copied in from memory-mapped files, so peak host memory stays near one source tensor.
"""

from __future__ import annotations

import json
import math
from collections.abc import Collection
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from nanoflow.config import ConfigError, ModelSpec

SUPPORTED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
DUMMY_STD = 0.02
# Present in some checkpoints but recomputed by the model; never an error.
_HARMLESS_SUFFIXES = ("rotary_emb.inv_freq",)
_VOCAB_TENSORS = ("embed.weight", "lm_head.weight")


class WeightLoadError(ValueError):
    """Weights that cannot be loaded for this spec; the message names the file or tensor and what was expected."""


# ---- tensor-parallel layout -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShardLayout:
    """What one tensor-parallel rank holds. With ``tp_size == 1`` it is the whole model.

    Invariants: ``num_heads * tp_size == spec.num_heads``; ``padded_vocab_size == vocab_per_rank * tp_size >=
    spec.vocab_size``; the rank's q heads are ``[q_head_start, q_head_start + num_heads)``, its KV heads
    ``[kv_head_start, kv_head_start + num_kv_heads)``, its vocab rows ``[vocab_start, vocab_start + vocab_per_rank)``.
    """

    tp_rank: int
    tp_size: int
    num_heads: int
    num_kv_heads: int
    q_head_start: int
    kv_head_start: int
    intermediate_size: int
    intermediate_start: int
    vocab_per_rank: int
    padded_vocab_size: int

    @property
    def vocab_start(self) -> int:
        return self.tp_rank * self.vocab_per_rank


def shard_layout(spec: ModelSpec, tp_rank: int = 0, tp_size: int = 1) -> ShardLayout:
    """The local shard of rank ``tp_rank`` of ``tp_size``; raises ConfigError when the model cannot be split so."""
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ConfigError(f"tp_rank must be in [0, tp_size) with tp_size >= 1; got rank {tp_rank} of {tp_size}")
    if spec.num_heads % tp_size:
        raise ConfigError(f"{spec.num_heads} attention heads cannot be split over tp={tp_size}; use a divisor")
    if spec.intermediate_size % tp_size:
        raise ConfigError(f"intermediate_size {spec.intermediate_size} is not divisible by tp={tp_size}")
    heads = spec.num_heads // tp_size
    kv = spec.num_kv_heads
    if kv >= tp_size:
        if kv % tp_size:
            raise ConfigError(f"{kv} KV heads cannot be split over tp={tp_size}; use a divisor of {kv}")
        local_kv, kv_start = kv // tp_size, tp_rank * (kv // tp_size)
    else:
        if tp_size % kv:
            raise ConfigError(f"{kv} KV heads cannot be replicated over tp={tp_size}; tp must be a multiple of {kv}")
        # Rank r's q heads all belong to KV group r // (tp / kv), so one replicated KV head serves them.
        local_kv, kv_start = 1, tp_rank // (tp_size // kv)
    inter = spec.intermediate_size // tp_size
    per_rank = -(-spec.vocab_size // tp_size)
    return ShardLayout(
        tp_rank=tp_rank,
        tp_size=tp_size,
        num_heads=heads,
        num_kv_heads=local_kv,
        q_head_start=tp_rank * heads,
        kv_head_start=kv_start,
        intermediate_size=inter,
        intermediate_start=tp_rank * inter,
        vocab_per_rank=per_rank,
        padded_vocab_size=per_rank * tp_size,
    )


# ---- the plan: which source slices make up each NanoFlow tensor ----------------------------------------------------
class Piece(NamedTuple):
    """``source[hf_name][index]`` copied into rows ``[row, row + n)`` of the target (of ``target[expert]`` for MoE)."""

    hf_name: str
    full_shape: tuple[int, ...]  # the unsharded HF shape the source must have
    index: tuple[slice, ...]
    row: int = 0
    expert: int | None = None


class Target(NamedTuple):
    name: str
    shape: tuple[int, ...]
    pieces: tuple[Piece, ...]


def _span(start: int, count: int, unit: int = 1) -> slice:
    return slice(start * unit, (start + count) * unit)


def _plan(spec: ModelSpec, lay: ShardLayout, available: Collection[str] = ()) -> list[Target]:
    """Every NanoFlow tensor of ``spec`` for one rank, in load order. ``available`` picks between MoE layouts."""
    h, hd, inter = spec.hidden_size, spec.head_dim, spec.intermediate_size
    li, ist = lay.intermediate_size, lay.intermediate_start
    lq, lkv = lay.num_heads * hd, lay.num_kv_heads * hd
    rows_i = _span(ist, li)
    all_ = slice(None)
    v0 = lay.vocab_start
    v1 = min(v0 + lay.vocab_per_rank, spec.vocab_size)

    def vocab_pieces(hf: str) -> tuple[Piece, ...]:
        return (Piece(hf, (spec.vocab_size, h), (slice(v0, v1),)),) if v1 > v0 else ()

    out = [Target("embed.weight", (lay.vocab_per_rank, h), vocab_pieces("model.embed_tokens.weight"))]
    for i in range(spec.num_layers):
        p, n = f"model.layers.{i}.", f"layers.{i}."
        out.append(Target(n + "attn_norm.weight", (h,), (Piece(p + "input_layernorm.weight", (h,), (all_,)),)))
        q_rows = _span(lay.q_head_start, lay.num_heads, hd)
        kv_rows = _span(lay.kv_head_start, lay.num_kv_heads, hd)
        for kind in ("weight", "bias") if spec.attention_bias else ("weight",):
            tail = (h,) if kind == "weight" else ()
            qkv = (
                Piece(f"{p}self_attn.q_proj.{kind}", (spec.q_size, *tail), (q_rows,)),
                Piece(f"{p}self_attn.k_proj.{kind}", (spec.kv_size, *tail), (kv_rows,), lq),
                Piece(f"{p}self_attn.v_proj.{kind}", (spec.kv_size, *tail), (kv_rows,), lq + lkv),
            )
            out.append(Target(f"{n}qkv.{kind}", (lq + 2 * lkv, *tail), qkv))
        o_proj = Piece(p + "self_attn.o_proj.weight", (h, spec.q_size), (all_, q_rows))
        out.append(Target(n + "o_proj.weight", (h, lq), (o_proj,)))
        ffn_norm = Piece(p + "post_attention_layernorm.weight", (h,), (all_,))
        out.append(Target(n + "ffn_norm.weight", (h,), (ffn_norm,)))
        if not spec.is_moe:
            gate_up = (
                Piece(p + "mlp.gate_proj.weight", (inter, h), (rows_i,)),
                Piece(p + "mlp.up_proj.weight", (inter, h), (rows_i,), li),
            )
            out.append(Target(n + "gate_up.weight", (2 * li, h), gate_up))
            down = Piece(p + "mlp.down_proj.weight", (h, inter), (all_, rows_i))
            out.append(Target(n + "down.weight", (h, li), (down,)))
            continue
        out.extend(_moe_targets(spec, lay, p, n, available))
    out.append(Target("norm.weight", (h,), (Piece("model.norm.weight", (h,), (all_,)),)))
    if not spec.tie_word_embeddings:
        out.append(Target("lm_head.weight", (lay.vocab_per_rank, h), vocab_pieces("lm_head.weight")))
    return out


def _moe_targets(spec: ModelSpec, lay: ShardLayout, p: str, n: str, available: Collection[str]) -> list[Target]:
    """Router and expert tensors of one Mixtral layer (HF prefix ``p``, NanoFlow prefix ``n``).

    Each expert's intermediate dim is sharded like a dense MLP's, so every rank holds a slice of every expert.
    """
    h, inter, n_exp = spec.hidden_size, spec.intermediate_size, spec.num_experts
    li, ist = lay.intermediate_size, lay.intermediate_start
    rows, all_ = _span(ist, li), slice(None)
    if p + "mlp.gate.weight" in available:  # transformers-5 fused expert tensors: gate_up = cat(gate, up) on dim 1
        router = Piece(p + "mlp.gate.weight", (n_exp, h), (all_,))
        gu, dn = p + "mlp.experts.gate_up_proj", p + "mlp.experts.down_proj"
        up_rows = _span(inter + ist, li)
        w13 = [Piece(gu, (n_exp, 2 * inter, h), (slice(e, e + 1), rows), 0, e) for e in range(n_exp)]
        w13 += [Piece(gu, (n_exp, 2 * inter, h), (slice(e, e + 1), up_rows), li, e) for e in range(n_exp)]
        w2 = [Piece(dn, (n_exp, h, inter), (slice(e, e + 1), all_, rows), 0, e) for e in range(n_exp)]
    else:  # the classic Mixtral checkpoint layout (also what transformers 5 writes on save)
        router = Piece(p + "block_sparse_moe.gate.weight", (n_exp, h), (all_,))
        ex = p + "block_sparse_moe.experts."
        w13 = [Piece(f"{ex}{e}.w1.weight", (inter, h), (rows,), 0, e) for e in range(n_exp)]
        w13 += [Piece(f"{ex}{e}.w3.weight", (inter, h), (rows,), li, e) for e in range(n_exp)]
        w2 = [Piece(f"{ex}{e}.w2.weight", (h, inter), (all_, rows), 0, e) for e in range(n_exp)]
    return [
        Target(n + "router.weight", (n_exp, h), (router,)),
        Target(n + "experts.w13", (n_exp, 2 * li, h), tuple(w13)),
        Target(n + "experts.w2", (n_exp, h, li), tuple(w2)),
    ]


def expected_shapes(spec: ModelSpec, *, tp_size: int = 1) -> dict[str, tuple[int, ...]]:
    """NanoFlow tensor name -> shape of one rank's shard (the full tensor when ``tp_size == 1``)."""
    return {t.name: t.shape for t in _plan(spec, shard_layout(spec, 0, tp_size))}


# ---- sources ---------------------------------------------------------------------------------------------------
class TensorSource(Protocol):
    """HF-named tensors of one checkpoint: ``names``, unsharded ``shape`` and a sliced ``read`` (on CPU)."""

    def names(self) -> set[str]: ...

    def shape(self, name: str) -> tuple[int, ...]: ...

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor: ...


class SafetensorsSource:
    """Memory-mapped safetensors files; a read touches only the requested slice."""

    def __init__(self, files: list[Path], stack: ExitStack) -> None:
        self._where: dict[str, Any] = {}  # tensor name -> the open safe_open handle holding it
        for file in files:
            handle = stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
            names = handle.keys()
            for key in names:
                self._where[key] = handle

    def names(self) -> set[str]:
        return set(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        part = self._where[name].get_slice(name)
        if part.get_dtype() not in ("F64", "F32", "F16", "BF16"):
            raise WeightLoadError(
                f"tensor {name} is stored as {part.get_dtype()}; only float checkpoints are supported "
                "(quantized safetensors such as GPTQ/AWQ are not)"
            )
        return part[index]


def safetensors_files(folder: Path) -> list[Path]:
    """The HF checkpoint files of ``folder``: the index's shards, ``model.safetensors``, or ``model-*-of-*``."""
    if not folder.exists():
        raise WeightLoadError(f"weight folder {folder} does not exist")
    if folder.is_file():
        if folder.suffix == ".safetensors":
            return [folder]
        raise WeightLoadError(f"{folder} is not a .safetensors file or a folder of them")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        for shard in shards:
            if not (folder / shard).is_file():
                raise WeightLoadError(f"{index} lists shard {shard}, which is missing from {folder}")
        return [folder / s for s in shards]
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    if shards:
        return shards
    raise WeightLoadError(
        f"no weights in {folder}: looked for model.safetensors, model.safetensors.index.json and "
        "model-XXXXX-of-YYYYY.safetensors; pass load_format='dummy' for random weights"
    )


def resolve_load_format(source: str | Path | None, load_format: str = "auto") -> str:
    """``auto`` -> ``gguf`` for a .gguf file (or a folder holding exactly one), else ``safetensors``."""
    if load_format not in LOAD_FORMATS:
        raise WeightLoadError(f"load_format {load_format!r} is not supported; use one of {', '.join(LOAD_FORMATS)}")
    if load_format != "auto":
        return load_format
    if source is None:
        raise WeightLoadError("no weight source given; pass a model folder or .gguf file, or load_format='dummy'")
    path = Path(source)
    if path.suffix == ".gguf":
        return "gguf"
    if path.is_dir() and len(list(path.glob("*.gguf"))) == 1 and not any(path.glob("*.safetensors")):
        return "gguf"
    safetensors_files(path)  # raises with what was looked for
    return "safetensors"


def _resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in SUPPORTED_DTYPES:
        raise WeightLoadError(f"dtype {name} is not supported; use one of {', '.join(SUPPORTED_DTYPES)}")
    return SUPPORTED_DTYPES[name]


# ---- loading ---------------------------------------------------------------------------------------------------
def load_weights(
    spec: ModelSpec,
    source: str | Path | None,
    *,
    load_format: str = "auto",
    dtype: torch.dtype | str = torch.bfloat16,
    device: str | torch.device = "cpu",
    seed: int = 0,
    tp_rank: int = 0,
    tp_size: int = 1,
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """NanoFlow-named tensors of ``spec`` (this rank's shards) in ``dtype`` on ``device``.

    ``source`` is a HF folder (safetensors), a ``.gguf`` file, or ignored for ``load_format="dummy"``. Raises
    WeightLoadError for a missing file, tensor or unexpected extra tensor, a shape mismatch or an unsupported dtype.
    """
    torch_dtype = _resolve_dtype(dtype)
    lay = shard_layout(spec, tp_rank, tp_size)
    fmt = resolve_load_format(source, load_format)
    if fmt == "dummy":
        return _dummy_weights(spec, lay, torch_dtype, torch.device(device), seed)
    if source is None:
        raise WeightLoadError(f"load_format={fmt!r} needs a weight source (a model folder or .gguf file); got None")
    with ExitStack() as stack:
        if fmt == "gguf":
            from nanoflow.models.gguf_loader import GGUFSource, find_gguf_file

            src: TensorSource = GGUFSource(find_gguf_file(Path(source)))
        else:
            src = SafetensorsSource(safetensors_files(Path(source)), stack)
        return load_from_source(spec, src, lay, dtype=torch_dtype, device=device, progress=progress)


def _check_names(spec: ModelSpec, targets: list[Target], names: set[str]) -> None:
    needed = {pc.hf_name: t.name for t in targets for pc in t.pieces}
    missing = [hf for hf in needed if hf not in names]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightLoadError(
            f"checkpoint has no tensor {missing[0]}{more}, needed for {needed[missing[0]]}; "
            f"does the checkpoint match the config ({spec.architecture}, {spec.num_layers} layers)?"
        )
    harmless = {"lm_head.weight"} if spec.tie_word_embeddings else set()
    extra = sorted(n for n in names - needed.keys() - harmless if not n.endswith(_HARMLESS_SUFFIXES))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise WeightLoadError(
            f"checkpoint has unexpected tensor {extra[0]}{more}; does the config match the checkpoint "
            f"({spec.architecture}, {spec.num_layers} layers, experts={spec.num_experts})?"
        )


def load_from_source(
    spec: ModelSpec,
    src: TensorSource,
    lay: ShardLayout,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> dict[str, torch.Tensor]:
    """Fill every target of the plan from ``src``: names and shapes are checked before any copy."""
    names = src.names()
    targets = _plan(spec, lay, names)
    _check_names(spec, targets, names)
    for t in targets:
        for pc in t.pieces:
            found = src.shape(pc.hf_name)
            if found != pc.full_shape:
                raise WeightLoadError(
                    f"tensor {pc.hf_name} has shape {list(found)}, expected {list(pc.full_shape)} for this config"
                )
    weights: dict[str, torch.Tensor] = {}
    for t in tqdm(targets, desc="Loading weights", unit="tensor", disable=not progress):
        # Vocab padding rows have no source piece and must read as zeros; every other row is overwritten.
        padded = t.name in _VOCAB_TENSORS and lay.padded_vocab_size != spec.vocab_size
        out = (torch.zeros if padded else torch.empty)(t.shape, dtype=dtype, device=device)
        for pc in t.pieces:
            part = src.read(pc.hf_name, pc.index)
            dest = out if pc.expert is None else out[pc.expert]
            inner = dest.shape[1:]
            n = part.numel() // math.prod(inner)
            dest.narrow(0, pc.row, n).copy_(part.reshape(n, *inner))
        weights[t.name] = out
    return weights


def _dummy_weights(
    spec: ModelSpec, lay: ShardLayout, dtype: torch.dtype, device: torch.device, seed: int
) -> dict[str, torch.Tensor]:
    """Random N(0, 0.02) matrices and unit norms, drawn on ``device`` in ``dtype`` (no host copy, no fp32 temp).

    Each tensor has its own generator seeded from (seed, rank, tensor index), so the result depends only on those.
    """
    weights: dict[str, torch.Tensor] = {}
    for k, t in enumerate(_plan(spec, lay)):
        out = torch.empty(t.shape, dtype=dtype, device=device)
        if t.name.endswith("norm.weight"):
            out.fill_(1.0)
        else:
            gen = torch.Generator(device=device)
            gen.manual_seed((seed * 1_000_003 + lay.tp_rank) * 100_003 + k)
            out.normal_(0.0, DUMMY_STD, generator=gen)
            if t.name in _VOCAB_TENSORS:
                real = max(0, min(lay.vocab_per_rank, spec.vocab_size - lay.vocab_start))
                out[real:].zero_()  # vocab padding rows, as real loading leaves them
        weights[t.name] = out
    return weights
