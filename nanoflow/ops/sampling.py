"""Token sampling on the device: greedy, temperature, top-k, top-p, and reproducible per-request seeds.

Randomness comes from a counter-based hash of ``(seed, step, vocab index)`` rather than a stateful generator, so a
request's samples depend only on its own seed and position — not on which other requests share the batch, the
batch order, or whether the engine ran synchronously or asynchronously. Sampling is the Gumbel-max trick on the
filtered, temperature-scaled logits, which draws exactly from the softmax distribution.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from nanoflow.graphs.forward_batch import to_device  # pinned staging + async copy (never waits for the GPU)

_MASK32 = 0xFFFFFFFF


class SamplingTensors(NamedTuple):
    """Per-row sampling parameters, all ``[rows]`` on the logits' device."""

    temperature: torch.Tensor  # float32; 0 = greedy
    top_p: torch.Tensor  # float32 in (0, 1]
    top_k: torch.Tensor  # int64; <= 0 = off
    seed: torch.Tensor  # int64 in [0, 2**31)
    step: torch.Tensor  # int64: index of the token being sampled within the request's output

    any_random: bool  # host-side: some row has temperature > 0 (avoids a device sync to find out)

    @classmethod
    def build(
        cls,
        temperature: list[float],
        top_p: list[float],
        top_k: list[int],
        seed: list[int],
        step: list[int],
        device: torch.device | str,
    ) -> SamplingTensors:
        device = torch.device(device)

        def put(values: list, dtype: torch.dtype) -> torch.Tensor:
            return to_device(torch.tensor(values, dtype=dtype), device)

        return cls(put(temperature, torch.float32), put(top_p, torch.float32), put(top_k, torch.int64),
                   put(seed, torch.int64), put(step, torch.int64), any(t > 0 for t in temperature))


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply) on int64 tensors holding values in [0, 2**32)."""
    x = (x ^ (x >> 16)) * 0x45D9F3B & _MASK32
    x = (x ^ (x >> 16)) * 0x45D9F3B & _MASK32
    return x ^ (x >> 16)


def uniform_noise(seed: torch.Tensor, step: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[rows, vocab]`` uniforms in (0, 1) that depend only on (seed, step, column)."""
    col = torch.arange(vocab, device=seed.device, dtype=torch.int64)
    row_key = _mix32((seed & _MASK32) ^ _mix32((step * 0x2545F49 + 0x9E3779B) & _MASK32))
    x = _mix32((row_key[:, None] ^ (col[None, :] * 0x27D4EB2D & _MASK32)) & _MASK32)
    x = _mix32((x + 0x165667B1) & _MASK32)
    return (x.to(torch.float64) + 0.5) / 4294967296.0


def sample(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    """Sample one token id per row of ``logits [rows, vocab]``; greedy rows (temperature 0) take the argmax."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    if params.any_random:
        sampled = _sample_random(logits, params)
        return torch.where(params.temperature > 0, sampled, greedy)
    return greedy


def _sample_random(logits: torch.Tensor, params: SamplingTensors) -> torch.Tensor:
    vocab = logits.shape[-1]
    temp = torch.where(params.temperature > 0, params.temperature, torch.ones_like(params.temperature))
    scaled = logits / temp[:, None]
    sorted_logits, order = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    k = torch.where(params.top_k > 0, params.top_k.clamp(max=vocab), torch.full_like(params.top_k, vocab))
    drop = ranks >= k[:, None]
    probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: drop a token when the mass before it already reaches p.
    mass_before = probs.cumsum(dim=-1) - probs
    drop |= mass_before >= params.top_p[:, None]
    drop[:, 0] = False
    filtered = sorted_logits.masked_fill(drop, float("-inf"))
    gumbel = -torch.log(-torch.log(uniform_noise(params.seed, params.step, vocab)))
    # Noise is indexed by the original vocabulary id so a token's draw does not depend on its rank.
    noise = torch.gather(gumbel.to(filtered.dtype), 1, order)
    choice = (filtered + noise).argmax(dim=-1)
    return order.gather(1, choice[:, None]).squeeze(1)


class PenaltyLists(NamedTuple):
    """Host-side penalties of a step's penalised sampled rows (what :meth:`PenaltyTensors.build` takes; under tensor
    parallelism rank 0 sends them to every rank, whose sampled ids must agree)."""

    rows: list[int]  # indexes of the sampled rows
    presence: list[float]
    frequency: list[float]
    repetition: list[float]
    outputs: list[list[int]]  # each row's generated tokens so far
    prompts: list[list[int]]  # each row's prompt (empty where the repetition penalty is off)
    bias: list[list[tuple[int, float]]]  # each row's logit bias as (token id, bias)


class PenaltyTensors(NamedTuple):
    """Penalties of the sampled rows that have any (``rows [p]`` indexes the logits' rows), on the logits' device.

    ``output_rows``/``output_ids``: one entry per generated token of those requests (row within the ``p``
    penalised rows, token id); ``seen_rows``/``seen_ids`` the same for prompt and generated tokens (the repetition
    penalty's set)."""

    rows: torch.Tensor  # int64 [p]
    presence: torch.Tensor  # float32 [p]
    frequency: torch.Tensor  # float32 [p]
    repetition: torch.Tensor  # float32 [p]; 1 = off
    output_rows: torch.Tensor  # int64 [n_out]
    output_ids: torch.Tensor  # int64 [n_out]
    seen_rows: torch.Tensor  # int64 [n_seen]
    seen_ids: torch.Tensor  # int64 [n_seen]
    bias_rows: torch.Tensor  # int64 [n_bias]
    bias_ids: torch.Tensor  # int64 [n_bias]
    bias_values: torch.Tensor  # float32 [n_bias]

    @classmethod
    def build(cls, lists: PenaltyLists, device: torch.device | str) -> PenaltyTensors:
        """``lists.outputs[i]`` / ``lists.prompts[i]``: penalised row ``i``'s generated and prompt tokens (prompts
        are only read for rows with a repetition penalty)."""
        rows, presence, frequency, repetition, outputs, prompts, bias = lists
        seen = [o + p if r != 1.0 else [] for o, p, r in zip(outputs, prompts, repetition)]

        def flat(lists: list[list[int]]) -> tuple[list[int], list[int]]:
            return [i for i, ids in enumerate(lists) for _ in ids], [t for ids in lists for t in ids]

        out_rows, out_ids = flat(outputs)
        seen_rows, seen_ids = flat(seen)
        dev = torch.device(device)

        def put(values: list, dtype: torch.dtype) -> torch.Tensor:
            return to_device(torch.tensor(values, dtype=dtype), dev)

        bias_rows, bias_ids = flat([[t for t, _ in b] for b in bias])
        return cls(put(rows, torch.int64), put(presence, torch.float32), put(frequency, torch.float32),
                   put(repetition, torch.float32), put(out_rows, torch.int64), put(out_ids, torch.int64),
                   put(seen_rows, torch.int64), put(seen_ids, torch.int64), put(bias_rows, torch.int64),
                   put(bias_ids, torch.int64), put([v for b in bias for _, v in b], torch.float32))


def apply_penalties(logits: torch.Tensor, pen: PenaltyTensors) -> torch.Tensor:
    """``logits [rows, vocab]`` (fp32) with the penalties and logit biases applied to ``pen.rows`` (a new tensor),
    in vLLM's order:

    - repetition (HF / vLLM): a token seen in the prompt or output has its logit divided by the penalty when
      positive, multiplied when negative;
    - frequency and presence (OpenAI): ``logit -= frequency * count + presence * (count > 0)``, ``count`` the
      token's occurrences in the output;
    - logit bias (OpenAI): ``logit[id] += bias``.
    """
    logits = logits.float().clone()
    sub = logits.index_select(0, pen.rows)
    p, vocab = sub.shape
    counts = torch.zeros(p, vocab, device=logits.device, dtype=torch.float32)
    counts.index_put_((pen.output_rows, pen.output_ids), torch.ones_like(pen.output_ids, dtype=torch.float32),
                      accumulate=True)
    seen = torch.zeros(p, vocab, device=logits.device, dtype=torch.bool)
    seen[pen.seen_rows, pen.seen_ids] = True
    rep = pen.repetition[:, None]
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub = sub - pen.frequency[:, None] * counts - pen.presence[:, None] * (counts > 0).float()
    sub.index_put_((pen.bias_rows, pen.bias_ids), pen.bias_values, accumulate=True)
    logits.index_copy_(0, pen.rows, sub)
    return logits


class PromptLogprobRows(NamedTuple):
    """Rows of one prefill chunk whose prompt-token logprobs a step computes: rows ``[first_row, first_row +
    len(targets))`` of the plan's seq ``seq_index`` predict ``targets`` (the prompt tokens at positions
    ``first_position ...``). Under tensor parallelism rank 0 sends these to every rank (the LM head gathers)."""

    seq_index: int
    first_row: int
    targets: list[int]
    k: int
    request_id: str
    first_position: int
