"""The server's admission defaults and its package check, importable without the server's heavy dependencies (the
CLI builds ``nanoflow serve --help`` from them without importing FastAPI or torch)."""

from __future__ import annotations

import importlib.util

DEFAULT_MAX_CONCURRENCY = 256  # generation requests served at once; more are answered 429
DEFAULT_MAX_BODY_BYTES = 1 << 20  # larger request bodies are answered 413
SERVER_PACKAGES = ("fastapi", "uvicorn", "prometheus_client")


def require_server_packages() -> None:
    """Raise ImportError naming the first missing package of the ``serve`` extra."""
    for name in SERVER_PACKAGES:
        if importlib.util.find_spec(name) is None:
            raise ImportError(f"No module named {name!r}; install the serve extra: pip install 'nanoflow[serve]'")
