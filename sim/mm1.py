"""M/M/1 sanity check: the whole simulator against queueing theory.

Where it sits: ``tests/unit/test_sim_queueing.py`` and ``specfleet bench sim-validate``
(``mm1_max_error``). The real scheduler with one verifier group of batch 1, no
drafter, requests of one token (so one verify round each = one service), Poisson
arrivals and exponential verify times: an M/M/1 FCFS queue, whose mean time in
system is 1 / (μ − λ). Anything the loop got wrong — event order, a lost wake-up,
admission off by one, time moving wrongly — shows up as a departure from theory.
"""

from __future__ import annotations

from dataclasses import dataclass

from specfleet.core.clock import Clock
from specfleet.engine.scheduler import Scheduler
from specfleet.policy.draft_length import FixedDraftLength
from specfleet.sim.acceptance import AcceptanceCurves
from specfleet.sim.executor import SimExecutor
from specfleet.sim.simulator import Simulator
from specfleet.sim.step_time import ExponentialStepTime
from specfleet.sim.workload import WorkloadShape, parse_workload


@dataclass(frozen=True)
class MM1Result:
    utilisation: float  # ρ = λ / μ
    requests: int
    measured_s: float  # mean time in system
    theory_s: float  # 1 / (μ − λ)
    events_per_s: float  # 0 unless the caller passed a wall clock

    @property
    def error(self) -> float:
        return abs(self.measured_s - self.theory_s) / self.theory_s


def run_mm1(utilisation: float, requests: int, *, service_s: float = 0.01, seed: int = 0,
            warmup: float = 0.05, wall_clock: Clock | None = None) -> MM1Result:
    """Simulate ``requests`` arrivals at ρ = ``utilisation``; the first ``warmup``
    fraction (the queue filling from empty) is left out of the mean."""
    if not 0 < utilisation < 1:
        raise ValueError(f"utilisation: must be in (0, 1), got {utilisation}")
    rate = utilisation / service_s
    arrivals = parse_workload(f"poisson:{rate}", count=requests, seed=seed,
                              shape=WorkloadShape(prompt_tokens=1, max_new_tokens=1))
    scheduler = Scheduler(drafters=[], draft_length=FixedDraftLength(0), groups=1, max_batch_size=1)
    executor = SimExecutor([], 1, ExponentialStepTime(service_s * 1e9, seed=seed + 1),
                           AcceptanceCurves({}))
    run = Simulator(scheduler, executor, route=False).run(arrivals, wall_clock=wall_clock)
    skip = int(len(arrivals) * warmup)
    times = [(run.records[r.request_id].finish_ns - r.arrival_ns) / 1e9 for r in arrivals[skip:]]
    return MM1Result(utilisation, len(times), sum(times) / len(times),
                     1.0 / (1.0 / service_s - rate),
                     run.events / run.wall_s if run.wall_s > 0 else 0.0)
