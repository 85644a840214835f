"""``DrafterHandle`` / ``VerifierHandle``: one worker's actor calls, as the Ray executor makes them.

Where it sits: between the Ray executor (``executor.py``, which turns the
scheduler's ``RoundPlan``s into calls) and the actors of ``actors.py``. A handle
owns what the distributed case adds to a call, and nothing about requests:

- payloads: the call's ``DraftRequest``s / ``VerifyCall``s pickled once, with the
  housekeeping owed to that actor (releases, finished sequences for drafters that
  learn) riding along instead of costing a round trip each;
- failure classification: a call's error becomes a ``WorkerFailure`` — ``LOST``
  when the actor died or hung past ``call_timeout_s`` (the supervisor replaces it),
  ``UNAVAILABLE`` when it was not ready to take the call (nothing ran), ``ERROR``
  when the call raised inside a live actor. The scheduler turns each into a
  resync (re-send from position 0); nothing here mirrors committed tokens;
- the actor's life itself is the ``ActorSupervisor``'s (``supervisor.py``), within
  its ``RestartBudget``; past the budget a drafter is left out of rounds (its
  requests go on with the other drafts or none, still exact) and a verifier group
  raises ``WorkerUnavailable(group=N)`` (its requests move to the other groups; they
  end UNAVAILABLE only when no group is left).
"""

from __future__ import annotations

import logging
import pickle
from collections.abc import Callable, Sequence

from specfleet.cluster.supervisor import ActorSupervisor, RestartBudget
from specfleet.core.types import DraftRequest
from specfleet.core.workers import (
    AheadCall,
    DraftReply,
    FailureKind,
    VerifyCall,
    VerifyReply,
    WorkerFailure,
    WorkerUnavailable,
)

logger = logging.getLogger(__name__)

# Beyond this many queued releases a drafter gets them in a call of their own, so an
# idle drafter does not hold KV slots of finished requests indefinitely.
MAX_PIGGYBACK = 16


def failure_types() -> tuple[type[BaseException], ...]:
    """Errors meaning "this actor is gone or stuck", as opposed to a bug in a call."""
    from ray.exceptions import GetTimeoutError, RayActorError

    return (RayActorError, GetTimeoutError)


def dumps(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _wait_quietly(ref, timeout_s: float = 10.0) -> None:
    """Wait for a housekeeping call; a failed actor is dealt with on its next real call."""
    import ray

    try:
        ray.get(ref, timeout=timeout_s)
    except Exception:
        logger.debug("housekeeping call failed", exc_info=True)


class _Handle:
    """What both handles share: a supervised actor, a timeout, queued releases."""

    def __init__(self, supervisor: ActorSupervisor, call_timeout_s: float):
        self.supervisor = supervisor
        self.call_timeout_s = call_timeout_s
        self._releases: list[str] = []
        self._unconfirmed: list[str] = []  # releases sent with the call in flight

    # Tests and operators read these off the handle.
    @property
    def actor(self):
        return self.supervisor.actor

    @property
    def alive(self) -> bool:
        return self.supervisor.alive

    @property
    def restarts(self) -> int:
        return self.supervisor.restarts

    @property
    def info(self) -> dict:
        return self.supervisor.info

    def _ready(self) -> bool:
        return self.supervisor.ready()

    def wait_ready(self, timeout_s: float | None = None) -> dict:
        return self.supervisor.wait_ready(timeout_s)

    def succeeded(self) -> None:
        """A call went through: the restart budget's failures in a row start from 0."""
        self.supervisor.budget.succeeded()

    def shutdown(self) -> None:
        self.supervisor.shutdown()

    def release(self, request_ids: Sequence[str]) -> None:
        """Queue releases for the next call (releasing twice is harmless)."""
        self._releases.extend(request_ids)

    def _take_releases(self) -> list[str]:
        self._unconfirmed, self._releases = self._releases, []
        return self._unconfirmed

    def requeue(self) -> None:
        """The call in flight did not run: its releases are still owed."""
        self._releases = self._unconfirmed + self._releases
        self._unconfirmed = []

    def classify(self, error: BaseException, what: str) -> WorkerFailure:
        """A failed call as a ``WorkerFailure``; a dead or stuck actor is replaced."""
        if isinstance(error, failure_types()):
            self._unconfirmed = []  # a new actor holds nothing to release
            self._releases = []
            self.supervisor.restart(f"{what}: {type(error).__name__}")
            return WorkerFailure(FailureKind.LOST, type(error).__name__)
        logger.error("%s failed inside the actor: %s", what, error)
        self.requeue()
        return WorkerFailure(FailureKind.ERROR, f"{type(error).__name__}: {error}")


class DrafterHandle(_Handle):
    """Calls to one drafter actor; ``submit`` sends, ``collect`` waits."""

    def __init__(self, name: str, spawn: Callable[[], object], *, call_timeout_s: float = 60.0,
                 budget: RestartBudget | None = None):
        super().__init__(ActorSupervisor(f"drafter {name!r}", spawn, budget=budget), call_timeout_s)
        self.name = name
        self._observed: list[list[int]] = []
        self._sent_observed: list[list[int]] = []  # observations sent with the call in flight

    @property
    def learns(self) -> bool:
        return self.info.get("learns", True)

    def observe_output(self, tokens: Sequence[int]) -> None:
        if self.learns:
            self._observed.append(list(tokens))

    def prepare(self, calls: Sequence[DraftRequest]) -> bytes | None:
        """The ``propose`` payload (queued housekeeping rides along), or None when the
        actor cannot take a call now (restarting): the scheduler is told UNAVAILABLE."""
        if not self._ready():
            return None
        self._sent_observed, self._observed = self._observed, []
        return dumps((list(calls), self._take_releases(), self._sent_observed))

    def requeue(self) -> None:
        super().requeue()
        self._observed = self._sent_observed + self._observed
        self._sent_observed = []

    def submit(self, calls: Sequence[DraftRequest]):
        """Send the proposal call without waiting; None if the actor is not ready."""
        payload = self.prepare(calls)
        return None if payload is None else self.actor.propose.remote(payload)

    def submit_ahead(self, calls: Sequence[AheadCall], own_ref=None):
        """Send a pipelined round's ahead call (after ``own_ref``, this round's draft
        call, if any) without waiting; None if the actor is not ready. Housekeeping
        rides on the draft calls only."""
        if not self._ready():
            return None
        payload = dumps(list(calls))
        refs = () if own_ref is None else (own_ref,)
        return self.actor.propose_ahead.remote(payload, *refs)

    def collect(self, ref) -> DraftReply | WorkerFailure:
        if ref is None:
            return WorkerFailure(FailureKind.UNAVAILABLE, f"drafter {self.name!r} is restarting")
        import ray

        try:
            reply = pickle.loads(ray.get(ref, timeout=self.call_timeout_s))
        except Exception as exc:
            return self.classify(exc, f"drafter {self.name!r}")
        self._unconfirmed = []
        self.succeeded()
        return reply

    def flush(self) -> None:
        """Send queued releases and observations now and wait: a compiled round graph
        runs ``propose`` on another thread of the actor, so nothing may still be
        running here when the next round starts."""
        if self.alive and (self._releases or self._observed):
            _wait_quietly(self.actor.housekeeping.remote(self._take_releases(), self._observed))
        self._observed = []
        self._unconfirmed = []

    def needs_flush(self) -> bool:
        return len(self._releases) + len(self._observed) >= MAX_PIGGYBACK


class VerifierHandle(_Handle):
    """Calls to one verifier group's leader actor."""

    def __init__(self, spawn: Callable[[], object], *, group: int = 0, call_timeout_s: float = 120.0,
                 start_timeout_s: float = 300.0, budget: RestartBudget | None = None):
        super().__init__(ActorSupervisor(f"verifier group {group}", spawn, budget=budget), call_timeout_s)
        self.group = group
        self.start_timeout_s = start_timeout_s
        self._round = 0  # id of the last round sent (see VerifierActor.last_round)

    def wait_ready(self, timeout_s: float | None = None) -> dict:
        return super().wait_ready(timeout_s if timeout_s is not None else self.start_timeout_s)

    def round_payload(self, calls: Sequence[VerifyCall]) -> tuple[bytes, int]:
        """The ``verify`` payload of a new round (queued releases ride along) and its id."""
        self._round += 1
        return dumps((list(calls), self._take_releases(), self._round)), self._round

    def parse(self, reply: bytes) -> tuple[VerifyReply, list]:
        """A verify reply: the group's ``VerifyReply`` and one ``DraftSummary`` per
        drafter reply that was chained into it."""
        self._unconfirmed = []
        self.succeeded()
        return pickle.loads(reply)

    def recover(self, why: str) -> WorkerFailure:
        """Replace a lost verifier and wait for the new one (no round of this group can
        run without it); its requests are re-sent whole by the scheduler and keep every
        committed token. A replacement that dies while starting is replaced again after
        the budget's backoff; once the restart budget is spent (N failures within T
        seconds, or N in a row) the group is given up: ``WorkerUnavailable`` naming the
        group. The driver moves its requests to the other groups (the server answers
        UNAVAILABLE only when no group is left) until ``available`` says it is back: the
        oldest failure has left the window and a new actor has loaded."""
        self._releases, self._unconfirmed = [], []
        supervisor = self.supervisor
        while supervisor.restart(why):
            try:
                self.wait_ready()
                return WorkerFailure(FailureKind.LOST, why)
            except Exception as exc:  # the replacement died or failed to load
                why = f"its replacement failed to start ({type(exc).__name__})"
        raise WorkerUnavailable(f"verifier group {self.group} is unavailable after "
                                f"{supervisor.budget.describe()}; retry later", group=self.group)

    def available(self) -> bool:
        """True when the group can take rounds; never blocks. A given-up group starts a
        new actor once its restart budget allows (in the background), and is available
        again when that actor has loaded."""
        return self.supervisor.ready()

    def round_outcome(self, round_id: int, why: str) -> bytes | WorkerFailure:
        """After a failed compiled round: the round's reply if the verifier ran it, else
        the failure (its releases are re-queued; a lost verifier is recovered)."""
        import ray

        try:
            ran_id, reply = ray.get(self.actor.last_round.remote(), timeout=self.call_timeout_s)
        except failure_types():
            return self.recover(why)
        if ran_id == round_id:
            return reply
        self.requeue()
        return WorkerFailure(FailureKind.UNAVAILABLE, why)

    def flush(self) -> None:
        """Send queued releases now (the executor calls it when idle)."""
        if self._releases:
            _wait_quietly(self.actor.release.remote(self._take_releases()))
        self._unconfirmed = []
