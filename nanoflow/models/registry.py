"""Hugging Face architecture name -> model class, imported lazily.

Built-in models are listed as ``"module:Class"`` strings so that importing the registry imports no model code. A
user registers an outside model with :func:`register_model` (see docs/adding-a-model.md).
"""

from __future__ import annotations

import importlib

from nanoflow.models.base import DecoderModel

_BUILTIN: dict[str, str] = {
    "LlamaForCausalLM": "nanoflow.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "nanoflow.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "nanoflow.models.qwen2:Qwen2ForCausalLM",
    "MixtralForCausalLM": "nanoflow.models.mixtral:MixtralForCausalLM",
}


class ModelRegistry:
    """A table of architectures; the package keeps one instance, :data:`REGISTRY`."""

    def __init__(self, entries: dict[str, str | type[DecoderModel]]):
        self._entries: dict[str, str | type[DecoderModel]] = dict(entries)

    def register(self, architecture: str, model_cls: str | type[DecoderModel]) -> None:
        if isinstance(model_cls, type) and not issubclass(model_cls, DecoderModel):
            raise TypeError(f"{model_cls.__name__} must subclass nanoflow.models.base.DecoderModel")
        self._entries[architecture] = model_cls

    def names(self) -> list[str]:
        return sorted(self._entries)

    def resolve(self, architecture: str) -> type[DecoderModel]:
        entry = self._entries.get(architecture)
        if entry is None:
            raise ValueError(f"unsupported architecture {architecture!r}; supported: {', '.join(self.names())}")
        if isinstance(entry, str):
            module, _, name = entry.partition(":")
            entry = getattr(importlib.import_module(module), name)
            self._entries[architecture] = entry
        return entry


REGISTRY = ModelRegistry(_BUILTIN)


def register_model(architecture: str, model_cls: str | type[DecoderModel]) -> None:
    """Make ``architecture`` (the ``architectures[0]`` of a config.json) load with ``model_cls``."""
    REGISTRY.register(architecture, model_cls)


def registered_architectures() -> list[str]:
    return REGISTRY.names()


def model_class(architecture: str) -> type[DecoderModel]:
    return REGISTRY.resolve(architecture)
