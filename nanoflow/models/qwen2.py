"""Qwen2: the LLaMA layer with a QKV bias (``layers.N.qkv.bias``) and, for small sizes, tied embeddings.

Both differences live in the weights and the ModelSpec (``attention_bias``, ``tie_word_embeddings``); the op graph is
LLaMA's, so this file only names the class.
"""

from __future__ import annotations

from nanoflow.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
