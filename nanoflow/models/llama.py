"""LLaMA-2/3/3.1, Mistral (no sliding window) and DeepSeek-LLM: the reference decoder layer, nothing more."""

from __future__ import annotations

from nanoflow.graphs.nanoop import LayerGraph
from nanoflow.models.base import DecoderModel
from nanoflow.models.layers import llama_layer_graph


class LlamaForCausalLM(DecoderModel):
    def layer_graph(self, layer: int) -> LayerGraph:
        return llama_layer_graph(self.weights, layer, self.local_heads, self.local_kv_heads, self.spec.head_dim,
                                 self.spec.rms_norm_eps, tp=self.tp_size > 1)
