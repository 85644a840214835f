"""The contracts between the scheduler and whatever runs its actions.

Where it sits: ``engine/scheduler.py`` plans a round as a ``RoundPlan`` (one per
verifier group): what each drafter is asked, and what the group's verifier checks.
An executor — in-process (``engine/executor.py``), Ray actors (``cluster/``), or a
simulated clock (``sim/``) — runs the plan and answers a ``RoundOutcome``, which the
scheduler consumes as events. Only ids, token deltas, proposals and timings cross
this boundary; tensors and KV caches stay inside the workers.

The position contract (drafters and verifiers alike): each call says where the
worker's view of the request must be truncated (``position``, a committed length)
and which committed tokens follow (``new_tokens``). A worker keeps its own
per-request state (a KV cache, an index) and never needs more than that delta —
which is also how a replaced worker is resynchronised: the scheduler resends from
position 0. Failures are values (``WorkerFailure``), never exceptions across the seam.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from specfleet.core.types import DraftProposal, DraftRequest, SamplingParams, VerifyResult


class FailureKind(str, Enum):
    UNAVAILABLE = "unavailable"  # the worker is (re)starting: nothing ran, its state is intact or rebuilt later
    LOST = "lost"  # the worker died or hung and was replaced: all its per-request state is gone
    ERROR = "error"  # the call raised inside a live worker: state of the call's requests is suspect


class WorkerUnavailable(RuntimeError):
    """A worker could not be brought back within its retry budget.

    ``group``: the verifier group given up, when one is (None: the whole step failed).
    The driver then moves that group's requests to the other groups, and only when no
    group is left do servers answer them UNAVAILABLE. ``outcomes``: what the step's
    other plans returned (an executor finishes them before raising, so nothing they
    committed is lost). The message is short and shown to clients."""

    def __init__(self, message: str, *, group: int | None = None,
                 outcomes: Sequence[RoundOutcome] = ()):
        super().__init__(message)
        self.group = group
        self.outcomes = list(outcomes)

    def __reduce__(self):  # keyword-only fields: pickled as state, not as arguments
        return type(self), (str(self),), {"group": self.group, "outcomes": self.outcomes}


@dataclass(frozen=True)
class WorkerFailure:
    """Why a call has no reply."""

    kind: FailureKind
    message: str  # one line, for logs (never shown to clients as is)


@dataclass(frozen=True)
class DraftReply:
    """One drafter's answer for one round."""

    proposals: list[DraftProposal]  # one per call, same order; empty proposals are fine
    compute_ns: int = 0  # the drafter's own time for the call
    # Requests the worker held no state for although the call assumed it did (a
    # restarted actor): their proposals are empty and the scheduler resends them whole.
    unknown: tuple[str, ...] = ()


@dataclass(frozen=True)
class FusionPlan:
    """How the verifier merges one request's proposals from several drafters into one
    token tree (``policy/fusion.py``). Planned by the scheduler, applied where the
    proposals meet — in the verifier, since drafter replies may go there directly."""

    # (drafter, reliability in (0, 1]) for every cooperating drafter, most trusted first:
    # a node's confidence is its drafter's probability times this weight.
    reliability: tuple[tuple[str, float], ...]
    max_nodes: int  # node budget of the fused tree


@dataclass(frozen=True)
class VerifyCall:
    """One request's part of a verify call (the verifier's position contract)."""

    request_id: str
    position: int  # committed tokens the verifier was told before ``new_tokens``
    new_tokens: list[int]  # committed tokens since (the whole prompt the first time)
    sampling: SamplingParams  # the request's decoding parameters (the verifier samples)
    # The draft to check. None: take it from this round's drafter replies (the
    # executor may ship those straight from drafter to verifier); no draft = plain step.
    proposal: DraftProposal | None = None
    # Several drafters proposed for this request: fuse their proposals this way. None:
    # at most one proposal is expected (the first one found is used).
    fusion: FusionPlan | None = None


@dataclass(frozen=True)
class VerifyReply:
    """A verifier group's answer for one round: what the accept rule emitted per
    request. The scheduler, not the verifier, decides what is committed (stop rule,
    length cap); a later call's ``position`` tells the verifier what was kept."""

    results: list[VerifyResult]  # one per call, same order
    compute_ns: int = 0  # the verifier's own time for the call (forward + accept)
    # Requests the verifier held no state for although the call assumed it did (a
    # replaced actor): not verified (empty results); the scheduler re-sends them whole.
    unknown: tuple[str, ...] = ()


@dataclass(frozen=True)
class AheadCall:
    """Draft ahead while the round's verify runs (PEARL's post-verify): one request's
    call to the drafter, whose context is the committed tokens *plus the draft being
    verified*, as if it will all be accepted. ``request`` carries the position
    contract up to what is known when the round is planned; with ``after_own_draft``
    the drafter's own proposal for the request from this round's draft call (known
    only once drafted) follows ``request.new_tokens`` (``ahead_requests``)."""

    request: DraftRequest
    after_own_draft: bool = False


def ahead_requests(calls: Sequence[AheadCall], reply: DraftReply | None) -> list[DraftRequest]:
    """The ``DraftRequest``s of a drafter's ahead calls, once its draft call of the same
    round (``reply``; None if it made none) is known. A request whose own proposal is a
    tree, not a chain, has no single "as if accepted" context: it gets window 0."""
    own = {p.request_id: p for p in reply.proposals} if reply is not None else {}
    out = []
    for call in calls:
        req = call.request
        if call.after_own_draft:
            proposal = own.get(req.request_id)
            tokens = proposal.tokens if proposal is not None else []
            if proposal is not None and proposal.parents != DraftProposal.chain_parents(len(tokens)):
                out.append(DraftRequest(req.request_id, req.position, list(req.new_tokens), 0, req.sampling))
                continue
            req = DraftRequest(req.request_id, req.position, [*req.new_tokens, *tokens],
                               req.num_draft_tokens, req.sampling)
        out.append(req)
    return out


@dataclass(frozen=True)
class RoundPlan:
    """One speculation round of one verifier group, as the scheduler planned it."""

    round_id: int  # unique per scheduler; replies are matched to plans by it
    group: int  # verifier group index
    drafts: dict[str, list[DraftRequest]]  # drafter name → its calls (requests it drafts for)
    verify: list[VerifyCall]  # every request of the round, in batch order
    # Rounds the longest request of the group may still need (budget / tokens per
    # round so far): executors weigh one-off costs against it (compiling a graph).
    rounds_left: float = 0.0
    # Pipelined mode: drafter name → calls drafting the *next* window while this
    # round's verify runs (each after that drafter's ``drafts`` call, if any).
    ahead: dict[str, list[AheadCall]] = field(default_factory=dict)


@dataclass
class RoundOutcome:
    """What came back for one ``RoundPlan``; executors fill it, the scheduler reads it."""

    round_id: int
    group: int
    drafts: dict[str, DraftReply | WorkerFailure] = field(default_factory=dict)
    verify: VerifyReply | WorkerFailure | None = None
    wall_ns: int = 0  # launch → verify reply, as the executor measured it
    draft_ns: int = 0  # drafting on the critical path (sum if drafters ran one after another)
    draft_positions: int = 0  # sequential draft positions that took draft_ns (for c = draft/verify)
    ahead: dict[str, DraftReply | WorkerFailure] = field(default_factory=dict)  # the plan's ahead calls


@dataclass(frozen=True)
class Housekeeping:
    """Work the scheduler owes the workers once requests end; executors piggy-back it
    on the next call to each worker (a release costs no round trip of its own)."""

    verifier_releases: dict[int, list[str]]  # group → request ids to free
    drafter_releases: dict[str, list[str]]  # drafter → request ids to free
    observed: list[list[int]]  # finished sequences, for drafters that learn across requests

    @property
    def empty(self) -> bool:
        return not (any(self.verifier_releases.values()) or any(self.drafter_releases.values())
                    or self.observed)

    def deliver(self, drafters: Mapping[str, DraftWorker],
                verifiers: Sequence[VerifyWorker]) -> None:
        """Hand each worker (or worker handle) its share: releases to whoever holds the
        request, finished sequences to every drafter. Executors differ only in how
        their workers send it on, so the dispatch lives here once."""
        for group, request_ids in self.verifier_releases.items():
            verifiers[group].release(request_ids)
        for name, request_ids in self.drafter_releases.items():
            drafters[name].release(request_ids)
        for tokens in self.observed:
            for drafter in drafters.values():
                drafter.observe_output(tokens)


def run_each(plans: Sequence[RoundPlan], run: Callable[[RoundPlan], RoundOutcome]) -> list[RoundOutcome]:
    """``run(plan)`` for every plan, in order, for executors' ``run_rounds``. A group
    given up (``WorkerUnavailable``) does not cost the other plans their outcomes: they
    are finished, and ride on the ``WorkerUnavailable`` of the first group given up (a
    second one given up in the same step answers a failure, and raises next step)."""
    outcomes: list[RoundOutcome] = []
    given_up: WorkerUnavailable | None = None
    for plan in plans:
        try:
            outcomes.append(run(plan))
        except WorkerUnavailable as exc:
            if exc.group is None:
                raise  # the whole step failed
            if given_up is None:
                given_up = exc
            else:
                outcomes.append(RoundOutcome(plan.round_id, plan.group,
                                             verify=WorkerFailure(FailureKind.UNAVAILABLE, str(exc))))
    if given_up is not None:
        raise WorkerUnavailable(str(given_up), group=given_up.group, outcomes=outcomes) from given_up
    return outcomes


class DraftWorker(Protocol):
    """A drafter as the in-process executor sees it."""

    name: str

    def propose(self, calls: Sequence[DraftRequest]) -> Future[DraftReply]: ...

    def release(self, request_ids: Sequence[str]) -> None: ...

    def observe_output(self, tokens: Sequence[int]) -> None: ...


class VerifyWorker(Protocol):
    """A verifier group's leader as the in-process executor sees it."""

    def verify(self, calls: Sequence[VerifyCall], drafts: Sequence[DraftReply]) -> Future[VerifyReply]: ...

    def release(self, request_ids: Sequence[str]) -> None: ...


class Executor(Protocol):
    """Runs plans and reports outcomes; knows nothing of requests beyond the calls."""

    def run_rounds(self, plans: Sequence[RoundPlan]) -> list[RoundOutcome]:
        """Run every plan (different groups may run side by side) and wait for all."""
        ...

    def housekeeping(self, work: Housekeeping) -> None: ...

    def add_drafter(self, name: str, worker) -> None:
        """A drafter joins between rounds (its worker is ready)."""
        ...

    def remove_drafter(self, name: str):
        """A drafter leaves between rounds; returns its worker for the caller to stop."""
        ...

    def idle(self) -> None:
        """Nothing to run for a while: release what is held between rounds."""
        ...


class _Completed:
    """The part of ``Future`` a caller of an in-process worker uses, already done.
    (A real ``Future`` builds a lock and a condition: ~5 µs per call, on every round.)"""

    __slots__ = ("_value",)

    def __init__(self, value):
        self._value = value

    def done(self) -> bool:
        return True

    def result(self, timeout: float | None = None):
        return self._value


def completed(value) -> Future:
    """A future that is already done (in-process workers answer synchronously)."""
    return _Completed(value)  # type: ignore[return-value]
