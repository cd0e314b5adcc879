"""Token sampling on the device: greedy, temperature, top-k, top-p, and reproducible per-request seeds.

Randomness comes from a counter-based hash of ``(seed, step, vocab index)`` rather than a stateful generator, so a
request's samples depend only on its own seed and position — not on which other requests share the batch, the
batch order, or whether the engine ran synchronously or asynchronously. Sampling is the Gumbel-max trick on the
filtered, temperature-scaled logits, which draws exactly from the softmax distribution.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

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
            t = torch.tensor(values, dtype=dtype)
            # Pinned staging + async copy: a pageable copy would wait for the GPU (see forward_batch.to_device).
            return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t

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
