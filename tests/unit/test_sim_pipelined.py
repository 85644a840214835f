"""The simulator runs the pipelined scheduler too (``engine/pipeline.py``): ahead calls
run beside the verify on the simulated clock, their first token is the drafter's
guess of the bonus (right as often as the acceptance curve says), and the predicted
gain over lockstep follows PEARL's arithmetic: hidden drafting pays in the drafter's
cost regime, not for a free one.
"""

from __future__ import annotations

import pytest

from specfleet.engine.pipeline import PipelinedScheduler
from specfleet.engine.scheduler import Scheduler
from specfleet.policy.draft_length import FixedDraftLength
from specfleet.sim.acceptance import AcceptanceCurves
from specfleet.sim.executor import SimExecutor
from specfleet.sim.simulator import Simulator
from specfleet.sim.workload import SimRequest

VERIFY_NS = 10_000_000


class Costs:
    round_overhead_ns = 0.0

    def __init__(self, draft_ns_per_token: int):
        self.per_token = draft_ns_per_token

    def draft_ns(self, drafter, *, batch, new_tokens, positions, context):
        return positions * self.per_token

    def verify_ns(self, group, *, batch, tokens, context):
        return VERIFY_NS


def simulate(pipelined: bool, c: float, alpha: float, window: int = 4, n: int = 6, first_window: int = 0):
    kwargs = dict(drafters=["d"], draft_length=FixedDraftLength(window), groups=1, max_batch_size=1)
    scheduler = PipelinedScheduler(first_window=first_window, **kwargs) if pipelined else Scheduler(**kwargs)
    executor = SimExecutor(["d"], 1, Costs(int(c * VERIFY_NS)), AcceptanceCurves({"d": {"prose": [alpha]}}, seed=3))
    requests = [SimRequest(f"r{i}", 0, 16, 64, "prose", drafter="d") for i in range(n)]
    run = Simulator(scheduler, executor).run(requests)
    assert all(rec.tokens == 64 and rec.finish_ns is not None for rec in run.records.values())
    tokens = sum(rec.tokens for rec in run.records.values())
    return tokens / (max(rec.finish_ns for rec in run.records.values()) / 1e9), scheduler


@pytest.mark.parametrize("alpha", [0.5, 0.8, 0.95])
def test_pipelining_pays_in_pearls_regime_and_hits_as_often_as_acceptance_allows(alpha):
    lockstep, _ = simulate(False, c=0.2, alpha=alpha)
    pipelined, scheduler = simulate(True, c=0.2, alpha=alpha)
    assert scheduler.pipeline_rounds > 0
    hit_rate = scheduler.pipeline_hits / scheduler.pipeline_rounds
    if alpha >= 0.8:
        assert pipelined > 1.1 * lockstep, (pipelined, lockstep)
        assert hit_rate > 0.3
    else:  # mostly cold rounds: first drafts of one token, still not far off lockstep
        assert pipelined > 0.7 * lockstep
    assert hit_rate < alpha  # a window held whole *and* the bonus guessed right


@pytest.mark.parametrize("alpha", [0.5, 0.8, 0.95])
def test_a_free_drafter_gains_nothing_from_hiding_it_and_loses_little(alpha):
    """With nothing to hide, the cold round drafts the whole window (``cold_window``):
    lockstep's rounds, give or take a bonus guess."""
    lockstep, _ = simulate(False, c=0.0, alpha=alpha)
    pipelined, scheduler = simulate(True, c=0.0, alpha=alpha)
    assert 0.95 * lockstep <= pipelined <= 1.05 * lockstep, (pipelined, lockstep)
    forced, _ = simulate(True, c=0.0, alpha=alpha, first_window=1)  # pre-verify where it cannot pay
    assert forced < pipelined
