"""The simulator runs *this* scheduler: same arrivals + same acceptance → same decisions.

One side is the real path as the scheduler tests drive it: ``EngineDriver`` over
``ScriptedExecutor`` (scripted drafters guessing a toy target) on a ``ManualClock``,
requests submitted at their arrival times. The other is ``sim.Simulator`` with
simulated workers replaying the acceptance recorded on the first side and a step-time
model with the scripted executor's costs. Every plan — round id, group, which
drafter drafts which request from which position with which window, batch membership
and order — must be identical, step for step, and so must every finish time.
Routing (ExpertiseRouter with exploration) and the adaptive window (which learns the
draft/verify cost ratio from the outcomes' timings) are on, so both are exercised.
"""

from __future__ import annotations

import random

import pytest

from specfleet.core.clock import ManualClock
from specfleet.core.types import SamplingParams
from specfleet.engine.driver import EngineDriver
from specfleet.engine.scheduler import Scheduler
from specfleet.policy.draft_length import AdaptiveDraftLength, FixedDraftLength
from specfleet.policy.routing import DrafterProfile, ExpertiseRouter
from specfleet.sim.acceptance import AcceptanceCurves, AcceptanceTrace
from specfleet.sim.executor import SimExecutor
from specfleet.sim.simulator import DOMAIN_TOKEN, Simulator, decode_synthetic
from specfleet.sim.workload import SimRequest, WorkloadShape, parse_workload
from specfleet.testing.fake_workers import (
    ScriptedDrafter,
    ScriptedExecutor,
    ScriptedVerifier,
    toy_target,
)

TARGET = toy_target()
DRAFTERS = {"general": "general", "code": "code", "prose": "prose"}
DRAFT_NS, VERIFY_NS = 1_000, 10_000


class ScriptedCosts:
    """The scripted executor's costs as a step-time model."""

    round_overhead_ns = 0.0

    def draft_ns(self, drafter, *, batch, new_tokens, positions, context):
        return positions * DRAFT_NS

    def verify_ns(self, group, *, batch, tokens, context):
        return VERIFY_NS


class RecordingExecutor(ScriptedExecutor):
    """Keeps every outcome, to read the accepted counts back as a trace."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outcomes = []

    def run_rounds(self, plans):
        outcomes = super().run_rounds(plans)
        self.outcomes += outcomes
        return outcomes


def wrong_rule(name: str, domain_of: dict[str, str], seed: int):
    """Drafters are right more often on their own domain; deterministic per call order."""
    rng = random.Random(seed)

    def wrong_at(request_id: str, k: int) -> bool:
        own = DRAFTERS[name] == domain_of[request_id] or name == "general"
        return rng.random() > (0.85 if own and name != "general" else 0.6 if own else 0.3)

    return wrong_at


def make_scheduler(adaptive: bool, groups: int, batch: int) -> Scheduler:
    router = ExpertiseRouter([DrafterProfile(n, d) for n, d in DRAFTERS.items()], exploration=0.2,
                             decode=decode_synthetic, seed=7)
    policy = AdaptiveDraftLength(max_length=6) if adaptive else FixedDraftLength(4)
    return Scheduler(drafters=list(DRAFTERS), draft_length=policy, router=router, groups=groups,
                     max_batch_size=batch)


def run_scripted(requests: list[SimRequest], *, adaptive: bool, groups: int, batch: int):
    clock = ManualClock()
    domain_of = {r.request_id: r.domain for r in requests}
    drafters = {n: ScriptedDrafter(n, TARGET, wrong_rule(n, domain_of, i)) for i, n in enumerate(DRAFTERS)}
    executor = RecordingExecutor(drafters, [ScriptedVerifier(TARGET) for _ in range(groups)], clock,
                                 draft_ns_per_token=DRAFT_NS, verify_ns=VERIFY_NS)
    driver = EngineDriver(make_scheduler(adaptive, groups, batch), executor, clock=clock)
    pending = sorted(requests, key=lambda r: r.arrival_ns)
    finish = {}
    while pending or driver.has_work:
        while pending and pending[0].arrival_ns <= clock.now_ns():
            r = pending.pop(0)
            driver.submit(list(r.prompt), SamplingParams(max_new_tokens=r.max_new_tokens, ignore_eos=True),
                          request_id=r.request_id, route=True)
        if driver.has_work:
            for out in driver.step():
                finish[out.request_id] = clock.now_ns()
        else:
            clock.advance(pending[0].arrival_ns - clock.now_ns())
    trace: dict[str, list[int]] = {}
    for outcome in executor.outcomes:
        for result in outcome.verify.results:
            trace.setdefault(result.request_id, []).append(result.num_accepted)
    return executor.plans, finish, trace


def run_simulated(requests: list[SimRequest], trace, *, adaptive: bool, groups: int, batch: int):
    # Past the recorded rounds (only when the schedule differs) draw from a curve.
    acceptance = AcceptanceTrace(trace, fallback=AcceptanceCurves({}, default=(0.5,)))
    executor = SimExecutor(list(DRAFTERS), groups, ScriptedCosts(), acceptance)
    executor.plans = []
    sim = Simulator(make_scheduler(adaptive, groups, batch), executor, lockstep=True, groups_parallel=True)
    run = sim.run(requests)
    finish = {rid: rec.finish_ns for rid, rec in run.records.items()}
    return executor.plans, finish


def decisions(plans):
    """What the scheduler decided in each plan, token values aside."""
    return [
        (p.round_id, p.group,
         {d: [(c.request_id, c.position, len(c.new_tokens), c.num_draft_tokens) for c in calls]
          for d, calls in p.drafts.items()},
         [(v.request_id, v.position, len(v.new_tokens), v.proposal is None) for v in p.verify])
        for p in plans
    ]


def workload(n: int, seed: int) -> list[SimRequest]:
    rng = random.Random(seed)
    base = parse_workload("gamma:40000:2", count=n, seed=seed,
                          shape=WorkloadShape(prompt_tokens=6, max_new_tokens=20))
    out = []
    for r in base:
        tokens = rng.randint(4, 40)
        prompt = tuple([DOMAIN_TOKEN[r.domain]] + [rng.randrange(50) for _ in range(rng.randint(1, 8))])
        out.append(SimRequest(r.request_id, r.arrival_ns, len(prompt), tokens, r.domain, prompt))
    return out


@pytest.mark.parametrize("adaptive,groups,batch,seed", [(True, 2, 3, 0), (False, 1, 4, 1), (True, 3, 2, 2)])
def test_simulator_makes_the_scheduling_decisions_of_the_real_path(adaptive, groups, batch, seed):
    requests = workload(40, seed)
    real_plans, real_finish, trace = run_scripted(requests, adaptive=adaptive, groups=groups, batch=batch)
    sim_plans, sim_finish = run_simulated(requests, trace, adaptive=adaptive, groups=groups, batch=batch)
    real, sim = decisions(real_plans), decisions(sim_plans)
    assert len(real) > 60  # queueing, several groups and drafters: a non-trivial schedule
    assert len({d for p in real for d in p[2]}) == len(DRAFTERS)  # every drafter served
    for step, (a, b) in enumerate(zip(real, sim)):
        assert a == b, f"plan {step} differs:\nreal {a}\nsim  {b}"
    assert len(real) == len(sim)
    assert sim_finish == real_finish


def test_a_scheduler_change_shows_up_as_a_decision_difference():
    """The comparison can fail: a different batch size gives a different schedule."""
    requests = workload(30, 3)
    real_plans, _, trace = run_scripted(requests, adaptive=True, groups=2, batch=3)
    sim_plans, _ = run_simulated(requests, trace, adaptive=True, groups=2, batch=4)
    assert decisions(real_plans) != decisions(sim_plans)
