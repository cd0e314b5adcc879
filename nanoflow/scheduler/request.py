"""What a request is on the CPU: its sampling options, its lifecycle status and its token bookkeeping.

A :class:`Request` is owned by the :class:`~nanoflow.scheduler.batcher.Scheduler`; the engine reads it but changes it
only through the scheduler (``add_request``, ``update``, ``abort``, ``finish_request``).

Token bookkeeping under asynchronous scheduling (paper §4.2.1): the scheduler forms iteration i+1 before the CPU knows
the tokens sampled by iteration i. A request therefore has three kinds of tokens, always in this order::

    prompt_token_ids | output_token_ids (known on the CPU) | num_pending (sampled by scheduled iterations, unknown)

``num_tokens`` counts all three; ``num_computed_tokens`` counts the leading tokens whose KV entries are written by
already-scheduled iterations, so ``num_computed_tokens <= num_tokens`` always holds.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ERROR = "error"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        """True for the four terminal states (a property, so ``status.is_finished`` without a call)."""
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        """The OpenAI-style reason ("stop", "length", "error", "abort"), None while the request is live."""
        return self.value if self in _FINISHED else None


_FINISHED = frozenset(
    {
        RequestStatus.FINISHED_STOPPED,
        RequestStatus.FINISHED_LENGTH,
        RequestStatus.FINISHED_ERROR,
        RequestStatus.FINISHED_ABORTED,
    }
)


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but max_tokens=True is a caller's mistake, not the number 1.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


MAX_LOGPROBS = 20  # alternatives per token, as OpenAI's top_logprobs and vLLM's default max_logprobs


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's tokens; every field is validated on construction.

    ``temperature == 0`` means greedy; ``top_k`` of 0 or -1 and ``top_p == 1`` switch those filters off. EOS tokens
    (the model's, unless ``ignore_eos``) and ``stop_token_ids`` end a request once it has ``min_tokens`` outputs;
    ``stop`` strings are matched by the engine on detokenized text (it calls ``Scheduler.finish_request``).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    conversation_id: str | None = None
    """Scope of KV reuse across rounds (engines with KV offload): a request finds and leaves its KV under this id."""
    presence_penalty: float = 0.0
    """OpenAI's: subtract this from the logit of every token already generated (in [-2, 2])."""
    frequency_penalty: float = 0.0
    """OpenAI's: subtract this times the token's count in the output so far (in [-2, 2])."""
    repetition_penalty: float = 1.0
    """HF / vLLM: divide a positive logit (multiply a negative one) by this for tokens in the prompt or output;
    1 = off, > 1 discourages repeats (in (0, 10])."""
    logit_bias: dict[int, float] | None = None
    """OpenAI's: add ``bias`` to token ``id``'s logit before sampling (-100 bans a token, 100 all but forces it)."""
    prompt_logprobs: int | None = None
    """Also return each prompt token's logprob (given the tokens before it; the first token has none) and this many
    alternatives (as vLLM's ``prompt_logprobs``). None = off."""
    logprobs: int | None = None
    """Return each generated token's log-probability and the ``logprobs`` most likely tokens' (0 = only the chosen
    token's; at most :data:`MAX_LOGPROBS`), from the model's distribution before temperature and top-k/top-p, as
    vLLM does by default. None = off."""

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not _is_number(self.temperature) or not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature must be a number in [0, 100] (0 = greedy), got {self.temperature!r}")
        if not _is_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be a number in (0, 1], got {self.top_p!r}")
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 = off), got {self.top_k!r}")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            # ValueError, not TypeError: every bad field of SamplingParams raises the same kind for callers.
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")  # noqa: TRY004
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(
                f"min_tokens must be an integer in [0, max_tokens={self.max_tokens}], got {self.min_tokens!r}"
            )
        if self.conversation_id is not None and (not isinstance(self.conversation_id, str)
                                                 or not 0 < len(self.conversation_id) <= 256):
            raise ValueError(f"conversation_id must be a string of 1-256 characters or None, got "
                             f"{self.conversation_id!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise ValueError(f"{name} must be a number in [-2, 2] (0 = off), got {value!r}")
            object.__setattr__(self, name, float(value))
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 10.0:
            raise ValueError(f"repetition_penalty must be a number in (0, 10] (1 = off), got "
                             f"{self.repetition_penalty!r}")
        object.__setattr__(self, "repetition_penalty", float(self.repetition_penalty))
        bias = self.logit_bias
        if bias is not None:
            if not isinstance(bias, dict) or not all(_is_int(k) and k >= 0 and _is_number(v) and -100.0 <= v <= 100.0
                                                     for k, v in bias.items()):
                raise ValueError(f"logit_bias must map token ids >= 0 to numbers in [-100, 100], got {bias!r}")
            object.__setattr__(self, "logit_bias", {int(k): float(v) for k, v in bias.items()} or None)
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or not 0 <= value <= MAX_LOGPROBS):
                raise ValueError(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {value!r}")
        # frozen: normalise through object.__setattr__ (copies, so a caller's list cannot change us later).
        object.__setattr__(self, "temperature", float(self.temperature))
        object.__setattr__(self, "top_p", float(self.top_p))
        stop = self.stop
        if isinstance(stop, str):
            stop = [stop]
        if stop is not None:
            if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
                raise ValueError(f"stop must be a non-empty string or a list of non-empty strings, got {stop!r}")
            object.__setattr__(self, "stop", list(stop))
        ids = self.stop_token_ids
        if ids is not None:
            if not isinstance(ids, (list, tuple)) or not all(_is_int(t) and t >= 0 for t in ids):
                raise ValueError(f"stop_token_ids must be a list of integers >= 0, got {ids!r}")
            object.__setattr__(self, "stop_token_ids", list(ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        """Some penalty counts the tokens so far (presence, frequency, repetition)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def adjusts_logits(self) -> bool:
        """The sampler changes this request's logits (a penalty or a logit bias)."""
        return self.penalized or bool(self.logit_bias)

    @property
    def has_extras(self) -> bool:
        """The step that samples this request does more than sample: logprobs, prompt logprobs or logit changes."""
        return self.logprobs is not None or self.prompt_logprobs is not None or self.adjusts_logits


@dataclass(eq=False, slots=True)
class Request:
    """One generation request and its scheduler-owned state (identity equality: two requests are never equal).

    Invariants: ``0 <= num_computed_tokens <= num_tokens``; ``num_pending >= 0``; ``block_ids`` covers at least
    ``num_computed_tokens`` token slots while the request is RUNNING and is empty once it is finished or preempted.
    """

    request_id: str
    prompt_token_ids: Sequence[int]  # stored as a tuple (see __post_init__)
    sampling_params: SamplingParams = field(default_factory=SamplingParams)
    arrival_time: float = 0.0
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_pending: int = 0
    block_ids: list[int] = field(default_factory=list)
    status: RequestStatus = RequestStatus.WAITING
    error: str | None = None
    num_preemptions: int = 0
    # Scheduler-private bookkeeping (underscored, not part of the public API):
    # _prefill_len: tokens this admission must prefill (prompt, plus known outputs when recomputing after preemption);
    # _last_iter: index of the last iteration this request was scheduled in (-1: never).
    _prefill_len: int = field(default=0, init=False, repr=False)
    _last_iter: int = field(default=-1, init=False, repr=False)
    _stop_ids: frozenset[int] = field(default=frozenset(), init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.request_id, str):
            raise TypeError(f"request_id must be a str, got {type(self.request_id).__name__}")
        if not isinstance(self.sampling_params, SamplingParams):
            raise TypeError(f"sampling_params must be a SamplingParams, got {type(self.sampling_params).__name__}")
        # A tuple of ints, which Python's cyclic GC stops tracking: its full passes then skip every waiting or running
        # prompt instead of walking each token (scripts/gc_probe.py); a list would be walked at every pass.
        self.prompt_token_ids = tuple(self.prompt_token_ids)
        self.eos_token_ids = tuple(int(t) for t in self.eos_token_ids)
        sp = self.sampling_params
        eos = () if sp.ignore_eos else self.eos_token_ids
        # EOS and stop ids are checked once per sampled token: a frozenset keeps that O(1).
        self._stop_ids = frozenset((*eos, *(sp.stop_token_ids or ())))

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Known output tokens (pending ones excluded)."""
        return len(self.output_token_ids)

    @property
    def num_generated(self) -> int:
        """Output tokens sampled so far, known or pending: what max_tokens limits."""
        return len(self.output_token_ids) + self.num_pending

    @property
    def num_tokens(self) -> int:
        """Prompt + known outputs + pending outputs."""
        return len(self.prompt_token_ids) + len(self.output_token_ids) + self.num_pending

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt + known outputs (a new list; also the prompt recomputed after a preemption)."""
        return [*self.prompt_token_ids, *self.output_token_ids]

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.finish_reason

    def token_slice(self, start: int, end: int) -> list[int]:
        """Known tokens at positions ``[start, end)`` of prompt + outputs (O(end - start))."""
        n_prompt = len(self.prompt_token_ids)
        if end <= n_prompt:
            return list(self.prompt_token_ids[start:end])
        if start >= n_prompt:
            return self.output_token_ids[start - n_prompt : end - n_prompt]
        return [*self.prompt_token_ids[start:], *self.output_token_ids[: end - n_prompt]]

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
            f"outputs={len(self.output_token_ids)}, pending={self.num_pending}, computed={self.num_computed_tokens}, "
            f"blocks={len(self.block_ids)})"
        )


__all__ = ["Request", "RequestStatus", "SamplingParams"]
