"""Draft-length policies: the adaptive window follows acceptance and cost, and recovers."""

from __future__ import annotations

from specfleet.policy.draft_length import AdaptiveDraftLength, FixedDraftLength, expected_speedup


def test_expected_speedup_formula():
    assert expected_speedup(0.8, 0, 0.1) == 1.0
    # (1 - 0.8^5) / (1 - 0.8) / (4 * 0.1 + 1)
    assert abs(expected_speedup(0.8, 4, 0.1) - (1 - 0.8**5) / 0.2 / 1.4) < 1e-12
    assert expected_speedup(1.0, 4, 0.0) == 5.0


def test_fixed():
    assert FixedDraftLength(3).window("r") == 3


def test_window_grows_with_acceptance_and_shrinks_with_cost():
    policy = AdaptiveDraftLength(max_length=8, cost_ratio=0.05)
    for _ in range(20):
        policy.observe("good", drafted=6, accepted=6)
        policy.observe("mid", drafted=4, accepted=2)  # per-token α ≈ 2/3
        policy.observe("bad", drafted=6, accepted=0)
    assert policy.window("good") == 8
    assert policy.window("bad") == 1  # a one-token probe while drafting is cheap
    cheap = policy.window("mid")
    policy.cost_ratio = 0.6
    assert 0 < policy.window("mid") < cheap


def test_speculation_switched_off_still_probes_and_recovers():
    policy = AdaptiveDraftLength(max_length=6, cost_ratio=0.9, probe_every=4)
    for _ in range(30):
        policy.observe("r", drafted=1, accepted=0)
    windows = [policy.window("r") for _ in range(8)]
    assert windows.count(1) == 2 and windows.count(0) == 6  # off, but probing
    for _ in range(20):  # drafting got cheap and drafts match again
        policy.observe_timing(draft_ns_per_token=1.0, verify_ns=100.0)
        policy.observe("r", drafted=1, accepted=1)
    assert policy.window("r") > 1


def test_forget():
    policy = AdaptiveDraftLength()
    policy.observe("r", drafted=4, accepted=0)
    policy.forget("r")
    assert policy.window("r") == AdaptiveDraftLength().window("other")
