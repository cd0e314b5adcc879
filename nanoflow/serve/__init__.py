"""OpenAI-compatible HTTP server (``nanoflow serve``); needs the ``serve`` extra (fastapi, uvicorn, prometheus-client).

``create_app(engine, ServerConfig(...))`` builds the FastAPI app; ``nanoflow.serve.cli`` runs it under uvicorn.
"""

from __future__ import annotations

from nanoflow.serve.app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
