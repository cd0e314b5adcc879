"""Synthetic request traces: constant lengths, the paper's Table 4 distributions, and multi-round conversations.

Lengths are drawn from a lognormal matched to each distribution's mean and standard deviation (seeded), clipped to
at least one token; token ids are uniform over the vocabulary. ``load_dataset`` in :mod:`nanoflow.data.datasets`
dispatches here for ``constant:IN:OUT``, ``splitwise|lmsys|sharegpt[:max=N]`` and ``multiround:NAME``.
"""

from __future__ import annotations

import math

import numpy as np

from nanoflow.data.datasets import (
    _CONSTANT_RE,
    _DIST_RE,
    TABLE4_DISTRIBUTIONS,
    DatasetError,
    DatasetItem,
    LengthDistribution,
    _need_vocab,
    _TokenSampler,
)


def sample_lengths(
    distribution: str | LengthDistribution, n: int, *, seed: int = 0, max_len: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Draw `n` (input, output) length pairs as two int64 arrays, each value >= 1 (see the module docstring).

    Gives the same lengths as ``load_dataset(name, num_requests=n, seed=seed)`` for a single-round synthetic spec.
    """
    if isinstance(distribution, str):
        if distribution not in TABLE4_DISTRIBUTIONS:
            raise DatasetError(f"unknown distribution {distribution!r}; choose one of {sorted(TABLE4_DISTRIBUTIONS)}")
        distribution = TABLE4_DISTRIBUTIONS[distribution]
    return _sample_pairs(distribution, n, np.random.default_rng(seed), max_len)


def load_synthetic(
    spec: str, n: int, rng: np.random.Generator, vocab_size: int | None, max_len: int | None
) -> list[DatasetItem]:
    constant, dist = _CONSTANT_RE.fullmatch(spec), _DIST_RE.fullmatch(spec)
    if dist:
        max_len = _merge_max_len(dist.group(3), max_len, spec)
        lengths = TABLE4_DISTRIBUTIONS[dist.group(2)]
        tokens = _TokenSampler(rng, _need_vocab(vocab_size, spec))
        if dist.group(1):
            return _multiround(lengths, n, rng, tokens, max_len)
        ins, outs = _sample_pairs(lengths, n, rng, max_len)
        return [DatasetItem(None, tokens.draw(i), int(o)) for i, o in zip(ins, outs)]
    assert constant is not None  # the caller matched one of the two patterns
    n_in, n_out = int(constant.group(1)), int(constant.group(2))
    if n_in < 1 or n_out < 1:
        raise DatasetError(f"{spec!r}: IN and OUT must both be >= 1")
    if max_len is not None and n_in + n_out > max_len:
        raise DatasetError(f"{spec!r}: IN + OUT = {n_in + n_out} exceeds max_len={max_len}")
    # Every request gets its own random ids, so constant-length prompts share no prefix.
    tokens = _TokenSampler(rng, _need_vocab(vocab_size, spec))
    return [DatasetItem(None, tokens.draw(n_in), n_out) for _ in range(n)]


def _lognormal(mean: float, std: float, n: int, rng: np.random.Generator) -> np.ndarray:
    sigma2 = math.log1p((std / mean) ** 2)
    raw = rng.lognormal(math.log(mean) - sigma2 / 2, math.sqrt(sigma2), n)
    return np.maximum(1, np.rint(raw)).astype(np.int64)


def _sample_pairs(
    dist: LengthDistribution, n: int, rng: np.random.Generator, max_len: int | None
) -> tuple[np.ndarray, np.ndarray]:
    ins = _lognormal(dist.input_mean, dist.input_std, n, rng)
    outs = _lognormal(dist.output_mean, dist.output_std, n, rng)
    if max_len is None:
        return ins, outs
    if max_len < 2:
        raise DatasetError(f"max_len={max_len} leaves no room for a prompt and an output token; use >= 2")
    for _ in range(200):  # redraw only the pairs that do not fit; acceptance is high for any useful cap
        bad = np.flatnonzero(ins + outs > max_len)
        if bad.size == 0:
            return ins, outs
        ins[bad] = _lognormal(dist.input_mean, dist.input_std, bad.size, rng)
        outs[bad] = _lognormal(dist.output_mean, dist.output_std, bad.size, rng)
    # A cap so small that redrawing rarely fits: clip what is left rather than loop forever.
    outs = np.minimum(outs, max_len - 1)
    return np.minimum(ins, max_len - outs), outs


def _merge_max_len(from_spec: str | None, argument: int | None, spec: str) -> int | None:
    if from_spec is None:
        return argument
    if argument is not None and argument != int(from_spec):
        raise DatasetError(f"{spec!r} says max={from_spec} but max_len={argument} was passed; give one of them")
    return int(from_spec)


def _multiround(
    dist: LengthDistribution, n: int, rng: np.random.Generator, tokens: _TokenSampler, max_len: int | None
) -> list[DatasetItem]:
    """`n` items from conversations of 3-5 rounds (only the last conversation may be cut shorter to make `n`).

    Round r's prompt = round r-1's prompt + a stand-in answer of round r-1's max_tokens random tokens + new user
    tokens. Items are ordered round-major (every conversation's round 0, then round 1, ...), so a runner that
    admits requests in order meets each prefix before its extension. With max_len, each of a conversation's k
    rounds gets max_len // k tokens of new user input + output, so the last round still fits.
    """
    rounds: list[int] = []
    while sum(rounds) < n:
        rounds.append(int(rng.integers(3, 6)))
    rounds[-1] -= sum(rounds) - n
    conversations: list[list[DatasetItem]] = []
    for index, k in enumerate(rounds):
        budget = None if max_len is None else max_len // k
        if budget is not None and budget < 2:
            raise DatasetError(f"max_len={max_len} is too small for {k}-round conversations; use >= {2 * k}")
        ins, outs = _sample_pairs(dist, k, rng, budget)
        context: list[int] = []
        turns = []
        for r in range(k):
            prompt = context + tokens.draw(ins[r])
            turns.append(DatasetItem(None, prompt, int(outs[r]), f"conv{index:05d}", r))
            context = prompt + tokens.draw(outs[r])
        conversations.append(turns)
    return [conv[r] for r in range(max(rounds)) for conv in conversations if r < len(conv)]


# ------------------------------------------------------------------------------------------------------ file rows
