"""The OpenAI logprobs formats, from the engine's :class:`~nanoflow.engine.outputs.TokenLogprob` entries.

A token's entry goes out with the text it starts in (its ``text_offset``), so text the server holds back (a possible
stop string, half a UTF-8 character) holds back its tokens too, and a stop string's tokens never go out (nor do the
tokens after it). ``text_of`` names a token: its text, or ``token_id:<id>`` (vLLM's ``return_tokens_as_token_ids``,
and for a model without a tokenizer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import accumulate
from typing import Any

from nanoflow.engine.outputs import RequestOutput, TokenLogprob
from nanoflow.serve.protocol import ChatLogprobs, CompletionLogprobs, TokenLogprobEntry, TopLogprob

TextOf = Callable[[int], str]


def token_namer(tokenizer: Any, as_ids: bool) -> TextOf:
    """How the logprobs name token ids: decoded text (special tokens kept), or ``token_id:<id>``."""
    if tokenizer is None or as_ids:
        return lambda token_id: f"token_id:{token_id}"
    return lambda token_id: tokenizer.decode([token_id], skip_special_tokens=False)


def logprobs_due(last: RequestOutput | None, start: int, emitted: int, final: bool) -> list[TokenLogprob]:
    """``last``'s entries from token ``start`` on whose text starts inside the ``emitted`` characters sent; all of
    them once the request ``final``ly ended without a stop string (EOS and text-less tokens included)."""
    if last is None or last.logprobs is None:
        return []
    rest = last.logprobs[start:]
    if final:
        return list(rest)
    due = 0
    while due < len(rest) and rest[due].text_offset < emitted:
        due += 1
    return rest[:due]


def completion_logprobs(entries: Sequence[TokenLogprob], text_of: TextOf, shift: int = 0) -> CompletionLogprobs:
    """The legacy completions lists; ``shift`` moves the offsets past an echoed prompt."""
    return CompletionLogprobs(tokens=[text_of(e.token_id) for e in entries],
                              token_logprobs=[e.logprob for e in entries],
                              top_logprobs=[{text_of(i): lp for i, lp in e.top} for e in entries],
                              text_offset=[e.text_offset + shift for e in entries])


def chat_logprobs(entries: Sequence[TokenLogprob], text_of: TextOf) -> ChatLogprobs:
    def top(token_id: int, lp: float) -> TopLogprob:
        text = text_of(token_id)
        return TopLogprob(token=text, logprob=lp, bytes=list(text.encode("utf-8")))

    return ChatLogprobs(content=[TokenLogprobEntry(**top(e.token_id, e.logprob).model_dump(),
                                                   top_logprobs=[top(i, lp) for i, lp in e.top]) for e in entries])


def echoed_prompt_logprobs(prompt: Sequence[int], entries: Sequence[TokenLogprob | None] | None,
                           text_of: TextOf) -> CompletionLogprobs:
    """An echoed prompt's tokens in the completions lists (the first, which nothing predicts, without a logprob),
    offsets into the prompt's token texts."""
    entries = entries or [None] * len(prompt)
    texts = [text_of(t) for t in prompt]
    return CompletionLogprobs(tokens=texts, token_logprobs=[None if e is None else e.logprob for e in entries],
                              top_logprobs=[None if e is None else {text_of(i): lp for i, lp in e.top}
                                            for e in entries],
                              text_offset=list(accumulate((len(t) for t in texts[:-1]), initial=0)))
