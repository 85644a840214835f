"""Turning logits into the distribution a request samples from, and drawing from it.

Where it sits: after the verifier's forward pass, the acceptance rule
(``verifiers/acceptance.py``) calls ``processed_probs`` on the target's logits of each
tree node it visits, and sampling drafters call the very same function on their own
logits. Speculative sampling is only lossless if the target's ``p`` and the drafter's
``q`` went through identical processing, so there is exactly one implementation of
temperature / top-k / top-p in the project, and this is it.

Position-keyed randomness (``keyed_choice``): the random choice of a request's token
at absolute sequence position ``L`` is made with noise drawn from a generator keyed
by ``(seed, L)`` alone — a counter-based stream, never a sequential one whose
consumption would depend on how many drafts a round checked. The choice is an
exponential race (equivalently Gumbel-max): with ``E_v = -log U_v`` for keyed
uniforms ``U``, the token is ``argmax_v p(v) / E_v``, which is distributed exactly as
``p``. The verifier (``verifiers/acceptance.py``: ``accept_keyed``) and sampling
drafters draw with the same keyed noise, so a drafter whose ``q`` is close to ``p``
mostly picks the very token the target will, and the output is a function of
(prompt, parameters, seed) only. In a tensor-parallel group only rank 0 decides.
The noise is generated on the CPU in float64, so it does not depend on the device.
"""

from __future__ import annotations

import math
import os

import torch

_MASK64 = (1 << 64) - 1


def processed_probs(
    logits: torch.Tensor, temperature: float, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Logits ``[..., V]`` -> float32 probabilities ``[..., V]`` that sum to 1 (computed in
    float64; any finite temperature > 0 and top_p in (0, 1] give a distribution).

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

    # float64, and the maximum subtracted first: every valid temperature, however
    # small (1e-300), gives a distribution — the largest logits keep all the mass —
    # instead of inf / inf = NaN. (The accept test compares small probabilities, too.)
    shifted = logits.double()
    shifted = shifted - shifted.amax(dim=-1, keepdim=True)  # [..., V], <= 0
    scaled = shifted / temperature  # [..., V]: 0 at the maximum, finite or -inf elsewhere
    vocab = scaled.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(scaled, top_k, dim=-1).values[..., -1:]  # [..., 1]
        scaled = scaled.masked_fill(scaled < kth, -math.inf)
    probs = torch.softmax(scaled, dim=-1)  # [..., V]

    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)  # [..., V]
        # A token is in the nucleus iff the mass strictly before it is < top_p: this is
        # the smallest such set. The most probable token always stays, even for a top_p
        # too small to represent (5e-324): then it is the whole nucleus.
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # [..., V]
        keep_sorted = mass_before < top_p
        keep_sorted[..., 0] = True
        keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)  # [..., V]
        probs = probs.masked_fill(~keep, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    probs = probs.float()
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
    """A sequential RNG (the rejection rule's reference path in benchmarks and tests;
    no request path uses one): seeded from ``seed``, or from ``os.urandom`` when None.

    An unseeded request must not share torch's global generator, whose state other
    requests (and libraries) also advance; its own fresh seed keeps requests apart.
    """
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") >> 1  # 63 bits: manual_seed's range
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def _splitmix64(x: int) -> int:
    """One SplitMix64 step (Steele et al.): a bijective mix of a 64-bit integer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def position_key(seed: int, position: int) -> int:
    """The 63-bit generator seed for ``(seed, position)``: integer arithmetic mod 2**64,
    so any uint64 seed and any position work, and nearby keys share no structure."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (position & _MASK64)) >> 1


def keyed_exponentials(seed: int, position: int, vocab: int) -> torch.Tensor:
    """``[V]`` float64 standard exponentials, a pure function of (seed, position, vocab)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(position_key(seed, position))
    uniforms = torch.rand(vocab, generator=generator, dtype=torch.float64)  # [V] in [0, 1)
    # -log(1 - U) is finite (1 - U > 0) and 0 only for U == 0 (chance 2**-53): keep it > 0.
    return (-torch.log1p(-uniforms)).clamp_min(1e-300)


def keyed_choice(probs: torch.Tensor, seed: int, position: int) -> int:
    """The token at absolute sequence ``position`` of a request seeded ``seed``, drawn
    from ``probs`` ``[V]`` (need not be normalised) by an exponential race on keyed
    noise. Exact: ``P(token = v) = p(v) / sum(p)``; zero-probability tokens never win."""
    if probs.dim() != 1:
        raise ValueError(f"probs: expected shape [V], got {tuple(probs.shape)}")
    p = probs.detach().to(device="cpu", dtype=torch.float64)  # [V]
    race = p / keyed_exponentials(seed, position, p.shape[0])  # [V]
    token = int(torch.argmax(race))
    if not p[token] > 0:
        raise ValueError("probs: must have positive, finite mass")
    return token


def draw_seed() -> int:
    """A fresh uint64 seed for a sampled request that came without one (it is returned
    to the client, so the output can be reproduced by sending it back)."""
    return int.from_bytes(os.urandom(8), "little")
