"""The engine driver: one loop over the scheduler and an executor.

Where it sits: between whoever submits requests (``specfleet bench engine``, the
engine thread in ``engine/backend.py`` that gRPC/HTTP serve from, tests) and the two halves of a round:
the ``Scheduler`` (``engine/scheduler.py``: request state, stop rule, policies)
decides, an executor (``engine/executor.py`` in-process, ``cluster/executor.py``
over Ray actors) runs. The driver is the only place that reads the clock, and it
tells the scheduler the time with every event — which is why the same scheduler
runs on a simulated clock.

A step: admit and plan (one ``RoundPlan`` per verifier group with requests), run
the plans (groups side by side where the executor can), feed the outcomes back,
hand the scheduler's housekeeping (releases, finished sequences) to the executor,
and return the requests that finished.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from collections.abc import Callable, Sequence

from specfleet.core.clock import Clock, MonotonicClock
from specfleet.core.load import LoadSnapshot
from specfleet.core.sampling import draw_seed
from specfleet.core.serving import GenerationOutput
from specfleet.core.stats import RoundTiming, SpecDecodingStats
from specfleet.core.types import SamplingParams
from specfleet.core.workers import (
    Executor,
    FailureKind,
    RoundOutcome,
    RoundPlan,
    VerifyReply,
    WorkerFailure,
    WorkerUnavailable,
)
from specfleet.engine.scheduler import Scheduler
from specfleet.policy.routing import DrafterProfile, Router

logger = logging.getLogger(__name__)


class EngineDriver:
    """Runs speculative decoding for many requests: a scheduler plus an executor."""

    def __init__(self, scheduler: Scheduler, executor: Executor, *, clock: Clock | None = None):
        self.scheduler = scheduler
        self.executor = executor
        self.clock = clock or MonotonicClock()
        self.timings: deque[RoundTiming] = deque(maxlen=4096)  # the latest rounds' timings

    # ---- what servers set after construction -------------------------------------------
    @property
    def token_sink(self) -> Callable[[str, list[int]], None] | None:
        """``token_sink(request_id, tokens)`` gets each round's committed tokens at once."""
        return self.scheduler.token_sink

    @token_sink.setter
    def token_sink(self, sink: Callable[[str, list[int]], None] | None) -> None:
        self.scheduler.token_sink = sink

    @property
    def router(self) -> Router | None:
        return self.scheduler.router

    @property
    def policy(self):
        """The draft-length policy."""
        return self.scheduler.draft_length

    @property
    def stats(self) -> SpecDecodingStats:
        """Fleet-wide counters since start: per position, drafter, domain and group."""
        return self.scheduler.stats

    # ---- the fleet -----------------------------------------------------------------------
    def add_drafter(self, profile: DrafterProfile, worker) -> None:
        """A drafter joins: its (ready) worker goes to the executor, its name to the
        scheduler and router, which try it from the next round on."""
        if profile.name in self.scheduler.drafters:
            raise ValueError(f"drafter {profile.name!r} is already deployed")
        self.executor.add_drafter(profile.name, worker)
        self.scheduler.add_drafter(profile)

    def remove_drafter(self, name: str):
        """A drafter leaves between rounds; its requests go on without loss (re-routed
        or plainly decoded). Returns its worker, for the caller to stop."""
        self.scheduler.remove_drafter(name)
        self._housekeep()
        return self.executor.remove_drafter(name)

    # ---- requests ------------------------------------------------------------------------
    def submit(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams | None = None,
        *,
        drafter: str | None = None,
        request_id: str | None = None,
        max_draft_length: int | None = None,
        route: bool = False,
    ) -> str:
        """Queue a request; ``drafter=None`` decodes it without speculation unless
        ``route`` asks the router (or the default drafter) to pick one. Raises
        ValueError naming the problem for a request that cannot be served.

        A sampled request without a seed gets one here (returned with its output), so
        its tokens can be reproduced by sending that seed back."""
        sampling = sampling or SamplingParams()
        if not sampling.greedy and sampling.seed is None:
            sampling = dataclasses.replace(sampling, seed=draw_seed())
        return self.scheduler.add(
            prompt, sampling, now_ns=self.clock.now_ns(), drafter=drafter,
            route=route, request_id=request_id, max_draft_length=max_draft_length,
        )

    def cancel(self, request_id: str) -> bool:
        """Stop a request now and free its KV caches; True if it was queued or running."""
        cancelled = self.scheduler.cancel(request_id, self.clock.now_ns())
        self._housekeep()
        return cancelled

    @property
    def request_ids(self) -> list[str]:
        """Every queued or running request."""
        return self.scheduler.request_ids

    @property
    def has_work(self) -> bool:
        return self.scheduler.has_work

    def load(self) -> LoadSnapshot:
        return self.scheduler.load()

    def group_of(self, request_id: str) -> int | None:
        """The verifier group a running request lives on (None while queued)."""
        return self.scheduler.group_of(request_id)

    # ---- the loop ------------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        drafter: str | None = None,
    ) -> list[GenerationOutput]:
        """Run a batch to completion; outputs in prompt order."""
        if sampling is None or isinstance(sampling, SamplingParams):
            sampling = [sampling or SamplingParams()] * len(prompts)
        ids = [self.submit(p, s, drafter=drafter) for p, s in zip(prompts, sampling)]
        done: dict[str, GenerationOutput] = {}
        try:
            while self.has_work:
                for output in self.step():
                    done[output.request_id] = output
        finally:
            self.idle()
        return [done[i] for i in ids]

    def step(self) -> list[GenerationOutput]:
        """One round for every verifier group with requests; returns what finished.

        A verifier group given up (``WorkerUnavailable(group=N)``) is evicted while
        another group is available: its requests move there, exactly, and the step
        goes on; with no group left the error is raised (servers answer UNAVAILABLE).
        An evicted group is restored once the executor reports it available again."""
        self._restore_groups()
        plans = self.scheduler.next_rounds(self.clock.now_ns())
        if plans:
            try:
                outcomes = self.executor.run_rounds(plans)
            except WorkerUnavailable as exc:
                outcomes = self._given_up(plans, exc)
            except BaseException as exc:
                # Nothing of these rounds is committed; the requests resume from their
                # committed tokens if the caller goes on (servers fail them instead).
                failure = WorkerFailure(FailureKind.ERROR, f"{type(exc).__name__}: {exc}")
                for plan in plans:
                    self.scheduler.on_verify_done(plan.round_id, failure, self.clock.now_ns())
                raise
            now = self.clock.now_ns()
            for outcome in outcomes:
                self.scheduler.on_round_done(outcome, now)
                if isinstance(outcome.verify, VerifyReply):
                    self.timings.append(RoundTiming(outcome.wall_ns, outcome.draft_ns,
                                                    outcome.verify.compute_ns, outcome.group))
        self._housekeep()
        return self.scheduler.drain_finished()

    def _given_up(self, plans: Sequence[RoundPlan], exc: WorkerUnavailable) -> list[RoundOutcome]:
        """A group was given up: the rounds that did not come back commit nothing (their
        requests resume from their committed tokens), and the group is evicted if
        another one is available; else ``exc`` is raised. Returns the outcomes the
        other groups' rounds did bring back, to be fed as usual."""
        failure = WorkerFailure(FailureKind.UNAVAILABLE, str(exc))
        back = {o.round_id for o in exc.outcomes}
        for plan in plans:
            if plan.round_id not in back:
                self.scheduler.on_round_done(RoundOutcome(plan.round_id, plan.group, verify=failure),
                                             self.clock.now_ns())
        group = exc.group
        if group is None or self.scheduler.available_groups in ([], [group]):
            # Nothing to move the requests to. What the other rounds brought back is kept
            # (requests finished there are returned by the next step).
            for outcome in exc.outcomes:
                self.scheduler.on_round_done(outcome, self.clock.now_ns())
            raise exc
        moved = self.scheduler.evict_group(group, self.clock.now_ns())
        logger.warning("%s: evicting it; its %d requests move to verifier group(s) %s", exc,
                       len(moved), ", ".join(map(str, self.scheduler.available_groups)))
        return exc.outcomes

    def _restore_groups(self) -> None:
        available = getattr(self.executor, "group_available", None)
        for group in self.scheduler.unavailable_groups:
            if available is not None and available(group):
                self.scheduler.restore_group(group)
                logger.warning("verifier group %d is available again", group)

    def idle(self) -> None:
        """Servers call this when no request has come for a while: the executor
        releases what it holds between rounds (a compiled graph's polling actors)."""
        self.executor.idle()

    def _housekeep(self) -> None:
        work = self.scheduler.take_housekeeping()
        if not work.empty:
            self.executor.housekeeping(work)
