"""A streaming front for :class:`Engine`, used by the HTTP server and the chat UI.

The engine loop runs in one background thread (it owns the model; nothing else touches it). Coroutines hand
requests and aborts to it through a thread-safe inbox and receive cumulative ``RequestOutput`` snapshots through
per-request asyncio queues, fed with ``loop.call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from nanoflow.config import EngineArgs
from nanoflow.engine.engine import Engine
from nanoflow.engine.outputs import RequestOutput
from nanoflow.scheduler.request import SamplingParams

log = logging.getLogger("nanoflow")


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.model_name = engine.model_name
        self.max_model_len = engine.max_model_len
        self.tokenizer = engine.tokenizer
        self.vocab_size = engine.spec.vocab_size
        self._inbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue[RequestOutput]]] = {}
        self._lock = threading.Lock()
        self._tok_window: list[tuple[float, int]] = []
        self._num_finished = 0
        self._generated = 0

    @classmethod
    def from_args(cls, args: EngineArgs) -> AsyncEngine:
        from nanoflow.engine.builder import create_engine

        return cls(create_engine(args))  # under tensor parallelism rank 0 serves; the others follow inside

    async def start(self) -> None:
        if self._stopping.is_set():
            raise RuntimeError("this AsyncEngine was shut down (its engine is closed); build a new one")
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="nanoflow-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        """Stop the engine loop, then close the engine, which joins its own background threads (the KV offload
        worker and its copy threads) while the interpreter is whole: a daemon thread still inside a torch copy at
        interpreter exit aborts the process ("terminate called without an active exception") after a clean
        shutdown. Idempotent; the engine cannot be started again."""
        first = not self._stopping.is_set()
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 30)
            if self._thread.is_alive():  # a step that never returns: closing under it would be unsafe
                log.warning("the engine loop did not stop within 30 s; leaving the engine open")
                return
            self._thread = None
        if first:
            stop = getattr(self.engine, "shutdown", None) or self.engine.close  # tensor parallel: also the followers
            await asyncio.to_thread(stop)

    # ---- requests --------------------------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        if self._thread is None:
            await self.start()
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        with self._lock:
            if request_id in self._queues:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._queues[request_id] = (asyncio.get_running_loop(), q)
        self._inbox.put(("add", (prompt, params, request_id)))
        self._wake.set()
        done = False
        try:
            while not done:
                out = await q.get()
                done = out.finished
                yield out
        finally:
            with self._lock:
                self._queues.pop(request_id, None)
            if not done:  # the caller went away (client disconnect): free the request's KV
                self._inbox.put(("abort", request_id))
                self._wake.set()

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))
        self._wake.set()

    def stats(self) -> dict[str, Any]:
        eng = self.engine
        now = time.monotonic()
        window = [(t, n) for t, n in self._tok_window if now - t < 10.0]
        span = (now - window[0][0]) if window else 0.0
        return {
            "num_running": eng.scheduler.num_running,
            "num_waiting": eng.scheduler.num_waiting,
            "kv_usage": eng.blocks.usage,
            "tokens_per_s": sum(n for _, n in window) / span if span > 0 else 0.0,
            "iteration_ms": eng.last_iteration_s * 1e3,
            "num_finished": self._num_finished,
            "generated_tokens": self._generated,
            **(eng.reuse_stats() if hasattr(eng, "reuse_stats") else {}),
        }

    # ---- the engine thread -----------------------------------------------------------------------------------
    def _deliver(self, out: RequestOutput) -> None:
        with self._lock:
            entry = self._queues.get(out.request_id)
        if out.finished:
            self._num_finished += 1
            self._generated += len(out.token_ids)
        if entry is None:
            return
        loop, q = entry
        snapshot = copy.copy(out)
        snapshot.token_ids = list(out.token_ids)
        try:
            loop.call_soon_threadsafe(q.put_nowait, snapshot)
        except RuntimeError:  # the caller's loop closed
            pass

    def _drain_inbox(self) -> None:
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                prompt, params, rid = payload
                try:
                    self.engine.add_request(prompt, params, rid, on_output=self._deliver)
                except Exception as exc:  # a bad request fails alone
                    self._deliver(RequestOutput(rid, None, [], finish_reason="error", error=str(exc)))
            elif kind == "abort":
                self.engine.abort(payload)

    def _loop(self) -> None:
        eng = self.engine
        while not self._stopping.is_set():
            self._drain_inbox()
            if not eng.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            before = eng.stats_tokens
            try:
                eng.step()
            except Exception:
                log.exception("engine step failed; aborting the running requests")
                for rid in list(eng._tracked):
                    eng.abort(rid)
            self._tok_window.append((time.monotonic(), eng.stats_tokens - before))
            if len(self._tok_window) > 2000:
                del self._tok_window[:1000]
        for rid in list(eng._tracked):
            eng.abort(rid)


def vocab_size_of(engine: Any) -> int | None:
    """The vocabulary size when the engine or its tokenizer reports one (not part of the engine contract)."""
    for owner in (engine, getattr(engine, "tokenizer", None)):
        value = getattr(owner, "vocab_size", None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None
