"""Tokenizers: a small wrapper over transformers' AutoTokenizer, and an incremental detokenizer for streaming.

Sources: a HF folder (tokenizer.json, tokenizer.model (sentencepiece), vocab.json + merges.txt, tokenizer_config.json
with the chat template) or a GGUF file whose embedded tokenizer transformers rebuilds (converted once, then loaded
from a cache: :func:`_gguf_tokenizer`). A folder without tokenizer files (or a built-in short model name, which ships
only a config) gives ``None``: the engine then accepts token ids only. A tokenizer without a chat template uses
:data:`CHATML_TEMPLATE`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

# ChatML (``<|im_start|>role\ncontent<|im_end|>\n``), the fallback for tokenizers that ship no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")

log = logging.getLogger("nanoflow")


class TokenizerLoadError(ValueError):
    """A tokenizer source that exists but cannot be loaded; the message names the path and the cause."""


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template and special ids.

    ``eos_token_ids`` unites the tokenizer's EOS with ``generation_config.json``'s (LLaMA-3 lists several); a
    generation stops at any of them.
    """

    def __init__(self, backend: Any, *, extra_eos_token_ids: Iterable[int] = ()) -> None:
        self._backend = backend
        eos = {int(i) for i in extra_eos_token_ids}
        if backend.eos_token_id is not None:
            eos.add(int(backend.eos_token_id))
        self._eos = tuple(sorted(eos))

    @property
    def backend(self) -> Any:
        """The underlying transformers tokenizer (for anything this wrapper does not expose)."""
        return self._backend

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self._eos

    @property
    def bos_token_id(self) -> int | None:
        return self._backend.bos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce, added tokens included."""
        return len(self._backend)

    @property
    def has_chat_template(self) -> bool:
        """False when :meth:`apply_chat_template` falls back to ChatML."""
        return bool(getattr(self._backend, "chat_template", None))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self._backend.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt text for ``messages`` (``[{"role": ..., "content": ...}]``); encode it without special tokens
        when the template already writes BOS."""
        template = None if self.has_chat_template else CHATML_TEMPLATE
        return self._backend.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=add_generation_prompt, tokenize=False
        )


def _generation_eos(folder: Path) -> list[int]:
    path = folder / "generation_config.json"
    if not path.is_file():
        return []
    with open(path) as f:
        eos = json.load(f).get("eos_token_id")
    return [] if eos is None else (list(eos) if isinstance(eos, list) else [eos])


def load_tokenizer(source: str | Path | None) -> Tokenizer | None:
    """The tokenizer of a HF folder or GGUF file; None when there is none (no source, no tokenizer files, a
    built-in short name). Raises TokenizerLoadError for a missing path or tokenizer files that fail to load."""
    if source is None:
        return None
    path = Path(source)
    if not path.exists():
        from nanoflow.config import builtin_model_names

        if str(source) in builtin_model_names():
            return None
        raise TokenizerLoadError(f"tokenizer source {path} does not exist; pass a model folder or a .gguf file")
    if path.is_file() and path.name == "config.json":
        path = path.parent
    from transformers import AutoTokenizer

    try:
        if path.is_file():
            if path.suffix != ".gguf":
                raise TokenizerLoadError(f"{path} is neither a model folder nor a .gguf file")
            return Tokenizer(_gguf_tokenizer(path))
        if not any((path / name).is_file() for name in _TOKENIZER_FILES):
            ggufs = sorted(path.glob("*.gguf"))
            return load_tokenizer(ggufs[0]) if len(ggufs) == 1 else None
        backend = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as e:
        if isinstance(e, TokenizerLoadError):
            raise
        raise TokenizerLoadError(f"cannot load the tokenizer in {path}: {e}") from e
    return Tokenizer(backend, extra_eos_token_ids=_generation_eos(path))


def _gguf_tokenizer(path: Path) -> Any:
    """The transformers tokenizer embedded in a GGUF file.

    transformers rebuilds it from the metadata, which takes seconds (it parses the whole file and converts the
    vocabulary and merges). The result is saved once under ``cache_root()/tokenizers`` (keyed by the file's path,
    size, modification time and the transformers version) and loaded from there afterwards in a fraction of a
    second. A cache that cannot be written or read is skipped with a warning: the conversion is the reference."""
    from transformers import AutoTokenizer
    from transformers import __version__ as transformers_version

    from nanoflow.config import cache_root

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers_version}"
    folder = cache_root() / "tokenizers" / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    stale = False
    if (folder / "tokenizer.json").is_file():
        try:
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            log.warning("ignoring the cached tokenizer in %s (%s); converting %s again", folder, e, path.name)
            stale = True
    backend = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    staging = folder.parent / f".{folder.name}.{os.getpid()}.partial"
    try:
        backend.save_pretrained(str(staging))
        if stale:
            shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)  # atomic: readers see the whole folder or none
    except OSError as e:
        if not (folder / "tokenizer.json").is_file():  # else another process (a TP rank) cached it first
            log.warning("could not cache the tokenizer of %s in %s (%s); it is converted again next time",
                        path.name, folder, e)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return backend


class IncrementalDetokenizer:
    """Text deltas of a generation, token batch by token batch, for streaming and stop strings.

    Each :meth:`add` decodes only a short window: the tokens already emitted last time (context, so that
    sentencepiece's leading spaces and merged bytes come out right) plus the new ones, and returns the text past the
    context. A window whose text ends in U+FFFD is an unfinished multi-byte UTF-8 character (an emoji split over
    byte tokens): nothing is emitted until its remaining bytes arrive, and :meth:`flush` emits what is left at the
    end. Invariant: the concatenated deltas equal ``decode(prompt + generated)[len(decode(prompt)):]`` (for
    byte-level BPE tokenizers simply ``decode(generated)``).
    """

    PROMPT_CONTEXT = 5  # prompt tokens kept as decoding context for the first generated token

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], *, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids = [int(t) for t in list(prompt_ids)[-self.PROMPT_CONTEXT :]]
        self._prefix = 0  # start of the decoding window
        self._read = len(self._ids)  # tokens before this have been emitted
        self._text: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._text)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated ids; return the newly completed text (possibly empty)."""
        self._ids.extend(int(t) for t in token_ids)
        return self._emit(final=False)

    def flush(self) -> str:
        """Emit whatever is pending, incomplete characters included (call once the generation has ended)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        if self._read == len(self._ids):
            return ""
        context = self._tok.decode(self._ids[self._prefix : self._read], skip_special_tokens=self._skip)
        window = self._tok.decode(self._ids[self._prefix :], skip_special_tokens=self._skip)
        if not final and window.endswith("\ufffd"):
            return ""
        delta = window[len(context) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._text.append(delta)
        return delta
