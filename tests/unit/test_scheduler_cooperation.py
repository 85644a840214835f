"""Cooperative drafting in the scheduler: several drafters per request fused into one
tree, credit per drafter, re-routing, drafters joining and leaving — on scripted
workers (``testing/fake_workers.py``) and a ManualClock, checked against plain greedy
decoding of the toy target."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from specfleet.core.clock import ManualClock
from specfleet.core.types import SamplingParams
from specfleet.engine.driver import EngineDriver
from specfleet.engine.scheduler import Scheduler
from specfleet.policy.draft_length import FixedDraftLength
from specfleet.policy.learned_routing import LearnedRouter
from specfleet.policy.routing import DrafterProfile, ExpertiseRouter
from specfleet.policy.speculation_width import SpeculationWidth
from specfleet.testing.fake_workers import (
    ScriptedDrafter,
    ScriptedExecutor,
    ScriptedVerifier,
    reference_output,
    toy_target,
)
from tests.unit.test_scheduler import run_all

TARGET = toy_target()
PROMPTS = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11, 12], [13]]
PARAMS = SamplingParams(max_new_tokens=24, ignore_eos=True)


def parity(rid: str) -> int:
    return int(rid.rsplit("-", 1)[-1]) % 2


# "even" guesses even-numbered requests right and odd ones wrong from the 2nd token on;
# "odd" the other way round: alone each accepts 1 of 4 on half the requests; fused, 4 of 4.
WRONG = {
    "even": lambda rid, k: parity(rid) == 1 and k >= 1,
    "odd": lambda rid, k: parity(rid) == 0 and k >= 1,
}


def make_rig(*, width=2, router_cls=LearnedRouter, drafters=("even", "odd"), batch=8, **router_kwargs):
    clock = ManualClock()
    workers = {n: ScriptedDrafter(n, TARGET, WRONG.get(n, lambda r, k: False), ns_per_token=10_000)
               for n in drafters}
    verifiers = [ScriptedVerifier(TARGET)]
    executor = ScriptedExecutor(workers, verifiers, clock, verify_ns=5_000_000)
    profiles = [DrafterProfile(n, "general") for n in drafters]
    router = router_cls(profiles, decode=lambda ids: "plain words", **router_kwargs)
    scheduler = Scheduler(drafters=list(drafters), draft_length=FixedDraftLength(4), router=router,
                          width=SpeculationWidth(max_width=width, batch_node_budget=64), max_batch_size=batch)
    driver = EngineDriver(scheduler, executor, clock=clock)
    return SimpleNamespace(clock=clock, workers=workers, executor=executor, scheduler=scheduler,
                           driver=driver, router=router)


def submit_all(rig, prompts=PROMPTS) -> list[str]:
    return [rig.driver.submit(p, PARAMS, route=True) for p in prompts]


def test_fused_rounds_are_exact_and_accept_more_than_either_drafter_alone():
    fused = make_rig(width=2)
    ids = submit_all(fused)
    out = run_all(fused.driver)
    for rid, prompt in zip(ids, PROMPTS):
        assert out[rid].token_ids == reference_output(TARGET, prompt, PARAMS)
    fused_plans = [c for plan in fused.executor.plans for c in plan.verify if c.fusion is not None]
    assert fused_plans, "no round was fused"
    assert all(len(c.fusion.reliability) == 2 and c.fusion.max_nodes <= 8 for c in fused_plans)
    fused_rounds = sum(o.stats.rounds for o in out.values())

    for drafter in ("even", "odd"):  # each drafter alone, for every request
        alone = make_rig(width=1)
        ids = [alone.driver.submit(p, PARAMS, drafter=drafter) for p in PROMPTS]
        out_alone = run_all(alone.driver)
        for rid, prompt in zip(ids, PROMPTS):
            assert out_alone[rid].token_ids == reference_output(TARGET, prompt, PARAMS)
        assert fused_rounds < sum(o.stats.rounds for o in out_alone.values()) * 0.7


def test_each_drafter_is_credited_with_the_nodes_it_proposed():
    rig = make_rig(width=2)
    ids = submit_all(rig)
    out = run_all(rig.driver)
    for rid in ids:
        stats = out[rid].stats
        right = "even" if parity(rid) == 0 else "odd"
        wrong = "odd" if right == "even" else "even"
        # After the prefill, the right drafter's chain is accepted whole; the wrong one
        # shares only the first token of it.
        assert stats.accepted_by[right] > 2 * stats.accepted_by[wrong] > 0, (rid, stats.accepted_by)
    table = rig.router.table()["prose"]
    assert table["even"] > 0 and table["odd"] > 0


def test_requests_move_to_the_drafter_that_serves_them():
    # One drafter at a time (width 1). A first batch teaches the router that both
    # drafters are good (load spreads it over both, and each is right on half of it).
    rig = make_rig(width=1, min_rounds=2, ucb_c=0.0)
    submit_all(rig)
    run_all(rig.driver)
    assert rig.router.table()["prose"]["even"] > 0 and rig.router.table()["prose"]["odd"] > 0
    # Then requests that only "even" serves well: load spreads them over both at
    # admission, and those that start on "odd" are moved.
    ids = [rig.driver.submit(p, PARAMS, route=True, request_id=f"b-{2 * i}") for i, p in enumerate(PROMPTS)]
    first_plan = len(rig.executor.plans)
    out = run_all(rig.driver)
    for rid, prompt in zip(ids, PROMPTS):
        assert out[rid].token_ids == reference_output(TARGET, prompt, PARAMS)
    asked = [(name, call.request_id) for plan in rig.executor.plans[first_plan:]
             for name, calls in plan.drafts.items() for call in calls]
    assert any(name == "odd" for name, _ in asked), "load did not spread the burst"
    assert rig.router.reroutes >= 1
    last = {rid: name for name, rid in asked}
    assert all(name == "even" for name in last.values()), last


def test_a_drafter_removed_mid_flight_loses_no_request():
    rig = make_rig(width=2)
    ids = submit_all(rig)
    for _ in range(2):
        rig.driver.step()
    rig.scheduler.remove_drafter("even")
    out = run_all(rig.driver)
    assert set(out) == set(ids)
    for rid, prompt in zip(ids, PROMPTS):
        assert out[rid].token_ids == reference_output(TARGET, prompt, PARAMS)
    later = rig.executor.plans[2:]
    assert all("even" not in plan.drafts for plan in later)
    assert all(c.fusion is None for plan in later for c in plan.verify)  # one drafter left
    with pytest.raises(ValueError, match="last drafter"):
        rig.scheduler.remove_drafter("odd")


def test_a_drafter_added_at_run_time_is_tried_and_kept_when_it_is_better():
    rig = make_rig(width=1, drafters=("even",), ucb_c=0.0)
    submit_all(rig)
    run_all(rig.driver)
    worker = ScriptedDrafter("perfect", TARGET, ns_per_token=10_000)
    rig.executor.drafters["perfect"] = worker
    rig.scheduler.add_drafter(DrafterProfile("perfect", "general"))
    with pytest.raises(ValueError, match="already deployed"):
        rig.scheduler.add_drafter(DrafterProfile("perfect", "general"))
    ids = submit_all(rig)
    out = run_all(rig.driver)
    for rid, prompt in zip(ids, PROMPTS):
        assert out[rid].token_ids == reference_output(TARGET, prompt, PARAMS)
    assert worker.calls, "the newcomer was never asked"
    assert all(out[rid].stats.drafters["perfect"] > 0 for rid in ids[-3:])


def test_the_admission_router_keeps_one_drafter_per_request():
    rig = make_rig(width=3, router_cls=ExpertiseRouter, exploration=0.0)
    ids = submit_all(rig)
    out = run_all(rig.driver)
    for rid, prompt in zip(ids, PROMPTS):
        assert out[rid].token_ids == reference_output(TARGET, prompt, PARAMS)
        assert len(out[rid].stats.drafters) == 1
    assert all(c.fusion is None for plan in rig.executor.plans for c in plan.verify)
