"""One admitted generation request: engine stream -> OpenAI response (JSON or SSE), with cancellation.

Ownership: :func:`run_job` takes an :class:`Admission` slot. A non-streaming request gives it back when its response
is built; a streaming one hands it to the SSE generator, whose ``finally`` gives it back when the stream ends for any
reason (done, engine error, client disconnect, server shutdown). Every path that leaves the engine request
unfinished calls ``engine.abort`` so its KV blocks are freed; the abort is shielded from cancellation because a
client disconnect arrives as a cancellation of the very task that must clean up.

Engine outcomes: ``stop``/``length`` map to OpenAI's finish_reason. ``error`` is a 400 when it comes before the first
byte is sent (streaming requests wait for the first output before sending headers), otherwise an SSE error event;
``abort`` (server shutting down) is a 503 or an error event.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import Gauge

from nanoflow.engine.outputs import RequestOutput, TokenLogprob
from nanoflow.scheduler.request import SamplingParams
from nanoflow.serve.errors import APIError, invalid
from nanoflow.serve.logprobs import (
    chat_logprobs,
    completion_logprobs,
    echoed_prompt_logprobs,
    logprobs_due,
    token_namer,
)
from nanoflow.serve.metrics import ServerMetrics
from nanoflow.serve.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    Usage,
)
from nanoflow.serve.streaming import SSE_DONE, IncrementalText, sse_event

logger = logging.getLogger("nanoflow.serve")
T = TypeVar("T")
_SAMPLING_FIELDS = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop_token_ids", "stop", "ignore_eos",
                   "presence_penalty", "frequency_penalty", "repetition_penalty", "logprobs", "prompt_logprobs",
                   "logit_bias", "min_tokens")


class Admission:
    """At most ``limit`` generation requests at once; the next one is refused with 429 (never queued)."""

    def __init__(self, limit: int, gauge: Gauge) -> None:
        self.limit = limit
        self.active = 0
        self._gauge = gauge

    def acquire(self) -> _Slot:
        if self.active >= self.limit:
            raise APIError(
                429,
                f"server is at its limit of {self.limit} concurrent requests; retry shortly or start the server "
                "with a larger --max-concurrency",
                type="rate_limit_error",
                code="too_many_requests",
                headers={"Retry-After": "1"},
            )
        self.active += 1
        self._gauge.inc()
        return _Slot(self)


@dataclass
class _Slot:
    owner: Admission
    released: bool = False

    def release(self) -> None:
        if not self.released:  # idempotent: several cleanup paths may race to give the slot back
            self.released = True
            self.owner.active -= 1
            self.owner._gauge.dec()


@dataclass(frozen=True)
class GenerationJob:
    """Everything needed to run one request on the engine and format its answer.

    A request has one prompt or (completions) several, and ``n`` choices per prompt; each choice is one engine
    request. Choice ``i`` answers prompt ``i // n`` (OpenAI's order: a prompt's choices together)."""

    engine: Any
    kind: str  # "completion" | "chat"
    request_id: str
    prompts: list[list[int]]
    prompt_params: list[SamplingParams]  # per prompt (max_tokens is clamped to each prompt's room)
    stream: bool
    include_usage: bool
    model: str
    created: int = field(default_factory=lambda: int(time.time()))
    n: int = 1
    echo: bool = False  # completions: the answer starts with the prompt (and its logprobs, with logprobs)
    prompt_texts: list[str] = field(default_factory=list)  # with echo: each prompt's text
    tokens_as_ids: bool = False  # logprobs name tokens "token_id:<id>" (return_tokens_as_token_ids)

    @classmethod
    def build(
        cls, engine: Any, req: CompletionRequest | ChatCompletionRequest, prompts: list[list[int]], *, kind: str,
        prompt_param: str,
    ) -> GenerationJob:
        """Check each prompt against the context and resolve ``max_tokens``: 400s name ``prompt_param`` (with the
        prompt's index when there are several).

        ``max_tokens`` is clamped to the room left in the context (None means all of it), so a request asking for
        more than fits ends with finish_reason "length" instead of failing.
        """
        limit = engine.max_model_len
        asked = req.max_tokens if isinstance(req, CompletionRequest) else req.token_limit
        params = []
        for k, ids in enumerate(prompts):
            param = prompt_param if len(prompts) == 1 else f"{prompt_param}[{k}]"
            if not ids:
                raise invalid("the prompt is empty after tokenization", param)
            if len(ids) >= limit:
                what = "prompt" if prompt_param == "prompt" else f"{prompt_param} (with the chat template applied)"
                raise invalid(
                    f"{what} has {len(ids):,} tokens; this model's context is {limit:,} tokens and must leave room "
                    f"for at least one generated token; shorten the {param}",
                    param,
                    code="context_length_exceeded",
                )
            room = limit - len(ids)
            try:
                params.append(SamplingParams(max_tokens=room if asked is None else min(asked, room),
                                             **req.sampling_kwargs()))
            except ValueError as e:
                field_name = next((f for f in _SAMPLING_FIELDS if str(e).startswith(f)), None)
                raise invalid(str(e), field_name) from None
        prefix = "cmpl" if kind == "completion" else "chatcmpl"
        echo = bool(getattr(req, "echo", False))
        texts: list[str] = []
        if echo:
            tok = engine.tokenizer
            given = req.prompts if isinstance(req, CompletionRequest) else []
            texts = [p if isinstance(p, str) else ("" if tok is None else tok.decode(ids, skip_special_tokens=False))
                     for p, ids in zip(given, prompts)]
        return cls(engine, kind, f"{prefix}-{uuid.uuid4().hex}", [list(p) for p in prompts], params, req.stream,
                   req.include_usage, engine.model_name, n=req.n, echo=echo, prompt_texts=texts,
                   tokens_as_ids=req.return_tokens_as_token_ids)

    @property
    def params(self) -> SamplingParams:
        """The sampling every choice shares (all but ``max_tokens`` and ``seed``)."""
        return self.prompt_params[0]

    @property
    def num_choices(self) -> int:
        return len(self.prompts) * self.n

    def prompt_of(self, index: int) -> int:
        return index // self.n

    def engine_id(self, index: int) -> str:
        return self.request_id if self.num_choices == 1 else f"{self.request_id}-{index}"

    def choice_params(self, index: int) -> SamplingParams:
        """Choice ``index``'s sampling: its prompt's, and with a ``seed`` the prompt's j-th choice samples with
        ``seed + j`` (reproducible, and the choices differ); without one each engine request draws its own."""
        params, j = self.prompt_params[self.prompt_of(index)], index % self.n
        return params if j == 0 or params.seed is None else replace(params, seed=params.seed + j)

    def open(self, index: int = 0) -> AsyncIterator[RequestOutput]:
        return aiter(self.engine.generate(self.prompts[self.prompt_of(index)], self.choice_params(index),
                                          self.engine_id(index)))

    def usage(self, lasts: list[RequestOutput | None]) -> Usage:
        return Usage.of(sum(len(p) for p in self.prompts),
                        sum(len(last.token_ids) for last in lasts if last is not None))

    def finish_reason(self, last: RequestOutput | None, text: IncrementalText) -> str:
        """OpenAI's finish_reason, or an APIError for an engine error / abort / a stream that just ended."""
        if text.stopped:
            return "stop"
        reason = None if last is None else last.finish_reason
        if reason in ("stop", "length"):
            return reason
        raise _engine_failure(last)

    # ---- logprobs (formats in serve/logprobs.py)
    def format_logprobs(self, entries: list[TokenLogprob], index: int = 0) -> CompletionLogprobs | ChatLogprobs | None:
        if self.params.logprobs is None:
            return None
        text_of = token_namer(self.engine.tokenizer, self.tokens_as_ids)
        if self.kind == "chat":
            return chat_logprobs(entries, text_of)
        shift = len(self.prompt_texts[self.prompt_of(index)]) if self.echo else 0  # into echoed prompt + completion
        return completion_logprobs(entries, text_of, shift)

    def echo_logprobs(self, last: RequestOutput | None, index: int = 0) -> CompletionLogprobs | None:
        """``echo`` with ``logprobs``: the prompt's tokens (the first without a logprob), offsets into the prompt."""
        if self.params.logprobs is None:
            return None
        return echoed_prompt_logprobs(self.prompts[self.prompt_of(index)],
                                      last.prompt_logprobs if last is not None else None,
                                      token_namer(self.engine.tokenizer, self.tokens_as_ids))

    def text_chunk(self, text: str | None, finish: str | None = None,
                   logprobs: list[TokenLogprob] | None = None, index: int = 0,
                   echo_of: RequestOutput | None = None) -> str:
        """One SSE chunk; ``echo_of``: the chunk that echoes the prompt (with its logprobs)."""
        lp = self.echo_logprobs(echo_of, index) if echo_of is not None else (
            self.format_logprobs(logprobs, index) if logprobs else None)
        if self.kind == "chat":
            if finish:
                delta = {}
            else:
                delta = {"role": "assistant", "content": ""} if text is None else {"content": text}
            choice = ChatChunkChoice(index=index, delta=delta, finish_reason=finish, logprobs=lp)
            chunk: Any = ChatCompletionChunk(id=self.request_id, created=self.created, model=self.model,
                                             choices=[choice])
        else:
            chunk = CompletionResponse(id=self.request_id, created=self.created, model=self.model,
                                       choices=[CompletionChoice(index=index, text=text or "", finish_reason=finish,
                                                                 logprobs=lp)])
        return sse_event(chunk)

    def usage_chunk(self, lasts: list[RequestOutput | None]) -> str:
        cls: Any = ChatCompletionChunk if self.kind == "chat" else CompletionResponse
        return sse_event(cls(id=self.request_id, created=self.created, model=self.model, choices=[],
                             usage=self.usage(lasts)))

    def response(self, texts: list[IncrementalText], finishes: list[str],
                 lasts: list[RequestOutput | None]) -> JSONResponse:
        choices: list[Any] = []
        for i, (text, finish, last) in enumerate(zip(texts, finishes, lasts)):
            lp = self.format_logprobs(logprobs_due(last, 0, len(text.emitted), final=not _stopped(text, last)),
                                      i)
            if self.kind == "chat":
                choices.append(ChatChoice(index=i, message=AssistantMessage(content=text.emitted),
                                          finish_reason=finish, logprobs=lp))
                continue
            if self.echo:  # the prompt, then the completion, as one text and one list of tokens
                head = self.echo_logprobs(last, i)
                if head is not None and lp is not None:
                    lp = CompletionLogprobs(**{f: getattr(head, f) + getattr(lp, f)
                                               for f in CompletionLogprobs.model_fields})
                choices.append(CompletionChoice(index=i, text=self.prompt_texts[self.prompt_of(i)] + text.emitted,
                                                finish_reason=finish, logprobs=lp))
            else:
                choices.append(CompletionChoice(index=i, text=text.emitted, finish_reason=finish, logprobs=lp))
        cls: Any = ChatCompletionResponse if self.kind == "chat" else CompletionResponse
        body = cls(id=self.request_id, created=self.created, model=self.model, usage=self.usage(lasts),
                   choices=choices)
        return JSONResponse(body.model_dump())

    async def abort(self, index: int = 0) -> None:
        try:
            await self.engine.abort(self.engine_id(index))
        except Exception:  # the request may already be gone; a failed abort must not mask the real outcome
            logger.debug("abort of %s failed", self.engine_id(index), exc_info=True)


def _stopped(text: IncrementalText, last: RequestOutput | None) -> bool:
    """A stop string ended the request (found here or already cut out by the engine): tokens from it on are not
    part of the answer."""
    return text.stopped or (last is not None and last.stop_reason is not None)


def _engine_failure(last: RequestOutput | None) -> APIError:
    """The APIError for an engine outcome that is not a normal finish ("error", "abort", or none at all)."""
    reason = None if last is None else last.finish_reason
    if reason == "error":
        return invalid(f"the engine could not serve this request: {last.error}", code="engine_error")
    if reason == "abort":
        return APIError(503, "the request was aborted because the server is shutting down; retry",
                        type="server_error", code="aborted")
    return APIError(500, "the engine ended the request without a finish reason", type="server_error")


class _ClientGone(Exception):
    pass


async def run_job(request: Request, job: GenerationJob, admission: Admission, metrics: ServerMetrics) -> Response:
    """Admit ``job``, run it, answer; the slot is released when the answer (or the stream) is over."""
    endpoint = job.kind
    try:
        slot = admission.acquire()
    except APIError as e:
        metrics.requests.labels(endpoint, str(e.status)).inc()
        raise
    handed_over = False
    try:
        if job.stream:
            response = await _start_stream(request, job, slot, metrics)
            handed_over = isinstance(response, StreamingResponse)
        else:
            response = await _complete(request, job, metrics)
        metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response
    except APIError as e:
        metrics.requests.labels(endpoint, str(e.status)).inc()
        raise
    finally:
        if not handed_over:
            slot.release()


async def _complete(request: Request, job: GenerationJob, metrics: ServerMetrics) -> Response:
    texts = [IncrementalText(job.params.stop) for _ in range(job.num_choices)]
    lasts: list[RequestOutput | None] = [None] * job.num_choices

    async def collect(i: int) -> None:
        stream = job.open(i)
        try:
            async for out in stream:
                lasts[i] = out
                if texts[i].update(out.text, out.finished).stopped or out.finished:
                    break
        finally:
            await _close(stream)

    try:
        await _until_disconnect(request, asyncio.gather(*(collect(i) for i in range(job.num_choices))))
    except _ClientGone:
        metrics.aborted.inc()
        return Response(status_code=499)
    finally:
        for i, last in enumerate(lasts):
            if last is None or not last.finished:
                with anyio.CancelScope(shield=True):
                    await job.abort(i)
    reasons = [job.finish_reason(last, text) for last, text in zip(lasts, texts)]
    return job.response(texts, reasons, lasts)


async def _start_stream(request: Request, job: GenerationJob, slot: _Slot, metrics: ServerMetrics) -> Response:
    """Wait for every choice's first output (so an engine error can still be a 400), then stream the rest."""
    streams = [job.open(i) for i in range(job.num_choices)]
    try:
        firsts = await _until_disconnect(request, asyncio.gather(*(anext(s) for s in streams)))
    except StopAsyncIteration:
        await _cleanup_all(job, streams, None)
        raise APIError(500, "the engine produced no output for this request", type="server_error") from None
    except _ClientGone:
        metrics.aborted.inc()
        await _cleanup_all(job, streams, None)
        return Response(status_code=499)
    except BaseException:
        await _cleanup_all(job, streams, None)
        raise
    failed = next((f for f in firsts if f.finish_reason in ("error", "abort")), None)
    if failed is not None:
        await _cleanup_all(job, streams, list(firsts))
        raise _engine_failure(failed)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(_events(job, streams, list(firsts), slot, metrics), media_type="text/event-stream",
                             headers=headers)


async def _choice_chunks(job: GenerationJob, index: int, stream: AsyncIterator[RequestOutput],
                         lasts: list[RequestOutput | None]) -> AsyncIterator[str]:
    """One choice's SSE chunks, from its first output (``lasts[index]``) to its finish chunk; keeps ``lasts``."""
    text = IncrementalText(job.params.stop)
    if job.kind == "chat":
        yield job.text_chunk(None, index=index)  # the role chunk OpenAI sends first
    elif job.echo:  # the prompt first (its logprobs are complete once the first token is out)
        yield job.text_chunk(job.prompt_texts[job.prompt_of(index)], index=index, echo_of=lasts[index])
    out: RequestOutput | None = lasts[index]
    # While the output has tokens but no text (a model without a tokenizer), send an empty-text chunk per step that
    # produced tokens, so clients still see them arrive (time to first token, per-token pacing).
    sent_tokens = sent_logprobs = 0
    while out is not None:
        lasts[index] = out
        delta = text.update(out.text, out.finished)
        if delta.text:
            due = logprobs_due(out, sent_logprobs, len(text.emitted), final=False)
            sent_logprobs += len(due)
            yield job.text_chunk(delta.text, logprobs=due, index=index)
        elif not out.text and len(out.token_ids) > sent_tokens and not (delta.stopped or out.finished):
            yield job.text_chunk("", index=index)
        sent_tokens = len(out.token_ids)
        if delta.stopped or out.finished:
            break
        out = await anext(stream, None)
    last = lasts[index]
    reason = job.finish_reason(last, text)
    rest = logprobs_due(last, sent_logprobs, len(text.emitted), final=not _stopped(text, last))
    if rest:  # tokens without text of their own (EOS, an unfinished character) or of a model without text
        yield job.text_chunk("", logprobs=rest, index=index)
    yield job.text_chunk(None, finish=reason, index=index)


async def _merged(job: GenerationJob, streams: list[AsyncIterator[RequestOutput]],
                  lasts: list[RequestOutput | None]) -> AsyncIterator[str]:
    """Every choice's chunks as they come (n > 1); the first choice to fail ends the whole stream with its error."""
    if job.num_choices == 1:
        async for chunk in _choice_chunks(job, 0, streams[0], lasts):
            yield chunk
        return
    queue: asyncio.Queue[str | BaseException | None] = asyncio.Queue()

    async def pump(i: int) -> None:
        try:
            async for chunk in _choice_chunks(job, i, streams[i], lasts):
                await queue.put(chunk)
            await queue.put(None)
        except Exception as e:
            await queue.put(e)

    tasks = [asyncio.ensure_future(pump(i)) for i in range(job.num_choices)]
    try:
        done = 0
        while done < job.num_choices:
            item = await queue.get()
            if item is None:
                done += 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for t in tasks:
            t.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def _events(
    job: GenerationJob, streams: list[AsyncIterator[RequestOutput]], firsts: list[RequestOutput], slot: _Slot,
    metrics: ServerMetrics,
) -> AsyncIterator[str]:
    lasts: list[RequestOutput | None] = list(firsts)
    done = False
    try:
        try:
            async for chunk in _merged(job, streams, lasts):
                yield chunk
            if job.include_usage:
                yield job.usage_chunk(lasts)
        except APIError as e:
            yield sse_event({"error": e.detail.model_dump()})
        except Exception as e:
            logger.exception("stream %s failed", job.request_id)
            yield sse_event({"error": {"message": f"internal server error: {e}", "type": "server_error",
                                       "param": None, "code": None}})
        yield SSE_DONE
        done = True
    finally:
        if not done:
            metrics.aborted.inc()
        await _cleanup_all(job, streams, lasts)
        slot.release()


async def _cleanup_all(job: GenerationJob, streams: list[AsyncIterator[RequestOutput]],
                       lasts: list[RequestOutput | None] | None) -> None:
    """Abort every choice's engine request that has not finished, and close its stream."""
    with anyio.CancelScope(shield=True):
        for i, stream in enumerate(streams):
            last = None if lasts is None else lasts[i]
            if last is None or not last.finished:
                await job.abort(i)
            await _close(stream)


async def _close(stream: AsyncIterator[Any]) -> None:
    closer = getattr(stream, "aclose", None)
    if closer is not None:
        try:
            await closer()
        except Exception:
            logger.debug("closing an engine stream failed", exc_info=True)


async def _until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work`` unless the client disconnects first (then ``work`` is cancelled and _ClientGone raised)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            # Let the cancellation land before anyone closes the engine stream: closing an async generator that
            # is still inside __anext__ raises "already running".
            with anyio.CancelScope(shield=True):
                await asyncio.wait({task})
    if task in done:
        return task.result()
    raise _ClientGone


async def _disconnected(request: Request) -> None:
    # The body has been read in full, so the next ASGI message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
