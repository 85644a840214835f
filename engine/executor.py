"""The in-process executor: runs the scheduler's round plans on local objects.

Where it sits: ``EngineDriver.step`` (``engine/driver.py``) asks the scheduler for
``RoundPlan``s and hands them here; the executor calls the drafters and the
verifier of each plan's group and returns a ``RoundOutcome`` per plan. It knows
nothing of requests beyond the calls it is given: no committed tokens, no stop
rule, no policy. The Ray executor (``cluster/executor.py``) and the simulator's
executor answer the same contract over actors and a simulated clock.

Failures: a drafter that raises answers ``WorkerFailure(ERROR)`` and the round goes
on without its drafts (still exact). A verifier that raises is a bug in this
process: the exception propagates to the driver, which tells the scheduler (the
group's requests resume from their committed tokens) and re-raises it. A worker that
raises ``WorkerUnavailable(group=N)`` (a stand-in for a remote group past its restart
budget) costs the other plans nothing: they finish, and the driver evicts group N.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import Future

from specfleet.core.types import DraftRequest
from specfleet.core.workers import (
    DraftReply,
    DraftWorker,
    FailureKind,
    Housekeeping,
    RoundOutcome,
    RoundPlan,
    VerifyCall,
    VerifyReply,
    VerifyWorker,
    WorkerFailure,
    ahead_requests,
    completed,
    run_each,
)
from specfleet.drafters.base import Drafter
from specfleet.verifiers.verifier import Verifier

logger = logging.getLogger(__name__)


class LocalDraftWorker:
    """A ``Drafter`` in this process as a ``DraftWorker``."""

    def __init__(self, drafter: Drafter):
        self.drafter = drafter
        self.name = drafter.name

    def propose(self, calls: Sequence[DraftRequest]) -> Future[DraftReply]:
        start = time.perf_counter_ns()
        proposals = self.drafter.propose(calls)
        return completed(DraftReply(proposals, time.perf_counter_ns() - start))

    def release(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            self.drafter.release(request_id)

    def observe_output(self, tokens: Sequence[int]) -> None:
        self.drafter.observe_output(tokens)


class LocalVerifyWorker:
    """A ``Verifier`` (or a tensor-parallel group's leader) in this process."""

    def __init__(self, verifier: Verifier):
        self.verifier = verifier

    def verify(self, calls: Sequence[VerifyCall], drafts: Sequence[DraftReply]) -> Future[VerifyReply]:
        return completed(self.verifier.verify(calls, drafts))

    def release(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            self.verifier.release(request_id)


class InProcessExecutor:
    """Runs each plan's drafters one after another, then its verifier (one thread:
    on the CPUs this runs on, side-by-side torch work only contends for cores)."""

    def __init__(self, drafters: Mapping[str, DraftWorker], verifiers: Sequence[VerifyWorker]):
        self.drafters = dict(drafters)
        self.verifiers = list(verifiers)

    def run_rounds(self, plans: Sequence[RoundPlan]) -> list[RoundOutcome]:
        return run_each(plans, self._run)

    def group_available(self, group: int) -> bool:
        """Whether a verifier group given up (its worker raised ``WorkerUnavailable``)
        is back: asked of the worker's ``available()`` where it has one. A plain
        in-process verifier never gives up, so one without stays given up."""
        available = getattr(self.verifiers[group], "available", None)
        return bool(available()) if callable(available) else False

    def _run(self, plan: RoundPlan) -> RoundOutcome:
        start = time.perf_counter_ns()
        outcome = RoundOutcome(plan.round_id, plan.group)
        replies, by_drafter = [], {}
        for name, calls in plan.drafts.items():
            try:
                reply = self.drafters[name].propose(calls).result()
            except Exception as exc:  # a drafter bug costs its requests this round's drafts only
                logger.exception("drafter %r failed a proposal call", name)
                outcome.drafts[name] = WorkerFailure(FailureKind.ERROR, f"{type(exc).__name__}: {exc}")
                continue
            outcome.drafts[name] = reply
            replies.append(reply)
            by_drafter[name] = reply
            outcome.draft_positions += max((len(p) for p in reply.proposals), default=0)
        verify_start = time.perf_counter_ns()
        outcome.draft_ns = verify_start - start  # drafters ran one after another
        outcome.verify = self.verifiers[plan.group].verify(plan.verify, replies).result()
        # Drafting ahead (pipelined mode) after the verify: one thread here, so nothing
        # overlaps (the Ray executor overlaps it with the verify); the tokens are the same.
        for name, calls in plan.ahead.items():
            if isinstance(outcome.drafts.get(name), WorkerFailure):
                outcome.ahead[name] = outcome.drafts[name]
                continue
            try:
                requests = ahead_requests(calls, by_drafter.get(name))
                outcome.ahead[name] = self.drafters[name].propose(requests).result()
            except Exception as exc:
                logger.exception("drafter %r failed an ahead call", name)
                outcome.ahead[name] = WorkerFailure(FailureKind.ERROR, f"{type(exc).__name__}: {exc}")
        outcome.wall_ns = time.perf_counter_ns() - start
        return outcome

    def add_drafter(self, name: str, worker: DraftWorker) -> None:
        self.drafters[name] = worker

    def remove_drafter(self, name: str) -> DraftWorker:
        return self.drafters.pop(name)

    def housekeeping(self, work: Housekeeping) -> None:
        """In-process work is cheap: release and learn at once."""
        work.deliver(self.drafters, self.verifiers)

    def idle(self) -> None:
        """Nothing is held between rounds in this process."""
