"""Request datasets for the offline batch runner and the benchmarks.

`load_dataset(spec)` turns one spec string into a `DatasetResult`: a list of `DatasetItem`s (a prompt as text *or*
token ids, plus the output budget) and the rows it had to skip. The accepted specs are listed in `ACCEPTED_SPECS`.

* Files: JSONL / JSON array / parquet rows in the plain form (``{"prompt": ...}`` or ``{"prompt_token_ids": [...]}``,
  optional ``max_tokens`` or ``output_len``) or as a ShareGPT / LMSYS-Chat-1M conversation (the first user turn is
  the prompt; the length of the reply right after it is the output budget); or the Splitwise/Azure trace CSV
  (``ContextTokens``, ``GeneratedTokens``: lengths only, so prompts are random token ids). The file format comes
  from the extension and the first bytes; plain vs conversation is decided row by row.
* Synthetic: ``constant:IN:OUT``; ``splitwise`` / ``lmsys`` / ``sharegpt`` with the paper's Table 4 length
  statistics; ``multiround:NAME`` conversations whose every prompt extends the previous round's full context.
* ``sample``: about 200 hand-written prompts bundled with the package.

Synthetic lengths are lognormal: for a target mean m and standard deviation s, sigma^2 = ln(1 + s^2/m^2) and
mu = ln(m) - sigma^2/2 give exactly that mean and std; draws are rounded and clipped to >= 1 (which moves the
statistics by well under 1% for the Table 4 targets). Input and output lengths are drawn independently.
With a cap ``max_len`` (``sharegpt:max=4096``), pairs with input + output > max_len are redrawn, so the kept pairs
follow the distribution conditioned on fitting; this lowers the mean and std below the Table 4 values.

Invariants: a malformed row never raises, it is recorded in `DatasetResult.skipped`; a bad spec, a missing file or a
missing required argument raises `DatasetError`. Every random draw comes from one ``numpy.random.Generator`` seeded
with `seed` (lengths first, then token ids), so the same spec and seed always give the same items.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

DEFAULT_SYNTHETIC_REQUESTS = 256
WORDS_TO_TOKENS = 1.3  # rough tokens per whitespace word, used for reply lengths when no tokenizer is given

ACCEPTED_SPECS = """accepted dataset specs:
  PATH.jsonl                 one JSON object per line: {"prompt": "..."} or {"prompt_token_ids": [...]},
                             optional "max_tokens" (or "output_len"); ShareGPT / LMSYS conversation rows also work
  PATH.json                  JSON array of such rows (ShareGPT or LMSYS-Chat-1M dumps)
  PATH.parquet               LMSYS-Chat-1M parquet (needs `pip install pyarrow`)
  PATH.csv                   Splitwise/Azure trace with ContextTokens, GeneratedTokens (needs vocab_size)
  constant:IN:OUT            IN random prompt tokens, OUT output tokens per request (needs vocab_size)
  splitwise|lmsys|sharegpt   paper Table 4 length distributions, random token ids (needs vocab_size);
                             append :max=N to keep prompt + output <= N
  multiround:NAME[:max=N]    3-5 round conversations with NAME's lengths (needs vocab_size)
  sample                     the ~200 prompts bundled with nanoflow
(a file literally named like a synthetic spec must be written with a directory, e.g. ./sharegpt)"""


class DatasetError(ValueError):
    """A dataset spec, file or argument that cannot be used; the message says what to change."""


@dataclass(frozen=True)
class DatasetItem:
    """One request. Exactly one of `prompt` / `prompt_token_ids` is set; `max_tokens` is None when unknown.

    `conversation_id` and `round` tie together the rounds of a multi-round conversation: round r+1's prompt starts
    with round r's prompt followed by round r's answer.
    """

    prompt: str | None
    prompt_token_ids: list[int] | None
    max_tokens: int | None
    conversation_id: str | None = None
    round: int = 0

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.prompt_token_ids is None):
            raise DatasetError("a DatasetItem needs exactly one of prompt / prompt_token_ids")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise DatasetError(f"max_tokens must be >= 1 or None, got {self.max_tokens}")
        if self.round < 0:
            raise DatasetError(f"round must be >= 0, got {self.round}")


class SkippedRow(NamedTuple):
    """A row left out. `line` is the 1-based line number for JSONL and CSV files (a CSV header is line 1) and the
    0-based row index for JSON arrays and parquet files."""

    line: int
    reason: str


@dataclass(frozen=True)
class DatasetResult:
    """The loaded items in file (or generation) order, the skipped rows, and a description of the source."""

    items: list[DatasetItem]
    skipped: list[SkippedRow]
    source: str

    def __len__(self) -> int:
        return len(self.items)


class LengthDistribution(NamedTuple):
    """Mean and standard deviation of input and output lengths, in tokens."""

    input_mean: float
    input_std: float
    output_mean: float
    output_std: float


# Paper Table 4: "The average and standard deviation of input and output lengths in the sampled datasets."
TABLE4_DISTRIBUTIONS: dict[str, LengthDistribution] = {
    "splitwise": LengthDistribution(1155, 1109, 211, 163),
    "lmsys": LengthDistribution(102, 169, 222, 210),
    "sharegpt": LengthDistribution(246, 547, 322, 244),
}

_NAMES = "|".join(TABLE4_DISTRIBUTIONS)
_CONSTANT_RE = re.compile(r"constant:(\d+):(\d+)")
_DIST_RE = re.compile(rf"(multiround:)?({_NAMES})(?::max=(\d+))?")
_USER_ROLES = frozenset({"human", "user"})
_MODEL_ROLES = frozenset({"gpt", "assistant", "chatgpt", "bing", "bard", "model"})


def load_dataset(
    spec: str | os.PathLike[str],
    *,
    num_requests: int | None = None,
    seed: int = 0,
    vocab_size: int | None = None,
    tokenizer: object | None = None,
    max_len: int | None = None,
) -> DatasetResult:
    """Load the requests a spec names (see `ACCEPTED_SPECS`).

    num_requests: for files, keep the first N valid items (reading stops there); for synthetic specs, the number
    of items (default `DEFAULT_SYNTHETIC_REQUESTS`). vocab_size: required wherever random token ids are drawn,
    which are uniform over [0, vocab_size); for files it also bounds given prompt_token_ids. tokenizer: any object
    with ``encode(str) -> list[int]``; measures conversation replies (else words * 1.3) and lets `max_len` check
    text prompts. max_len: cap on prompt + output tokens; synthetic specs redraw pairs that exceed it, file rows
    whose known length exceeds it are skipped.
    """
    if num_requests is not None and (isinstance(num_requests, bool) or num_requests < 1):
        raise DatasetError(f"num_requests must be a positive integer or None, got {num_requests!r}")
    if tokenizer is not None and not callable(getattr(tokenizer, "encode", None)):
        raise DatasetError(f"tokenizer must have an encode(str) -> list[int] method; got {type(tokenizer).__name__}")
    if vocab_size is not None and vocab_size < 1:
        raise DatasetError(f"vocab_size must be >= 1, got {vocab_size}")
    text = os.fspath(spec)
    rng = np.random.default_rng(seed)
    if _CONSTANT_RE.fullmatch(text) or _DIST_RE.fullmatch(text):
        n = DEFAULT_SYNTHETIC_REQUESTS if num_requests is None else num_requests
        from nanoflow.data.synthetic import load_synthetic

        items = load_synthetic(text, n, rng, vocab_size, max_len)
        return DatasetResult(items, [], f"{text} (seed={seed}, n={n})")

    rows_ctx = _RowContext(vocab_size, tokenizer, max_len)
    if text == "sample":
        data = resources.files("nanoflow.data").joinpath("sample_prompts.jsonl").read_bytes()
        return _collect(_jsonl_rows(data.splitlines()), rows_ctx, num_requests, "sample (bundled prompts)")
    head = text.split(":", 1)[0]
    if head in ("constant", "multiround", *TABLE4_DISTRIBUTIONS) and not Path(text).exists():
        raise DatasetError(f"malformed synthetic spec {text!r}\n{ACCEPTED_SPECS}")
    path = Path(text).expanduser()
    if not path.is_file():
        raise DatasetError(f"no dataset file at {str(path)!r} and not a known spec\n{ACCEPTED_SPECS}")
    return _load_file(path, rows_ctx, num_requests, rng)


def summarize_lengths(items: Sequence[DatasetItem], tokenizer: object | None = None) -> dict[str, float | int | None]:
    """Mean and population std of prompt lengths and max_tokens over the items where they are known.

    A prompt's length is known when it is given as token ids, or when a tokenizer with ``encode`` is passed.
    Means/stds are None when no item has the value; the ``num_*`` counts say how many items entered each.
    """
    encode = getattr(tokenizer, "encode", None)
    prompt_lens = [
        len(item.prompt_token_ids) if item.prompt_token_ids is not None else len(encode(item.prompt))
        for item in items
        if item.prompt_token_ids is not None or encode is not None
    ]
    outs = [item.max_tokens for item in items if item.max_tokens is not None]
    summary: dict[str, float | int | None] = {"num_items": len(items)}
    for key, values in (("prompt_len", prompt_lens), ("max_tokens", outs)):
        array = np.asarray(values, dtype=np.float64)
        summary[f"num_{key}"] = len(values)
        summary[f"{key}_mean"] = float(array.mean()) if values else None
        summary[f"{key}_std"] = float(array.std()) if values else None
    return summary


# ----------------------------------------------------------------------------------------------- synthetic lengths


class _TokenSampler:
    """Uniform random token ids in [0, vocab). Lists share one pool of int objects, so a long trace costs about 8
    bytes per token instead of ~36 for fresh Python ints."""

    def __init__(self, rng: np.random.Generator, vocab_size: int) -> None:
        self._rng, self._vocab, self._pool = rng, vocab_size, list(range(vocab_size))

    def draw(self, n: int) -> list[int]:
        return list(map(self._pool.__getitem__, self._rng.integers(0, self._vocab, int(n)).tolist()))


def _need_vocab(vocab_size: int | None, spec: str) -> int:
    if vocab_size is None:
        raise DatasetError(f"{spec!r} draws random token ids; pass vocab_size= (the model's vocabulary size)")
    return vocab_size


class _RowError(Exception):
    """Why one row is skipped; caught per row, never escapes load_dataset."""


@dataclass(frozen=True)
class _RowContext:
    vocab_size: int | None
    tokenizer: Any
    max_len: int | None

    def count(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(text))
        return round(len(text.split()) * WORDS_TO_TOKENS)


def _positive_int(value: object, name: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # parquet/pandas dumps often store counts as floats
    if isinstance(value, bool) or not isinstance(value, int):
        raise _RowError(f"{name} must be an integer, got {type(value).__name__}")
    if value < 1:
        raise _RowError(f"{name} must be >= 1, got {value}")
    return value


def _plain_item(row: dict[str, Any], ctx: _RowContext) -> DatasetItem:
    prompt, ids = row.get("prompt"), row.get("prompt_token_ids")
    if prompt is not None and ids is not None:
        raise _RowError("row has both prompt and prompt_token_ids; give exactly one")
    max_tokens = _positive_int(row["max_tokens"] if "max_tokens" in row else row.get("output_len"), "max_tokens")
    if prompt is not None:
        if not isinstance(prompt, str):
            raise _RowError(f"prompt must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise _RowError("empty prompt")
        return DatasetItem(prompt, None, max_tokens)
    if ids is None:
        raise _RowError("row has none of prompt, prompt_token_ids, conversations, conversation")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise _RowError("prompt_token_ids must be a list of integers")
    if not ids:
        raise _RowError("empty prompt_token_ids")
    bad = [t for t in ids if t < 0 or (ctx.vocab_size is not None and t >= ctx.vocab_size)]
    if bad:
        raise _RowError(f"token id {bad[0]} is outside [0, vocab_size={ctx.vocab_size})")
    return DatasetItem(None, ids, max_tokens)


def _turn(turn: object) -> tuple[str | None, object]:
    if not isinstance(turn, dict):
        return None, None
    role = turn.get("from", turn.get("role"))
    return (role.lower() if isinstance(role, str) else None), turn.get("value", turn.get("content"))


def _conversation_item(row: dict[str, Any], ctx: _RowContext) -> DatasetItem:
    turns = row.get("conversations", row.get("conversation"))
    if not isinstance(turns, list):
        raise _RowError("conversation must be a list of turns")
    for i, turn in enumerate(turns):  # noqa: B007 - i is read after the loop
        role, text = _turn(turn)
        if role in _USER_ROLES and isinstance(text, str) and text.strip():
            break
    else:
        raise _RowError("conversation has no non-empty human/user turn")
    max_tokens = None
    if i + 1 < len(turns):
        reply_role, reply = _turn(turns[i + 1])
        if reply_role in _MODEL_ROLES and isinstance(reply, str) and reply.strip():
            max_tokens = max(1, ctx.count(reply))
    conv_id = row.get("conversation_id", row.get("id"))
    return DatasetItem(text, None, max_tokens, conv_id if isinstance(conv_id, str) else None)


def _row_item(row: object, ctx: _RowContext) -> DatasetItem:
    if not isinstance(row, dict):
        raise _RowError(f"row must be a JSON object, got {type(row).__name__}")
    has_conversation = "conversations" in row or "conversation" in row
    item = _conversation_item(row, ctx) if has_conversation else _plain_item(row, ctx)
    if ctx.max_len is not None and (item.prompt_token_ids is not None or ctx.tokenizer is not None):
        n_prompt = len(item.prompt_token_ids) if item.prompt_token_ids is not None else ctx.count(item.prompt or "")
        total = n_prompt + (item.max_tokens or 1)
        if total > ctx.max_len:
            raise _RowError(f"prompt ({n_prompt} tokens) + output ({item.max_tokens}) = {total} "
                            f"> max_len={ctx.max_len}")
    return item


Rows = Iterable[tuple[int, object]]  # (location, parsed row or the _RowError that parsing raised)


def _collect(rows: Rows, ctx: _RowContext, limit: int | None, source: str) -> DatasetResult:
    items: list[DatasetItem] = []
    skipped: list[SkippedRow] = []
    for location, row in rows:
        try:
            if isinstance(row, _RowError):
                raise row
            items.append(_row_item(row, ctx))
        except _RowError as error:
            skipped.append(SkippedRow(location, str(error)))
        if limit is not None and len(items) >= limit:
            break
    return DatasetResult(items, skipped, source)


def _jsonl_rows(lines: Iterable[bytes]) -> Iterator[tuple[int, object]]:
    for number, raw in enumerate(lines, start=1):
        try:
            # Decode per line so one bad byte costs one row, not the file; utf-8-sig drops a leading BOM.
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8").strip()
        except UnicodeDecodeError:
            yield number, _RowError("line is not valid UTF-8")
            continue
        if not line:
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            yield number, _RowError(f"bad JSON: {error.msg} at column {error.colno}")


def _parquet_rows(path: Path) -> Iterator[tuple[int, object]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as error:
        raise DatasetError(f"{path} is a parquet file; reading it needs pyarrow: `pip install pyarrow`") from error
    index = 0
    for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield index, row
            index += 1


def _trace_rows(path: Path, vocab_size: int | None, rng: np.random.Generator, ctx: _RowContext) -> Rows:
    """Splitwise/Azure trace rows as plain rows with random prompt_token_ids of ContextTokens length."""
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        columns = {name.strip().lower(): name for name in reader.fieldnames or []}
        if "contexttokens" not in columns or "generatedtokens" not in columns:
            raise DatasetError(f"{path}: a trace CSV needs ContextTokens and GeneratedTokens columns; "
                               f"it has {list(columns.values())}")
        tokens = _TokenSampler(rng, _need_vocab(vocab_size, str(path)))
        for record in reader:
            try:
                lengths = []
                for key in ("contexttokens", "generatedtokens"):
                    cell = (record.get(columns[key]) or "").strip()
                    if not re.fullmatch(r"\d+", cell):
                        raise _RowError(f"{columns[key]} must be a non-negative integer, got {cell!r}")
                    lengths.append(_positive_int(int(cell), columns[key]))
                yield reader.line_num, {"prompt_token_ids": tokens.draw(lengths[0]), "max_tokens": lengths[1]}
            except _RowError as error:
                yield reader.line_num, error


def _load_file(path: Path, ctx: _RowContext, limit: int | None, rng: np.random.Generator) -> DatasetResult:
    suffix = path.suffix.lower()
    with path.open("rb") as handle:
        head = handle.read(4096)
    text_head = head.decode("utf-8-sig", errors="replace").lstrip()
    if suffix == ".parquet" or head.startswith(b"PAR1"):
        return _collect(_parquet_rows(path), ctx, limit, f"parquet:{path}")
    if suffix == ".csv" or (suffix not in (".json", ".jsonl") and "contexttokens" in text_head.split("\n")[0].lower()):
        return _collect(_trace_rows(path, ctx.vocab_size, rng, ctx), ctx, limit, f"trace-csv:{path}")
    if text_head.startswith("["):
        try:
            data = json.loads(path.read_bytes().decode("utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            # A broken array has no recoverable row boundaries, unlike JSONL.
            raise DatasetError(f"{path} starts like a JSON array but is not valid JSON ({error}); fix the file or "
                               "convert it to JSONL, one object per line") from error
        return _collect(enumerate(data), ctx, limit, f"json:{path}")
    if text_head.startswith("{") or suffix in (".jsonl", ".json", ".ndjson"):
        with path.open("rb") as handle:
            return _collect(_jsonl_rows(handle), ctx, limit, f"jsonl:{path}")
    raise DatasetError(f"cannot tell the format of {path} (not JSON, JSONL, parquet or a trace CSV)\n{ACCEPTED_SPECS}")
