"""Pydantic models of the OpenAI-compatible wire format (``/v1/completions``, ``/v1/chat/completions``, errors).

Requests are validated in *strict* mode (``"5"`` is not an integer, ``true`` is not a number) and with non-finite
floats rejected, so a wrong type is a 400 naming the field instead of a silent coercion. Unknown fields are ignored,
as OpenAI clients send options this server does not know; options it knows but cannot honour (``n`` above
:data:`MAX_CHOICES`, ``suffix``, ``best_of``, tools) are rejected with a message saying what to change, never
silently dropped.

Invariant: a validated request maps one-to-one onto :class:`~nanoflow.scheduler.request.SamplingParams` via
:meth:`_SamplingFields.sampling_kwargs` (``max_tokens`` is resolved by the server against the context length).
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from nanoflow.scheduler.request import MAX_LOGPROBS

MAX_STOP_SEQUENCES = 16
MAX_CHOICES = 16  # n: each choice is one engine request
MAX_PROMPTS = 256  # prompts (times n) in one completions request: lm-eval and batch clients send lists


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, allow_inf_nan=False, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class _SamplingFields(_Request):
    """Fields shared by completion and chat requests."""

    model: str | None = Field(None, description="Served model name; None means the only model served.")
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1, description="Extension: keep the k most likely tokens; 0 or -1 disables.")
    n: int = Field(1, ge=1)
    seed: int | None = None
    stop: Any = Field(None, description="A string or up to 16 strings; generation ends before the first match.")
    stop_token_ids: list[int] | None = Field(None, description="Extension: token ids that end generation.")
    ignore_eos: bool = Field(False, description="Extension: keep generating past the end-of-sequence token.")
    min_tokens: int = Field(0, ge=0, description="Extension (vLLM's): EOS and stop_token_ids end the answer only "
                                                  "after this many tokens.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0,
                                      description="Extension (vLLM's): > 1 discourages prompt and output tokens.")
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    return_tokens_as_token_ids: bool = Field(False, description="Extension (vLLM's): logprobs name tokens as "
                                                                 "'token_id:<id>' instead of their text.")
    conversation_id: str | None = Field(None, min_length=1, max_length=256,
                                        description="Extension: with `serve --kv-offload`, requests of one "
                                                    "conversation reuse the KV of its earlier rounds.")

    @field_validator("n")
    @classmethod
    def _choices(cls, n: int) -> int:
        if n > MAX_CHOICES:
            raise ValueError(f"n={n}: at most {MAX_CHOICES} choices per request; send several requests for more")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: Any) -> list[str] | None:
        if stop is None:
            return None
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
            raise ValueError("stop must be a non-empty string or a list of non-empty strings")
        if len(stops) > MAX_STOP_SEQUENCES:
            raise ValueError(f"stop has {len(stops)} sequences; at most {MAX_STOP_SEQUENCES} are allowed")
        return stops or None

    @field_validator("stop_token_ids")
    @classmethod
    def _non_negative_ids(cls, ids: list[int] | None) -> list[int] | None:
        if ids is not None and any(t < 0 for t in ids):
            raise ValueError("stop_token_ids must be integers >= 0")
        return ids

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for key, bias in (value or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias keys are token ids (strings of digits), got {key!r}")
            if not -100.0 <= bias <= 100.0:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {key}")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``SamplingParams`` except ``max_tokens`` (which depends on the prompt length)."""
        return {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
            "conversation_id": self.conversation_id,
            "logprobs": self.num_logprobs,
            "prompt_logprobs": self.num_prompt_logprobs,
            "logit_bias": {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
        }

    @property
    def num_logprobs(self) -> int | None:  # the request classes say how they ask for logprobs
        return None

    @property
    def num_prompt_logprobs(self) -> int | None:
        return None


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``: one prompt, given as text or as token ids."""

    prompt: Any = Field(..., description="A string, a list of token ids, or a list holding exactly one string.")
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS,
                                 description="Return each token's logprob and this many most likely alternatives.")
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _prompts(cls, prompt: Any) -> str | list[int] | list[str | list[int]]:
        """One prompt (a string, token ids, or a list holding one string) or a batch (a list of strings or of
        token-id lists, at most MAX_PROMPTS), as OpenAI's API takes them."""
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return _one_prompt(prompt, "prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            return _one_prompt(prompt, "prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
            if len(prompt) > MAX_PROMPTS:
                raise ValueError(f"prompt holds {len(prompt)} prompts; at most {MAX_PROMPTS} per request")
            return [_one_prompt(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
        raise ValueError("prompt must be a non-empty string, a non-empty list of token ids, or a list of those")

    @model_validator(mode="after")
    def _choice_budget(self) -> CompletionRequest:
        if len(self.prompts) * self.n > MAX_PROMPTS:
            raise ValueError(f"{len(self.prompts)} prompts x n={self.n} choices: at most {MAX_PROMPTS} choices per "
                             "request; send several requests")
        return self

    @property
    def prompts(self) -> list[str | list[int]]:
        """Every prompt of the request (one for a single prompt)."""
        one = isinstance(self.prompt, str) or (bool(self.prompt) and isinstance(self.prompt[0], int))
        return [self.prompt] if one else list(self.prompt)

    @field_validator("suffix", "best_of")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        # best_of=1 is the default behaviour; any other set option would silently change the result.
        allowed = value in (None, 1) if info.field_name == "best_of" else not value
        if not allowed:
            raise ValueError(f"{info.field_name} is not supported by this server; omit the field")
        return value

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    @property
    def num_prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None


def _one_prompt(prompt: Any, name: str) -> str | list[int]:
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError(f"{name} must not be empty")
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        if any(t < 0 for t in prompt):
            raise ValueError(f"{name}: token ids must be >= 0")
        return prompt
    raise ValueError(f"{name} must be a non-empty string or a non-empty list of token ids")


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = Field(..., description="A string or a list of {'type': 'text', 'text': ...} parts.")
    name: str | None = None

    @field_validator("content")
    @classmethod
    def _text_content(cls, content: Any) -> str:
        if isinstance(content, str):
            return content
        if isinstance(content, list) and content:
            try:
                return "".join(TextPart.model_validate(part).text for part in content)
            except ValidationError:
                pass
        raise ValueError("content must be a string or a non-empty list of {'type': 'text', 'text': str} parts")


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``; the prompt is the tokenizer's chat template applied to ``messages``."""

    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None

    @field_validator("tools")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value:
            raise ValueError(f"{info.field_name} is not supported by this server; omit the field")
        return value

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": m.role, "content": m.content} for m in self.messages]


class TokenizeRequest(_Request):
    """``POST /tokenize`` (vLLM's): a ``prompt`` text, or chat ``messages`` formatted by the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt (a string) or messages (a chat)")
        return self


class DetokenizeRequest(_Request):
    """``POST /detokenize`` (vLLM's)."""

    model: str | None = None
    tokens: list[int] = Field(..., description="token ids to turn back into text")


# ---- responses -------------------------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )


class CompletionLogprobs(BaseModel):
    """The legacy completions format: parallel lists, one entry per token."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)  # None: an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobEntry(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprobEntry]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: dict[str, str]  # {"role": "assistant", "content": ""} first, then {"content": ...}, {} with the finish
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nanoflow"
    max_model_len: int
    vocab_size: int | None = None  # extension: lets clients draw valid random token-id prompts


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """OpenAI's error envelope: ``{"error": {"message", "type", "param", "code"}}``."""

    error: ErrorDetail


def param_of(loc: tuple[int | str, ...]) -> str:
    """``("messages", 0, "content")`` -> ``"messages[0].content"``, the field path OpenAI clients show."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
