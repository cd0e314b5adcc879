"""The OpenAI-compatible FastAPI app around one :class:`~nanoflow.engine.async_engine.AsyncEngine`.

Request flow: raw body (size-limited, 413) -> UTF-8 + JSON (400) -> pydantic model (400 naming the field) -> model
name (404) -> prompt token ids (400 when longer than the context) -> admission (429 past ``max_concurrency``) ->
``engine.generate`` -> :mod:`nanoflow.serve.generation` turns cumulative outputs into a response or an SSE stream.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models[/{id}]`` (Bearer key required
when one is configured), ``GET /health`` and ``GET /metrics`` (always open, for probes and Prometheus).

The lifespan starts the engine and, on shutdown (uvicorn stops accepting connections first and lets in-flight
responses finish within its graceful timeout), marks the server draining (new requests: 503) and shuts the engine
down, which aborts whatever is still running.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoflow.engine.async_engine import vocab_size_of
from nanoflow.serve.errors import APIError, from_validation_error, invalid
from nanoflow.serve.generation import Admission, GenerationJob, run_job
from nanoflow.serve.limits import DEFAULT_MAX_BODY_BYTES, DEFAULT_MAX_CONCURRENCY
from nanoflow.serve.metrics import ServerMetrics
from nanoflow.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
    param_of,
)

logger = logging.getLogger("nanoflow.serve")


M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class ServerConfig:
    """Server-side limits and identity; engine options live in ``EngineArgs``.

    ``max_concurrency``: generation requests admitted at once (each holds an engine slot until its response ends);
    one more is answered 429 with ``Retry-After`` rather than queued, so overload is visible to clients and the
    server's memory stays bounded. The engine itself still queues admitted requests it cannot batch yet.
    ``served_model_names``: names accepted in the ``model`` field besides ``engine.model_name``.
    """

    api_key: str | None = None
    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    served_model_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")


class _ServerState:
    def __init__(self, engine: Any, config: ServerConfig) -> None:
        self.engine = engine
        self.config = config
        self.metrics = ServerMetrics(engine.stats)
        self.admission = Admission(config.max_concurrency, self.metrics.in_flight)
        self.draining = False
        self.created = int(time.time())
        self.names = frozenset((engine.model_name, *config.served_model_names))

    def check_model(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            raise APIError(
                404,
                f"model {name!r} does not exist; this server serves {self.engine.model_name!r}",
                param="model",
                code="model_not_found",
            )


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it exceeds ``limit`` bytes (never buffered past that)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(
        413,
        f"request body has at least {size:,} bytes; this server accepts at most {limit:,} (--max-body-bytes)",
        code="request_too_large",
    )


def parse_body(body: bytes, model: type[M]) -> M:
    """Strict UTF-8, then JSON, then the pydantic model; each failure is a 400 saying where it broke."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise invalid(f"request body is not valid UTF-8 (byte {body[e.start]:#04x} at offset {e.start})",
                      code="invalid_encoding") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise invalid(f"request body is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}",
                      code="invalid_json") from None
    if not isinstance(data, dict):
        raise invalid(f"request body must be a JSON object, got {type(data).__name__}", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise from_validation_error(e) from None


def create_app(engine: Any, config: ServerConfig | None = None) -> FastAPI:
    """A FastAPI app serving ``engine`` (anything following the AsyncEngine contract); uvicorn runs it."""
    state = _ServerState(engine, config or ServerConfig())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            state.draining = True
            await engine.shutdown()

    app = FastAPI(title="NanoFlow", summary="OpenAI-compatible LLM server", lifespan=lifespan)
    app.state.nanoflow = state
    _install_error_handlers(app)

    async def require_key(request: Request) -> None:
        key = state.config.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(
                401,
                "missing or invalid API key; send the key given to --api-key as 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])

    @v1.get("/models", response_model=ModelList)
    async def list_models() -> ModelList:
        return ModelList(data=[_card(state)])

    @v1.get("/models/{model_id:path}", response_model=ModelCard)
    async def get_model(model_id: str) -> ModelCard:
        state.check_model(model_id)
        return _card(state)

    @v1.post("/completions", response_model=None)
    async def completions(request: Request) -> Response:
        req = await _open(request, state, CompletionRequest)
        tok = engine.tokenizer
        prompts = [list(p) if isinstance(p, list) else _encode(tok, p) for p in req.prompts]
        for ids in prompts:
            _check_token_ids(ids, engine)
        job = GenerationJob.build(engine, req, prompts, kind="completion", prompt_param="prompt")
        return await run_job(request, job, state.admission, state.metrics)

    @v1.post("/chat/completions", response_model=None)
    async def chat_completions(request: Request) -> Response:
        req = await _open(request, state, ChatCompletionRequest)
        try:
            text = engine.tokenizer.apply_chat_template(req.message_dicts(), add_generation_prompt=True)
        except Exception as e:  # a template may reject a conversation (e.g. roles out of order)
            raise invalid(f"messages cannot be formatted by this model's chat template: {e}", "messages") from None
        job = GenerationJob.build(engine, req, [engine.tokenizer.encode(text)], kind="chat", prompt_param="messages")
        return await run_job(request, job, state.admission, state.metrics)

    app.include_router(v1)

    # vLLM's tokenizer endpoints (lm-eval's remote tokenizer uses them, so a client needs no local tokenizer)
    tokenizer_routes = APIRouter(dependencies=[Depends(require_key)])

    def tokenizer() -> Any:
        if engine.tokenizer is None:
            raise invalid("this model has no tokenizer; send and read token ids", None)
        return engine.tokenizer

    @tokenizer_routes.get("/tokenizer_info")
    async def tokenizer_info() -> JSONResponse:
        backend = tokenizer().backend
        return JSONResponse({"tokenizer_class": type(backend).__name__, "eos_token": backend.eos_token,
                             "bos_token": backend.bos_token, "pad_token": backend.pad_token,
                             "chat_template": getattr(backend, "chat_template", None),
                             "model_max_length": engine.max_model_len})

    @tokenizer_routes.post("/tokenize")
    async def tokenize(request: Request) -> JSONResponse:
        req = parse_body(await read_body(request, state.config.max_body_bytes), TokenizeRequest)
        state.check_model(req.model)
        tok = tokenizer()
        if req.messages is not None:
            try:
                text = tok.apply_chat_template([{"role": m.role, "content": m.content} for m in req.messages],
                                               add_generation_prompt=req.add_generation_prompt)
            except Exception as e:
                raise invalid(f"messages cannot be formatted by this model's chat template: {e}", "messages") from None
        else:
            text = req.prompt or ""
        ids = tok.encode(text, add_special_tokens=req.add_special_tokens)
        return JSONResponse({"count": len(ids), "max_model_len": engine.max_model_len, "tokens": ids})

    @tokenizer_routes.post("/detokenize")
    async def detokenize(request: Request) -> JSONResponse:
        req = parse_body(await read_body(request, state.config.max_body_bytes), DetokenizeRequest)
        state.check_model(req.model)
        _check_token_ids(req.tokens, engine, "tokens")
        if any(t < 0 for t in req.tokens):
            raise invalid("token ids must be >= 0", "tokens")
        return JSONResponse({"prompt": tokenizer().decode(req.tokens, skip_special_tokens=False)})

    app.include_router(tokenizer_routes)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.draining:
            return JSONResponse({"status": "shutting down"}, 503)
        return JSONResponse({"status": "ok", "model": engine.model_name})

    @app.get("/metrics")
    async def metrics() -> Response:
        body, content_type = state.metrics.render()
        return Response(body, media_type=content_type)

    return app


async def _open(request: Request, state: _ServerState, model: type[M]) -> M:
    if state.draining:
        raise APIError(503, "server is shutting down; retry on another replica", type="server_error",
                       code="shutting_down")
    req = parse_body(await read_body(request, state.config.max_body_bytes), model)
    state.check_model(getattr(req, "model", None))
    return req


def _encode(tok: Any, text: str) -> list[int]:
    if tok is None:
        raise invalid("this model has no tokenizer; send the prompt as token ids", "prompt")
    return tok.encode(text)


def _check_token_ids(ids: list[int], engine: Any, param: str = "prompt") -> None:
    vocab = vocab_size_of(engine)
    if vocab is not None and ids and max(ids) >= vocab:
        raise invalid(f"{param} holds token id {max(ids)}, but this model's vocabulary has {vocab} ids", param)


def _card(state: _ServerState) -> ModelCard:
    return ModelCard(id=state.engine.model_name, created=state.created, max_model_len=state.engine.max_model_len,
                     vocab_size=vocab_size_of(state.engine))


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        loc = tuple(p for p in errors[0].get("loc", ()) if p not in ("body", "query", "path")) if errors else ()
        msg = errors[0].get("msg", "invalid request") if errors else "invalid request"
        param = param_of(loc) or None
        return invalid(f"{param}: {msg}" if param else msg, param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {exc.detail}"
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, message, code=code, headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, f"internal server error: {type(exc).__name__}: {exc}", type="server_error").response()
