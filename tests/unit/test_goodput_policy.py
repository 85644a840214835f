"""Goodput controller on a fake clock: scripted verify times and acceptance."""

import random

from specfleet.policy.goodput import GoodputDraftLength, StepTimeModel

MS = 1_000_000


def run_rounds(pol, caps, n, verify_ns, accept_rate, start=0, steady_len=None):
    """Drive n rounds; verify_ns(batch, tokens) scripts the verifier, accept_rate the drafts."""
    history, rng = [], random.Random(start)
    for r in range(start, start + n):
        plan = pol.plan_round(r, caps, now_ns=r * 10 * MS)
        tokens = sum(g + 1 for g in plan.values())
        for rid, g in plan.items():
            # Each position passes with probability accept_rate (seeded, so repeatable).
            # steady_len: the first steady_len positions always pass (no noise at all).
            accepted = (min(g, steady_len) if steady_len is not None
                        else next((k for k in range(g) if rng.random() >= accept_rate), g))
            pol.observe(rid, g, accepted, now_ns=r * 10 * MS)
        pol.observe_timing(0.2 * MS, verify_ns(len(plan), tokens))
        pol.observe_round(r, verify_ns(len(plan), tokens))
        history.append(plan)
    return history


def flat(batch, tokens):  # memory-bound verifier: extra tokens nearly free
    return 10 * MS + 0.05 * MS * tokens


def steep(batch, tokens):  # compute-bound verifier: every token costs full price
    return 1 * MS + 6 * MS * tokens


def test_step_model_fits_scripted_costs():
    m = StepTimeModel()
    for b, t in [(1, 2), (2, 6), (4, 12), (3, 4), (1, 8), (4, 20)] * 5:
        m.observe(b, t, 2 * MS + 0.5 * MS * b + 1.5 * MS * t)
    assert abs(m.predict(2, 10) - (2 + 1 + 15) * MS) / (18 * MS) < 0.05


def test_off_when_verify_per_token_rises_and_back_on_when_it_falls():
    pol = GoodputDraftLength(max_length=6)
    caps = {"a": 6, "b": 6}
    h = run_rounds(pol, caps, 40, flat, 0.6)
    assert all(g >= 2 for g in h[-1].values())
    h = run_rounds(pol, caps, 100, steep, 0.6, start=40)
    assert sum(pol.window(r) for r in caps) <= 1  # off (at most a probe)
    h = run_rounds(pol, caps, 100, flat, 0.6, start=140)
    assert all(pol.window(r) >= 2 for r in caps)


def test_steady_input_never_oscillates():
    pol = GoodputDraftLength(max_length=6, probe_every=10_000)
    h = run_rounds(pol, {"a": 6, "b": 6, "c": 6}, 80, flat, 0.0, steady_len=3)
    tail = [p for i, p in enumerate(h) if i >= 20 and (i + 1) % pol.explore_every]  # skip nudges
    changes = sum(1 for x, y in zip(tail, tail[1:], strict=False) if x != y)
    assert changes == 0
    assert len({tuple(sorted(p.items())) for p in h[20:]}) <= 1 + len(h[0])  # base plan + nudges


def test_cap_and_opt_out_win():
    pol = GoodputDraftLength(max_length=6)
    h = run_rounds(pol, {"a": 2, "b": 0, "c": 6}, 30, flat, 0.95)
    assert h[-1]["a"] <= 2 and h[-1]["b"] == 0 and h[-1]["c"] > 2


def test_overload_drops_least_gaining_first():
    pol = GoodputDraftLength(max_length=4, probe_every=10_000)
    pol._alpha.update({"good": 0.9, "bad": 0.3})
    # Per-token verify cost where only the best request's drafts still pay.
    for t in [2, 6, 10, 4, 8] * 4:
        pol.steps.observe(2, t, 5 * MS + 2.2 * MS * t)
    pol.draft_ns_per_token = 0.01 * MS
    plan = pol.best_plan({"good": 4, "bad": 4})
    assert plan["good"] > 0 and plan["bad"] == 0


def test_scheduler_asks_for_a_batch_plan_and_output_is_unchanged():
    """Through the real scheduler on a fake clock: caps reach the plan, output is exact."""
    from specfleet.core.clock import ManualClock
    from specfleet.core.types import SamplingParams
    from specfleet.engine.driver import EngineDriver
    from specfleet.engine.scheduler import Scheduler
    from specfleet.testing.fake_workers import (
        ScriptedDrafter,
        ScriptedExecutor,
        ScriptedVerifier,
        reference_output,
        toy_target,
    )

    target, clock = toy_target(), ManualClock()
    pol = GoodputDraftLength(max_length=5)
    seen_caps = []
    plan_round = pol.plan_round
    pol.plan_round = lambda rid, caps, **kw: seen_caps.append(dict(caps)) or plan_round(rid, caps, **kw)
    executor = ScriptedExecutor({"d": ScriptedDrafter("d", target, lambda r, k: k % 3 == 2)},
                                [ScriptedVerifier(target)], clock)
    sched = Scheduler(drafters=["d"], draft_length=pol, groups=1, max_batch_size=4)
    driver = EngineDriver(sched, executor, clock=clock)
    s = SamplingParams(max_new_tokens=20)
    a = driver.submit([1, 2], s, drafter="d")
    b = driver.submit([3, 4], s, drafter="d", max_draft_length=0)
    c = driver.submit([5, 6], s, drafter="d", max_draft_length=2)
    done = {}
    while driver.has_work:
        done.update((o.request_id, o) for o in driver.step())
    assert seen_caps[0] == {a: 19, b: 0, c: 2}
    for rid, p in ((a, [1, 2]), (b, [3, 4]), (c, [5, 6])):
        assert done[rid].token_ids == reference_output(target, p, s)
    assert done[b].stats.drafted == 0 and done[c].stats.drafted <= 2 * done[c].stats.rounds
    assert pol.steps._n > 0  # verify timings reached the step-time model
