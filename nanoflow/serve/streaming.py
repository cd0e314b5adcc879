"""Turning the engine's cumulative text snapshots into OpenAI text deltas, with stop strings cut out.

The engine yields *cumulative* ``RequestOutput.text``. The server must (a) send each character once, (b) never send
a stop string nor anything after it (OpenAI semantics), whether or not the engine already trimmed it, and (c) never
send a character it may have to take back: a tail that could still grow into a stop string, or a trailing U+FFFD
that is only an incomplete UTF-8 sequence, is held back until the next snapshot or the end.

Invariant: concatenating all deltas gives ``emitted``, the final visible text, which is also what a non-streaming
request returns (both paths use this class); ``emitted`` never shrinks.
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from pydantic import BaseModel

REPLACEMENT_CHAR = "\ufffd"


class TextDelta(NamedTuple):
    text: str
    stopped: bool  # a stop string matched: the request is complete (finish_reason "stop") whatever the engine says


class IncrementalText:
    """Per-request delta computer; feed it every cumulative snapshot via :meth:`update`."""

    def __init__(self, stop: list[str] | None) -> None:
        self._stop = tuple(stop or ())
        self._longest = max((len(s) for s in self._stop), default=0)
        self.emitted = ""
        self.stopped = False

    def update(self, text: str, finished: bool) -> TextDelta:
        """The new text to send for snapshot ``text``; ``finished`` releases everything held back."""
        if self.stopped:
            return TextDelta("", True)
        # Only a match that overlaps unsent text is new; earlier text was checked when it was held back.
        start = max(0, len(self.emitted) - self._longest + 1)
        cut = min((i for i in (text.find(s, start) for s in self._stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return self._emit(text[:cut], stopped=True)
        if finished:
            return self._emit(text, stopped=False)
        end = len(text) - self._held_tail(text)
        while end > len(self.emitted) and text[end - 1] == REPLACEMENT_CHAR:
            end -= 1
        return self._emit(text[:end], stopped=False)

    def _held_tail(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of some stop string."""
        for k in range(min(self._longest - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in self._stop):
                return k
        return 0

    def _emit(self, visible: str, stopped: bool) -> TextDelta:
        # Continue from the sent character count. If the engine ever revised text it had already shown (a
        # detokenization fix-up), what was sent cannot be taken back; counting characters keeps the stream going.
        delta = visible[len(self.emitted) :]
        self.emitted += delta
        return TextDelta(delta, stopped)


def sse_event(payload: BaseModel | dict[str, Any]) -> str:
    """One Server-Sent Events ``data:`` frame holding JSON (``None`` fields kept: OpenAI sends ``"usage": null``)."""
    data = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"
