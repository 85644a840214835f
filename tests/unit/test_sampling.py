"""processed_probs / sample / make_generator: the one place logits become a distribution."""

from __future__ import annotations

import math

import pytest
import torch

from specfleet.core.sampling import make_generator, processed_probs, sample


def _logits_for(probs: list[float]) -> torch.Tensor:
    """Logits whose softmax is exactly ``probs`` (log-probabilities), shape [V]."""
    return torch.tensor(probs, dtype=torch.float64).log().float()


def test_temperature_scales_logits_before_softmax() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.5, 0.5, 3.0, -2.0]])  # [2, 4]
    for temperature in (0.5, 1.0, 2.0):
        got = processed_probs(logits, temperature)
        torch.testing.assert_close(got, torch.softmax(logits / temperature, dim=-1))
    # Lower temperature sharpens, higher flattens.
    top = processed_probs(logits, 0.5)[0, 0], processed_probs(logits, 2.0)[0, 0]
    assert top[0] > top[1]


def test_output_is_float32_and_sums_to_one_over_any_leading_shape() -> None:
    logits = torch.randn(2, 3, 11, generator=torch.Generator().manual_seed(0)).bfloat16()
    probs = processed_probs(logits, 0.8, top_k=5, top_p=0.9)  # [2, 3, 11]
    assert probs.dtype == torch.float32 and probs.shape == (2, 3, 11)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3))
    assert bool((probs >= 0).all())


def test_top_k_keeps_the_k_largest_and_renormalises() -> None:
    logits = torch.tensor([1.0, 4.0, 3.0, 0.0, 2.0])
    probs = processed_probs(logits, 1.0, top_k=2)
    expected = torch.zeros(5)
    expected[[1, 2]] = torch.softmax(torch.tensor([4.0, 3.0]), dim=0)
    torch.testing.assert_close(probs, expected)
    # k >= V and k == 0 are both "off".
    torch.testing.assert_close(processed_probs(logits, 1.0, top_k=5), torch.softmax(logits, 0))
    torch.testing.assert_close(processed_probs(logits, 1.0, top_k=0), torch.softmax(logits, 0))


def test_top_k_keeps_every_token_tied_with_the_kth() -> None:
    # Documented choice (Hugging Face's): ties at the boundary are all kept.
    probs = processed_probs(torch.tensor([5.0, 3.0, 3.0, 1.0]), 1.0, top_k=2)
    assert (probs > 0).tolist() == [True, True, True, False]


def test_top_p_keeps_the_smallest_set_reaching_the_mass() -> None:
    logits = _logits_for([0.15, 0.5, 0.05, 0.3])
    # {1} has 0.5 < 0.75, {1, 3} has 0.8 >= 0.75: keep exactly those two.
    torch.testing.assert_close(
        processed_probs(logits, 1.0, top_p=0.75), torch.tensor([0.0, 0.625, 0.0, 0.375])
    )
    kept = processed_probs(logits, 1.0, top_p=0.9) > 0
    assert kept.tolist() == [True, True, False, True]
    torch.testing.assert_close(processed_probs(logits, 1.0, top_p=1.0), torch.softmax(logits, 0))


def test_top_p_always_keeps_at_least_the_most_probable_token() -> None:
    logits = _logits_for([0.2, 0.3, 0.25, 0.25])
    torch.testing.assert_close(
        processed_probs(logits, 1.0, top_p=1e-6), torch.tensor([0.0, 1.0, 0.0, 0.0])
    )


def test_top_p_applies_to_the_distribution_left_by_top_k() -> None:
    logits = _logits_for([0.4, 0.3, 0.2, 0.1])
    # After top-k=2 the distribution is [4/7, 3/7]; 4/7 >= 0.5 so top-p keeps token 0
    # alone. Applied to the unfiltered distribution (0.4 < 0.5) it would keep two.
    torch.testing.assert_close(
        processed_probs(logits, 1.0, top_k=2, top_p=0.5), torch.tensor([1.0, 0.0, 0.0, 0.0])
    )


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"),
    [
        (0.0, 0, 1.0),
        (-1.0, 0, 1.0),
        (math.nan, 0, 1.0),
        (math.inf, 0, 1.0),
        (1.0, -1, 1.0),
        (1.0, 0, 0.0),
        (1.0, 0, 1.5),
    ],
)
def test_invalid_parameters_raise(temperature: float, top_k: int, top_p: float) -> None:
    with pytest.raises(ValueError):
        processed_probs(torch.zeros(4), temperature, top_k, top_p)


def test_sample_follows_the_distribution_and_never_picks_zero_mass() -> None:
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    generator = make_generator(1234)
    n = 3000
    counts = torch.zeros(6)
    for _ in range(n):
        counts[sample(probs, generator)] += 1
    assert counts[[0, 2, 5]].sum() == 0
    # Loose: 5+ standard deviations of a binomial with n = 3000.
    assert torch.allclose(counts / n, probs, atol=0.05)


def test_sample_accepts_unnormalised_weights_and_rejects_zero_mass() -> None:
    generator = make_generator(0)
    assert sample(torch.tensor([0.0, 0.0, 7.0]), generator) == 2
    with pytest.raises(ValueError):
        sample(torch.zeros(3), generator)
    with pytest.raises(ValueError):
        sample(torch.ones(2, 3), generator)


def test_same_seed_same_stream_and_unseeded_generators_differ() -> None:
    probs = torch.full((50,), 1 / 50)
    a, b = make_generator(42), make_generator(42)
    assert [sample(probs, a) for _ in range(20)] == [sample(probs, b) for _ in range(20)]
    draws = {tuple(torch.rand(4, generator=make_generator(None)).tolist()) for _ in range(3)}
    assert len(draws) == 3


def test_sample_uses_only_the_given_generator() -> None:
    # In a TP group only rank 0 draws, from the request's generator: never torch's global one.
    torch.manual_seed(0)
    before = torch.get_rng_state()
    sample(torch.tensor([0.5, 0.5]), make_generator(3))
    assert torch.equal(before, torch.get_rng_state())
