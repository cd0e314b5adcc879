"""What the engine hands back to callers: one :class:`RequestOutput` per request (cumulative, also when streamed)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple


class TokenLogprob(NamedTuple):
    """One generated token's log-probability (natural log, the model's distribution before temperature and
    top-k/top-p), its ``top`` alternatives as ``(token id, logprob)`` most likely first, and ``text_offset``: where
    its text starts in ``RequestOutput.text`` (a token whose text is still incomplete, e.g. half a UTF-8 character,
    shares the offset of the next)."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]
    text_offset: int


@dataclass
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def latency(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass
class RequestOutput:
    """State of one request. ``text`` and ``token_ids`` are cumulative; ``finish_reason`` is set once finished.

    finish_reason: ``"stop"`` (EOS, a stop token or a stop string), ``"length"`` (max_tokens or context end),
    ``"error"`` (the request could not be served; ``error`` says why) or ``"abort"`` (cancelled by the caller).
    """

    request_id: str
    prompt: str | None
    prompt_token_ids: Sequence[int]  # the engine's tuple (immutable; the cyclic GC does not walk it)
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    metrics: RequestMetrics | None = None
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids when SamplingParams.logprobs is set
    # One per prompt token when SamplingParams.prompt_logprobs is set (text_offset -1); None for the first token,
    # which nothing predicts, and until a token's prefill chunk has run.
    prompt_logprobs: list[TokenLogprob | None] | None = None
    stop_reason: str | None = None  # the stop string that ended the request (its text is cut before it)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
