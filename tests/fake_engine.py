"""A tiny engine that follows the AsyncEngine contract exactly, for fast tests of the server's own logic.

Tokens are UTF-8 bytes (ids 0..255, EOS = 256), so multi-byte characters arrive split over several tokens and the
cumulative text passes through U+FFFD states, as with a real byte-level BPE tokenizer. The greedy reply to a prompt
is a fixed, prompt-dependent script (:func:`greedy_reply`), which gives tests an independent reference: the
expected output of ``max_tokens`` greedy tokens is ``greedy_reply(prompt)`` cut to that many bytes.

Like a real engine that detects stop strings one step late, the fake does *not* trim a matched stop string from its
text and it finishes with ``"stop"`` only after the step that completed the match: the server must trim.
"""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

from nanoflow.engine.outputs import RequestMetrics, RequestOutput

EOS = 256
FAIL_NOW = b"<fail-now>"  # a prompt holding this finishes with "error" before any token
FAIL_LATER = b"<fail-later>"  # ... with "error" on its third token, after two were streamed
_SAMPLED = b"abcdefghijklmnopqrstuvwxyz "  # sampled (temperature > 0) tokens: no markup, so pages render them as is
SCRIPT = "Hello there! Café ☕ is open. The quick brown fox jumps over the lazy dog. "


class ByteTokenizer:
    vocab_size = 257
    eos_token_id = EOS

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        text = "".join(f"<|{m['role']}|>{m['content']}<|end|>\n" for m in messages)
        return text + ("<|assistant|>" if add_generation_prompt else "")


def greedy_reply(prompt_ids: list[int]) -> bytes:
    """The fake's greedy continuation (without EOS): a tag unique to the prompt, then SCRIPT repeated."""
    tag = f"[{zlib.crc32(bytes(i % 256 for i in prompt_ids)):08x}] "
    return (tag + SCRIPT * 50).encode("utf-8")


class FakeEngine:
    """Contract-following stand-in for ``nanoflow.engine.async_engine.AsyncEngine``.

    ``token_delay``: seconds per generated token; ``eos_after``: emit EOS after this many tokens (None: never).
    ``aborted`` records request ids passed to :meth:`abort`; ``finished`` maps ids to their finish reason.
    """

    def __init__(self, max_model_len: int = 512, token_delay: float = 0.0, eos_after: int | None = None) -> None:
        self.model_name = "fake-model"
        self.max_model_len = max_model_len
        self.tokenizer = ByteTokenizer()
        self.token_delay = token_delay
        self.eos_after = eos_after
        self.started = False
        self.shut_down = False
        self.aborted: list[str] = []
        self.finished: dict[str, str] = {}
        self._live: set[str] = set()
        self._abort_flags: set[str] = set()
        self._generated = 0

    @classmethod
    def from_args(cls, args: Any) -> FakeEngine:
        return cls(max_model_len=args.max_model_len or 512)

    async def start(self) -> None:
        self.started = True

    async def shutdown(self) -> None:
        self.shut_down = True
        self._abort_flags |= self._live

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self._abort_flags.add(request_id)

    def stats(self) -> dict[str, float]:
        return {
            "num_running": len(self._live),
            "num_waiting": 0,
            "kv_usage": len(self._live) / 64,
            "tokens_per_s": 123.0,
            "iteration_ms": 4.5,
            "num_finished": len(self.finished),
            "generated_tokens": self._generated,
        }

    async def generate(self, prompt: str | list[int], params: Any, request_id: str) -> AsyncIterator[RequestOutput]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        out = RequestOutput(request_id, prompt if isinstance(prompt, str) else None, ids,
                            metrics=RequestMetrics(arrival_time=time.monotonic()))
        if len(ids) >= self.max_model_len:
            out.finish_reason, out.error = "error", f"prompt has {len(ids)} tokens; context is {self.max_model_len}"
            self.finished[request_id] = "error"
            yield out
            return
        if FAIL_NOW in bytes(i % 256 for i in ids):
            out.finish_reason, out.error = "error", "injected failure before the first token"
            self.finished[request_id] = "error"
            yield out
            return
        fail_later = FAIL_LATER in bytes(i % 256 for i in ids)
        rng = random.Random(params.seed)
        script = greedy_reply(ids)
        self._live.add(request_id)
        try:
            for step in range(params.max_tokens):
                await asyncio.sleep(self.token_delay)
                if request_id in self._abort_flags:
                    out.finish_reason = "abort"
                    break
                if self.eos_after is not None and step >= self.eos_after and not params.ignore_eos:
                    token = EOS
                elif params.temperature == 0:
                    token = script[step % len(script)]
                else:
                    token = rng.choice(_SAMPLED)
                out.token_ids = [*out.token_ids, token]
                out.text = self.tokenizer.decode(out.token_ids)
                self._generated += 1
                if fail_later and step == 2:
                    out.finish_reason, out.error = "error", "injected failure after two tokens"
                elif token == EOS or token in (params.stop_token_ids or ()):
                    out.finish_reason = "stop"
                elif params.stop and any(s in out.text for s in params.stop):
                    out.finish_reason = "stop"
                elif step + 1 == params.max_tokens or len(ids) + step + 1 >= self.max_model_len:
                    out.finish_reason = "length"
                yield _snapshot(out)
                if out.finished:
                    break
            if out.finish_reason == "abort":
                yield _snapshot(out)
        finally:
            self._live.discard(request_id)
            self._abort_flags.discard(request_id)
            self.finished[request_id] = out.finish_reason or "abort"


def _snapshot(out: RequestOutput) -> RequestOutput:
    # Consumers may keep earlier snapshots; never hand out an object that is mutated later.
    return RequestOutput(out.request_id, out.prompt, out.prompt_token_ids, out.text, list(out.token_ids),
                         out.finish_reason, out.error, out.metrics)
