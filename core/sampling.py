"""Turning logits into the distribution a request samples from, and drawing from it.

Where it sits: after the verifier's forward pass, the acceptance rule
(``verifiers/acceptance.py``) calls ``processed_probs`` on the target's logits of each
tree node it visits, and sampling drafters call the very same function on their own
logits. Speculative sampling is only lossless if the target's ``p`` and the drafter's
``q`` went through identical processing, so there is exactly one implementation of
temperature / top-k / top-p in the project, and this is it.

Every random number comes from a per-request ``torch.Generator`` (``make_generator``):
a fixed ``SamplingParams.seed`` reproduces the output, and in a tensor-parallel group
only rank 0, which owns the generator, ever draws.
"""

from __future__ import annotations

import math
import os

import torch


def processed_probs(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Logits ``[..., V]`` -> float32 probabilities ``[..., V]`` that sum to 1.

    Applied in this order, as Hugging Face and vLLM do: divide by ``temperature``;
    keep the ``top_k`` largest logits (0 = off); then, on the distribution renormalised
    over what top-k kept, keep the smallest set of most probable tokens whose mass is
    ``>= top_p`` (1.0 = off; the most probable token is always kept); renormalise.

    Ties: top-k keeps every token tied with the k-th largest logit (so it may keep
    more than k), and top-p breaks ties by token index (stable sort, lower index first),
    so the result never depends on kernel ordering and ``p``/``q`` match exactly.
    Greedy decoding (temperature 0) is not a distribution: use argmax instead.
    """
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature: must be finite and > 0 here, got {temperature}")
    if top_k < 0:
        raise ValueError(f"top_k: must be >= 0 (0 disables it), got {top_k}")
    if not (0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: must be in (0, 1], got {top_p}")

    # float32 even for bf16 logits: the accept test compares ratios of small probabilities.
    scaled = logits.float() / temperature  # [..., V]
    vocab = scaled.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]  # [..., 1]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    probs = torch.softmax(scaled, dim=-1)  # [..., V]

    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # [..., V]
        # A token is in the nucleus iff the mass strictly before it is < top_p: this is
        # the smallest such set, and the first token (mass before it is 0) always stays.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [..., V]
        keep_sorted = mass_before < top_p
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # [..., V]
        probs = probs.masked_fill(~keep, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """Draw one token id from ``probs`` ``[V]`` (need not be normalised).

    Inverse-CDF with a single uniform draw from ``generator``: one random number per
    sampled token keeps the generator's stream easy to reason about (a fixed seed
    replays exactly), and a zero-probability token can never be returned.
    """
    if probs.dim() != 1:
        raise ValueError(f"probs: expected shape [V], got {tuple(probs.shape)}")
    # float64 so the running sum over a 100k+ vocabulary does not drift.
    cdf = probs.double().cumsum(dim=0)  # [V]
    total = float(cdf[-1])
    if not (math.isfinite(total) and total > 0):
        raise ValueError(f"probs: must have positive, finite mass, got total {total}")
    u = float(torch.rand((), generator=generator, dtype=torch.float64, device=generator.device))
    # Keep the target strictly below the total mass so that the first cdf entry above it
    # exists; that entry rises above its predecessor, so its token has probability > 0.
    target = min(u * total, math.nextafter(total, 0.0))
    target_t = torch.tensor([target], dtype=cdf.dtype, device=cdf.device)  # [1]
    return int(torch.searchsorted(cdf, target_t, right=True))


def make_generator(seed: int | None, device: str | torch.device = "cpu") -> torch.Generator:
    """A request's RNG: seeded from ``seed``, or from ``os.urandom`` when it is None.

    An unseeded request must not share torch's global generator, whose state other
    requests (and libraries) also advance; its own fresh seed keeps requests apart.
    """
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1  # 63 bits: manual_seed's range
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator
