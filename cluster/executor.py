"""The Ray executor: runs the scheduler's round plans on drafter and verifier actors.

Where it sits: ``EngineDriver.step`` (``engine/driver.py``) hands it the plans of a
step, one per verifier group with requests; it answers a ``RoundOutcome`` per plan,
exactly like the in-process executor (``engine/executor.py``), so the scheduler
cannot tell them apart. It knows nothing of requests beyond the calls it is given.

How a round travels (all groups' rounds are launched before any is waited for, so
groups verify side by side on their own actors):

- chained calls (default): every drafter call of the plan is sent, and the
  in-flight calls go straight into the group's verify call as arguments: drafters
  run in parallel, proposals travel drafter → verifier, the driver waits once;
- a compiled graph (``compiled_round.py``) once the same drafters have been in use
  for a few rounds, with one verifier group and enough rounds left to repay it;
- ``concurrent_drafts=False``: one drafter call after another, then the verify (kept
  to measure what chaining saves).

Failures become ``WorkerFailure`` values in the outcome: a drafter that fails, hangs
past its timeout or is restarting costs its requests this round's drafts (the verify
runs again with the drafts that did arrive); a lost verifier is replaced and its
group's requests are re-sent whole by the scheduler. A bug inside a live verifier is
raised to the driver. A verifier group past its restart budget raises
``WorkerUnavailable(group=N)`` after the other groups' rounds have finished; the
driver evicts the group (no more rounds are planned for it) until
``group_available`` says it is back.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from specfleet.cluster.compiled_round import CompiledRound
from specfleet.cluster.handles import DrafterHandle, VerifierHandle, dumps, failure_types
from specfleet.core.config import ClusterConfig
from specfleet.core.workers import (
    DraftReply,
    FailureKind,
    Housekeeping,
    RoundOutcome,
    RoundPlan,
    WorkerFailure,
    run_each,
)

logger = logging.getLogger(__name__)
_CLUSTER_DEFAULTS = ClusterConfig()  # the config's defaults, for executors built without one


def _failed(ref) -> bool:
    """True if a finished call's result is an error (never blocks: ``ref`` is ready)."""
    import ray

    try:
        ray.get(ref, timeout=0)
        return False
    except Exception:
        return True


@dataclass
class _Launched:
    """A round whose calls are in flight."""

    plan: RoundPlan
    start_ns: int
    outcome: RoundOutcome
    chained: list[tuple[str, object]] = field(default_factory=list)  # (drafter, ObjectRef)
    ahead: list[tuple[str, object]] = field(default_factory=list)  # (drafter, ObjectRef) of ahead calls
    verify_ref: object = None
    payload: bytes = b""


class RayExecutor:
    def __init__(
        self,
        drafters: Mapping[str, DrafterHandle],
        verifiers: Sequence[VerifierHandle],
        *,
        concurrent_drafts: bool = True,
        compiled_graph: bool = True,
        compiled_graph_max_drafters: int = 1,
        compile_after_rounds: int = _CLUSTER_DEFAULTS.compile_after_rounds,
        compile_min_rounds_left: int = _CLUSTER_DEFAULTS.compile_min_rounds_left,
    ):
        self.drafters = dict(drafters)
        self.verifiers = list(verifiers)
        self.concurrent_drafts = concurrent_drafts
        self.compiled_graph = compiled_graph and concurrent_drafts
        self.compiled_graph_max_drafters = compiled_graph_max_drafters
        self.compile_after_rounds = compile_after_rounds
        self.compile_min_rounds_left = compile_min_rounds_left
        self.compiled_rounds = 0  # rounds that ran through a compiled graph
        self._compiled: CompiledRound | None = None
        self._last_used: frozenset[str] = frozenset()
        self._same_used = 0  # consecutive rounds with the drafter set _last_used

    # ---- rounds ------------------------------------------------------------------------
    def run_rounds(self, plans: Sequence[RoundPlan]) -> list[RoundOutcome]:
        """A group given up raises ``WorkerUnavailable(group=N)`` once every other
        group's round has finished; their outcomes ride on it (``run_each``)."""
        if not self.concurrent_drafts:
            return run_each(plans, self._run_one_by_one)
        if len(plans) == 1 and len(self.verifiers) == 1 and not plans[0].ahead:
            compiled = self._run_compiled(plans[0])
            if compiled is not None:
                return [compiled]
        launched = {plan.round_id: self._launch(plan) for plan in plans}
        return run_each(plans, lambda plan: self._finish(launched[plan.round_id]))

    def group_available(self, group: int) -> bool:
        """Whether a given-up verifier group is back (the driver then restores it)."""
        return self.verifiers[group].available()

    def _launch(self, plan: RoundPlan) -> _Launched:
        round_ = _Launched(plan, time.perf_counter_ns(), RoundOutcome(plan.round_id, plan.group))
        for name, calls in plan.drafts.items():
            ref = self.drafters[name].submit(calls)
            if ref is None:
                round_.outcome.drafts[name] = self.drafters[name].collect(None)  # UNAVAILABLE
            else:
                round_.chained.append((name, ref))
        verifier = self.verifiers[plan.group]
        round_.payload, _ = verifier.round_payload(plan.verify)
        round_.verify_ref = verifier.actor.verify.remote(round_.payload, *[r for _, r in round_.chained])
        # Pipelined mode: each drafter drafts the next window while the verify runs
        # (its own draft ref orders the two calls and carries the tokens to extend).
        own = dict(round_.chained)
        for name, calls in plan.ahead.items():
            ref = self.drafters[name].submit_ahead(calls, own.get(name))
            if ref is None:
                round_.outcome.ahead[name] = self.drafters[name].collect(None)  # UNAVAILABLE
            else:
                round_.ahead.append((name, ref))
        return round_

    def _finish(self, round_: _Launched) -> RoundOutcome:
        """Wait for the chained verify call; fall back when a drafter failed or hung."""
        import ray

        verifier = self.verifiers[round_.plan.group]
        outcome = round_.outcome
        reply = self._await_chained(verifier, round_)
        if reply is None:
            # A drafter failed or hung: the verify never ran. Verify with the drafts that
            # did arrive (their refs are resolved: passing them again costs no compute).
            good = []
            for name, ref in round_.chained:
                if name in outcome.drafts:  # given up on (hung): already a failure
                    continue
                got = self.drafters[name].collect(ref)
                outcome.drafts[name] = got
                if isinstance(got, DraftReply):
                    good.append((name, ref))
            round_.chained = good
            payload, _ = verifier.round_payload(round_.plan.verify)
            try:
                reply = ray.get(verifier.actor.verify.remote(payload, *[r for _, r in good]),
                                timeout=verifier.call_timeout_s)
            except failure_types() as exc:
                reply = verifier.recover(type(exc).__name__)
        self._complete(outcome, verifier, reply, round_.chained)
        self._collect_ahead(round_)
        outcome.wall_ns = time.perf_counter_ns() - round_.start_ns
        return outcome

    def _collect_ahead(self, round_: _Launched) -> None:
        """The ahead calls' replies (pipelined mode). A drafter whose draft call of the
        round failed failed these too (same actor, chained): one failure, not two."""
        outcome = round_.outcome
        for name, ref in round_.ahead:
            own = outcome.drafts.get(name)
            if isinstance(own, WorkerFailure):
                outcome.ahead[name] = own
                continue
            outcome.ahead[name] = self.drafters[name].collect(ref)

    def _complete(self, outcome: RoundOutcome, verifier: VerifierHandle, reply,
                  chained: Sequence[tuple[str, object]]) -> None:
        """Fill ``outcome`` from a verify reply (or the group's failure)."""
        if isinstance(reply, WorkerFailure):
            outcome.verify = reply
            return
        result, summaries = verifier.parse(reply)
        outcome.verify = result
        for (name, _), summary in zip(chained, summaries):
            self.drafters[name].succeeded()  # its proposal reached the verifier
            outcome.drafts[name] = DraftReply([], summary.compute_ns, summary.unknown)
            outcome.draft_positions = max(outcome.draft_positions, summary.positions)
            # The drafters ran side by side: the round took the slowest, not the sum.
            outcome.draft_ns = max(outcome.draft_ns, summary.compute_ns)

    def _await_chained(self, verifier: VerifierHandle, round_: _Launched):
        """The chained call's raw reply; None when it did not run because a drafter
        failed or hung; the group's ``WorkerFailure`` when the verifier was lost."""
        import ray
        from ray.exceptions import GetTimeoutError

        drafts = round_.chained
        draft_timeout = min((self.drafters[n].call_timeout_s for n, _ in drafts), default=0.0)
        deadline = time.monotonic() + draft_timeout + verifier.call_timeout_s
        refs = [r for _, r in drafts]
        # Wait first as long as a drafter may take (the common case needs no other
        # call: a ray.wait per round costs ~0.05 ms); after that, the verifier's time.
        timeout = draft_timeout if refs else verifier.call_timeout_s
        while True:
            try:
                return ray.get(round_.verify_ref, timeout=timeout)
            except Exception as exc:  # classified below: drafter, verifier, or a bug
                error = exc
            done = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
            if any(r in done and _failed(r) for r in refs):
                verifier.requeue()
                return None  # an argument failed: the verify never ran
            hung = [n for n, r in drafts if r not in done and n not in round_.outcome.drafts]
            if hung and isinstance(error, GetTimeoutError):
                for name in hung:
                    # Killing it fails its ref, so the verify call fails too: unless it
                    # answered just now, in which case the verify runs; the loop sees which.
                    handle = self.drafters[name]
                    handle.supervisor.restart(f"no answer in {handle.call_timeout_s:.0f}s")
                    round_.outcome.drafts[name] = WorkerFailure(FailureKind.LOST, "timed out")
                continue
            if isinstance(error, GetTimeoutError) and time.monotonic() < deadline:
                timeout = deadline - time.monotonic()
                continue  # the drafters have answered; the verifier still has its own time
            if not isinstance(error, failure_types()):
                raise error  # a bug in the verifier: surfaced like any other call's
            return verifier.recover(type(error).__name__)

    def _run_one_by_one(self, plan: RoundPlan) -> RoundOutcome:
        """Drafter calls one after another, then the verify: the plain engine's order."""
        import ray

        start = time.perf_counter_ns()
        outcome = RoundOutcome(plan.round_id, plan.group)
        replies = []
        for name, calls in plan.drafts.items():
            got = self.drafters[name].collect(self.drafters[name].submit(calls))
            outcome.drafts[name] = got
            if isinstance(got, DraftReply):
                replies.append(dumps(got))
                outcome.draft_ns += got.compute_ns
                outcome.draft_positions += max((len(p) for p in got.proposals), default=0)
        verifier = self.verifiers[plan.group]
        payload, _ = verifier.round_payload(plan.verify)
        try:
            reply = ray.get(verifier.actor.verify.remote(payload, *replies), timeout=verifier.call_timeout_s)
            outcome.verify, _ = verifier.parse(reply)
        except failure_types() as exc:
            outcome.verify = verifier.recover(type(exc).__name__)
        for name, calls in plan.ahead.items():  # after the verify: nothing overlaps here
            own = outcome.drafts.get(name)
            if isinstance(own, WorkerFailure):
                outcome.ahead[name] = own
                continue
            own_ref = ray.put(dumps(own)) if own is not None else None
            outcome.ahead[name] = self.drafters[name].collect(self.drafters[name].submit_ahead(calls, own_ref))
        outcome.wall_ns = time.perf_counter_ns() - start
        return outcome

    # ---- the compiled graph --------------------------------------------------------------
    def _run_compiled(self, plan: RoundPlan) -> RoundOutcome | None:
        """The round through the compiled graph, or None to run it over plain calls."""
        compiled = self._compiled_for(frozenset(plan.drafts), plan.rounds_left)
        if compiled is None:
            return None
        start = time.perf_counter_ns()
        verifier = self.verifiers[plan.group]
        outcome = RoundOutcome(plan.round_id, plan.group)
        failures: dict[str, WorkerFailure] = {}
        reply = compiled.run(verifier, self.drafters, plan.verify, plan.drafts, failures)
        if reply is None:  # nothing was sent: plain calls this round, rebuild later
            self._compiled, self._same_used = None, 0
            return None
        if failures or isinstance(reply, WorkerFailure):
            self._compiled, self._same_used = None, 0
        else:
            self.compiled_rounds += 1
        if isinstance(reply, WorkerFailure):
            outcome.verify = reply
        else:  # every drafter of the graph had a part in the round, in name order
            self._complete(outcome, verifier, reply, [(n, None) for n in compiled.names])
        outcome.drafts.update(failures)
        for name in compiled.names:  # graph members with no requests this round
            if name not in plan.drafts:
                outcome.drafts.pop(name, None)
        outcome.wall_ns = time.perf_counter_ns() - start
        return outcome

    def _compiled_for(self, used: frozenset[str], rounds_left: float) -> CompiledRound | None:
        """The compiled graph to run this round on, building one when it pays."""
        if not self.compiled_graph or not used:
            return None
        verifier = self.verifiers[0]
        self._same_used = self._same_used + 1 if used == self._last_used else 1
        self._last_used = used
        current = self._compiled
        if current is not None and current.valid_for(verifier, self.drafters) and used <= set(current.names):
            # Requests finishing leave a subset in use: recompiling (~0.2 s) for that
            # would cost more than the idle drafters' empty calls.
            return current
        # Out of date (an actor was replaced) or missing a drafter: its actors would
        # poll for nothing while rounds run over plain calls.
        self._drop_compiled()
        if (self._same_used < self.compile_after_rounds or len(used) > self.compiled_graph_max_drafters
                or not all(self.drafters[n].alive for n in used) or rounds_left < self.compile_min_rounds_left):
            return None
        try:
            self._compiled = CompiledRound(verifier, {n: self.drafters[n] for n in used})
        except Exception:
            logger.warning("cannot compile the round graph; using plain actor calls", exc_info=True)
            self.compiled_graph = False
            return None
        self._same_used = self.compile_after_rounds  # keep counting from here, not from 0
        return self._compiled

    def _drop_compiled(self) -> None:
        if self._compiled is not None:
            self._compiled.teardown()
            self._compiled = None

    # ---- the fleet ----------------------------------------------------------------------------
    def add_drafter(self, name: str, handle: DrafterHandle) -> None:
        """A drafter actor joins (ready); a compiled graph over the old set is dropped."""
        self._drop_compiled()
        self.drafters[name] = handle

    def remove_drafter(self, name: str) -> DrafterHandle:
        """A drafter leaves between rounds; the caller shuts its actor down."""
        self._drop_compiled()
        return self.drafters.pop(name)

    # ---- between rounds --------------------------------------------------------------------
    def housekeeping(self, work: Housekeeping) -> None:
        """Queue releases and finished sequences to ride on each actor's next call;
        a drafter with many queued gets them in a call of its own."""
        work.deliver(self.drafters, self.verifiers)
        for handle in self.drafters.values():
            if handle.needs_flush() and handle.alive:
                handle.flush()

    def idle(self) -> None:
        """Nothing to run for a while: drop the compiled graph (its actors poll) and
        send what is queued, so idle actors hold no KV slots of finished requests."""
        self._drop_compiled()
        self._same_used = 0
        for verifier in self.verifiers:
            verifier.flush()
        for handle in self.drafters.values():
            handle.flush()
