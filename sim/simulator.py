"""The discrete-event loop: the real scheduler on a simulated clock.

Where it sits: the heart of ``specfleet simulate`` / ``plan`` / ``bench sim-validate``.
A heapq of timestamped events (Vidur's shape): arrivals, round completions and
planning points. Each event *tells* the ``Scheduler`` the time (``now_ns``); nothing
here or in the scheduler reads a clock. The loop mirrors ``EngineDriver``:

- ``lockstep`` (the driver as it is): a step plans one round for every idle group,
  runs them, and the next step starts when the slowest is done (or, with
  ``groups_parallel=False`` as in the in-process executor, after their sum);
- ``lockstep=False``: each group re-plans as soon as its own round is done (what an
  asynchronous driver over Ray actors would do).

As in the driver's thread (``engine/backend.py``), a request that arrives while a
lockstep step runs is submitted — routed, timestamped — once that step is committed;
its latency still counts from its true arrival.

Ties are broken deliberately, in this order at one timestamp: round completions,
then arrivals, then planning — so a request arriving at the instant a round ends is
in the next plan, as it is when the driver's thread picks up new submissions
before planning.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from specfleet.core.clock import Clock
from specfleet.core.types import SamplingParams
from specfleet.engine.scheduler import Scheduler
from specfleet.sim.executor import SimExecutor
from specfleet.sim.workload import SimRequest

_DONE, _ARRIVAL, _PLAN = 0, 1, 2  # same-time priority (see module docstring)

# Synthetic prompts carry their domain as their token; the router's classifier reads
# the text the simulator "decodes" them to — the router's own code path, unchanged.
DOMAIN_TOKEN = {"code": 3, "prose": 4, "data": 5}
_DOMAIN_TEXT = {
    3: "def area(self, r):\n    return self.pi * r ** 2\n\nclass Shape:\n    pass\n",
    4: "The river ran slowly past the old mill, and the children watched it in silence.",
    5: '{"id": 17, "name": "sensor-4", "ts": "2024-05-01T12:00:00", "value": 3.5}\n'
       '2024-05-01 12:00:01 INFO 10.0.0.1 GET /status 200\n',
}


def decode_synthetic(token_ids: list[int]) -> str:
    """Text of a synthetic prompt (what ``ExpertiseRouter`` classifies)."""
    return _DOMAIN_TEXT.get(token_ids[0] if token_ids else 4, _DOMAIN_TEXT[4])


@dataclass
class RequestRecord:
    arrival_ns: int
    first_token_ns: int | None = None  # absolute sim time
    last_token_ns: int | None = None
    finish_ns: int | None = None
    tokens: int = 0
    chunk_gaps_ns: list[int] = field(default_factory=list)  # between successive commits


@dataclass
class SimRun:
    """What one simulation produced (``metrics.summarize`` turns it into a report)."""

    records: dict[str, RequestRecord]
    scheduler: Scheduler
    executor: SimExecutor
    start_ns: int
    end_ns: int
    events: int
    wall_s: float  # the simulation's own run time (0 unless the caller timed it)
    rejected: dict[str, str] = field(default_factory=dict)  # request → why the scheduler refused it


class Simulator:
    def __init__(self, scheduler: Scheduler, executor: SimExecutor, *, lockstep: bool = True,
                 groups_parallel: bool = True, route: bool = True):
        self.scheduler = scheduler
        self.executor = executor
        self.lockstep = lockstep
        self.groups_parallel = groups_parallel
        self.route = route
        self._now = 0
        self._records: dict[str, RequestRecord] = {}
        scheduler.token_sink = self._on_tokens

    def _on_tokens(self, request_id: str, tokens: list[int]) -> None:
        rec = self._records[request_id]
        now = self._now
        if rec.first_token_ns is None:
            rec.first_token_ns = now
        else:
            rec.chunk_gaps_ns.append(now - rec.last_token_ns)
        rec.last_token_ns = now
        rec.tokens += len(tokens)

    def run(self, requests: Sequence[SimRequest], progress: Callable[[int], None] | None = None,
            *, wall_clock: Clock | None = None) -> SimRun:
        """Simulate until every request has finished; ``progress(n)`` is told of each
        finished request. ``wall_clock`` (the caller's, e.g. ``MonotonicClock``) times the
        simulation itself for ``events_per_s``; the simulation never reads a clock, so
        without one ``wall_s`` is 0."""
        sched, ex = self.scheduler, self.executor
        heap: list = []
        seq = 0
        arrivals = sorted(requests, key=lambda r: r.arrival_ns)
        next_arrival = 0
        if arrivals:
            heapq.heappush(heap, (arrivals[0].arrival_ns, _ARRIVAL, seq, None))
        in_flight = 0  # rounds (async) or steps (lockstep) not yet done
        plan_pending = False
        events = 0
        rejected: dict[str, str] = {}
        inbox: list[SimRequest] = []  # arrived during a lockstep step
        start_wall_ns = wall_clock.now_ns() if wall_clock is not None else 0
        push = heapq.heappush
        while heap:
            now, kind, _, payload = heapq.heappop(heap)
            self._now = now
            events += 1
            if kind == _ARRIVAL:
                req = arrivals[next_arrival]
                next_arrival += 1
                if next_arrival < len(arrivals):
                    seq += 1
                    push(heap, (arrivals[next_arrival].arrival_ns, _ARRIVAL, seq, None))
                if self.lockstep and in_flight:
                    # The driver's thread takes new submissions between steps: routed
                    # (and timestamped) when the running step has been committed.
                    inbox.append(req)
                    continue
                if not self._submit(req, now, now, rejected):
                    continue
                if not plan_pending and not (self.lockstep and in_flight):
                    plan_pending = True
                    seq += 1
                    push(heap, (now, _PLAN, seq, None))
            elif kind == _PLAN:
                plan_pending = False
                if self.lockstep and in_flight:
                    continue
                plans = sched.next_rounds(now)
                if not plans:
                    continue
                if self.lockstep:
                    outcomes, durations = [], []
                    for plan in plans:
                        outcome, ns = ex.run_plan(plan)
                        outcomes.append(outcome)
                        durations.append(ns)
                    step = max(durations) if self.groups_parallel else sum(durations)
                    in_flight = 1
                    seq += 1
                    push(heap, (now + step, _DONE, seq, outcomes))
                else:
                    for plan in plans:
                        outcome, ns = ex.run_plan(plan)
                        in_flight += 1
                        seq += 1
                        push(heap, (now + ns, _DONE, seq, [outcome]))
            else:  # _DONE
                in_flight -= 1
                for outcome in payload:
                    sched.on_round_done(outcome, now)
                work = sched.take_housekeeping()
                if not work.empty:
                    ex.housekeeping(work)
                for output in sched.drain_finished():
                    self._records[output.request_id].finish_ns = now
                    if progress is not None:
                        progress(1)
                for req in inbox:
                    self._submit(req, req.arrival_ns, now, rejected)
                inbox.clear()
                if sched.has_work and not plan_pending:
                    plan_pending = True
                    seq += 1
                    push(heap, (now, _PLAN, seq, None))
        start = arrivals[0].arrival_ns if arrivals else 0
        return SimRun(self._records, sched, ex, start, self._now, events,
                      (wall_clock.now_ns() - start_wall_ns) / 1e9 if wall_clock is not None else 0.0,
                      rejected)

    def _submit(self, req: SimRequest, arrival_ns: int, now: int, rejected: dict[str, str]) -> bool:
        prompt = list(req.prompt) or [DOMAIN_TOKEN.get(req.domain, 4)] * req.prompt_tokens
        sampling = SamplingParams(max_new_tokens=req.max_new_tokens, ignore_eos=True)
        try:
            self.scheduler.add(prompt, sampling, now_ns=now, drafter=req.drafter,
                               route=self.route and req.drafter is None, request_id=req.request_id)
        except ValueError as exc:  # what a server answers INVALID_ARGUMENT
            rejected[req.request_id] = str(exc)
            return False
        self.executor.domain_of[req.request_id] = req.domain
        self._records[req.request_id] = RequestRecord(arrival_ns)
        return True
