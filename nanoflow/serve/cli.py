"""``nanoflow serve``: load the engine, then run the OpenAI-compatible server under uvicorn until a signal.

Mounted by ``nanoflow/cli.py`` through :func:`add_parser` / :func:`run`; also runnable alone as
``python -m nanoflow.serve.cli``. Shutdown on SIGTERM or SIGINT is graceful: uvicorn stops accepting connections,
in-flight responses get ``--graceful-timeout`` seconds to finish, the engine then aborts what is left, and the
process exits 0.
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from collections.abc import Sequence
from typing import Any

from nanoflow.engine.flags import add_engine_args, engine_args, positive_int
from nanoflow.engine.kv_flags import add_kv_offload_args
from nanoflow.serve.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONCURRENCY, require_server_packages

DEFAULT_PORT = 8000


def port_number(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"port must be in 0..65535, got {value}")
    return value


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Engine options shared by ``serve`` and ``chat``: every engine flag of ``run-offline`` (engine/flags.py), and
    ``--kv-offload`` reuse across the rounds of a conversation."""
    add_engine_args(parser)
    add_kv_offload_args(parser, "the rounds of a conversation, scoped by the request's 'conversation_id' field "
                                "(requests without one share one scope)", host_gib=4.0)


def add_server_arguments(parser: argparse.ArgumentParser, default_port: int) -> None:
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on; use 0.0.0.0 to accept connections from other machines")
    parser.add_argument("--port", type=port_number, default=default_port, help="TCP port to listen on")
    parser.add_argument("--graceful-timeout", type=float, default=30.0,
                        help="seconds in-flight requests may run after SIGTERM/SIGINT before they are aborted")


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_engine_arguments(parser)
    add_server_arguments(parser, DEFAULT_PORT)
    parser.add_argument("--api-key", default=None,
                        help="require 'Authorization: Bearer <key>' on /v1/* (others get 401); /health and /metrics "
                             "stay open. Note that command-line arguments are visible to other local users")
    parser.add_argument("--max-concurrency", type=positive_int, default=DEFAULT_MAX_CONCURRENCY,
                        help="generation requests served at once (streams count until they end); more are answered "
                             "429 with Retry-After: 1 instead of being queued")
    parser.add_argument("--max-body-bytes", type=positive_int, default=DEFAULT_MAX_BODY_BYTES,
                        help="largest accepted request body in bytes; larger ones are answered 413")
    parser.add_argument("--served-model-name", action="append", default=[],
                        help="extra name accepted in the request's 'model' field (repeatable); the engine's own "
                             "model name is always accepted")
    parser.set_defaults(func=run)
    return parser


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``serve`` on an ``argparse`` subparsers object; returns the new parser. Raises ImportError when
    the ``serve`` extra is missing (the CLI then lists the command as unavailable)."""
    require_server_packages()
    parser = subparsers.add_parser(
        "serve",
        help="run the OpenAI-compatible HTTP server",
        description="Serve a model over an OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions "
                    "(streaming with SSE), /v1/models, /health and Prometheus /metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    return configure_parser(parser)


def build_engine(args: argparse.Namespace) -> Any:
    """The AsyncEngine for the parsed engine options (imported lazily: ``--help`` must not load torch)."""
    from nanoflow.engine.async_engine import AsyncEngine

    engine = AsyncEngine.from_args(engine_args(args))
    graphs = engine.engine.runner.graphs
    if graphs is not None:  # capture every token bucket before accepting traffic (first requests stay fast)
        print(f"capturing CUDA graphs for {len(graphs.sizes)} batch sizes ...", file=sys.stderr, flush=True)
        print(f"captured in {engine.engine.capture_all():.1f} s", file=sys.stderr, flush=True)  # every TP rank
    engine.engine.freeze_gc()
    return engine


def run(args: argparse.Namespace) -> int:
    """Run ``nanoflow serve`` with parsed arguments; returns the process exit code."""
    from nanoflow.serve.app import ServerConfig, create_app

    try:
        engine = build_engine(args)
    except (ValueError, FileNotFoundError) as e:  # ConfigError is a ValueError: a bad --model/--dtype/... value
        print(f"nanoflow serve: cannot load the model: {e}", file=sys.stderr)
        return 2
    config = ServerConfig(
        api_key=args.api_key,
        max_concurrency=args.max_concurrency,
        max_body_bytes=args.max_body_bytes,
        served_model_names=tuple(args.served_model_name) + ((args.model,) if args.model else ()),
    )
    app = create_app(engine, config)
    return serve_app(app, args.host, args.port, graceful_timeout=args.graceful_timeout,
                     log_level=uvicorn_log_level(args))


def uvicorn_log_level(args: argparse.Namespace) -> str:
    """uvicorn's level from the top-level ``--log-level`` (``nanoflow --log-level DEBUG serve``), default info."""
    level = str(getattr(args, "log_level", "info")).lower()
    return level if level in ("critical", "error", "warning", "info", "debug", "trace") else "info"


def serve_app(app: Any, host: str, port: int, *, graceful_timeout: float = 30.0, log_level: str = "info") -> int:
    """Run an ASGI app until SIGTERM/SIGINT; 0 after a graceful stop, 1 if it never started (e.g. port in use)."""
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, lifespan="on",
                            timeout_graceful_shutdown=graceful_timeout)
    server = uvicorn.Server(config)
    if threading.current_thread() is not threading.main_thread():
        server.run()
        return 0 if server.started else 1
    # After a graceful stop uvicorn re-raises the signal it caught into the handlers it found installed. With the
    # defaults that would kill the process with -SIGTERM (or raise KeyboardInterrupt) after a clean shutdown, so
    # install no-op handlers for it to find; the signal has already been handled by then.
    previous = {sig: signal.signal(sig, _after_shutdown) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if server.started else 1


def _after_shutdown(signum: int, frame: Any) -> None:
    """Signal handler that does nothing: see :func:`serve_app`."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nanoflow.serve.cli",
        description="Serve a model over an OpenAI-compatible HTTP API (same options as 'nanoflow serve').",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--log-level", default="info", help="log level (debug, info, warning, error)")
    configure_parser(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
