"""OpenAI-compatible HTTP server (``nanoflow serve``); needs the ``serve`` extra (fastapi, uvicorn, prometheus-client).

``create_app(engine, ServerConfig(...))`` builds the FastAPI app; ``nanoflow.serve.cli`` runs it under uvicorn. Both
names are imported on first use, so ``nanoflow serve --help`` does not load FastAPI or torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from nanoflow.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'nanoflow.serve' has no attribute {name!r}")
