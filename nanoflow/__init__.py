"""NanoFlow: a throughput-first LLM serving engine (nano-batching and intra-device overlap, OSDI'25)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "__version__"]

if TYPE_CHECKING:
    from nanoflow.engine.llm import LLM
    from nanoflow.scheduler.request import SamplingParams


def __getattr__(name: str) -> Any:
    # Lazy: `import nanoflow` stays cheap (no torch import) for the CLI's --help and the scheduler tests.
    if name == "LLM":
        from nanoflow.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from nanoflow.scheduler.request import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'nanoflow' has no attribute {name!r}")
