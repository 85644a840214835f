"""Scripted workers and executor: the scheduler's world without a model or Ray.

Where it sits: scheduler unit tests (``tests/unit/test_scheduler.py``) drive the
real ``Scheduler`` through the real ``EngineDriver`` with these instead of torch
drafters, verifiers and actors; the simulator can reuse them. They follow the same
position contract (``core/workers.py``) as the real workers and *check* it: a
worker told a position it does not hold answers "unknown", and one told wrong tokens
computes wrong continuations — so a scheduler that sends a wrong delta shows up as
an output that differs from ``reference_output``.

The "target" is a pure function ``next_token(sequence) -> token``; drafters guess it
right or wrong by a rule, so tests choose exactly which draft positions are accepted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

from specfleet.core.clock import ManualClock
from specfleet.core.stopping import StopChecker
from specfleet.core.types import ROOT, DraftProposal, DraftRequest, SamplingParams, VerifyResult
from specfleet.core.workers import (
    DraftReply,
    FailureKind,
    Housekeeping,
    RoundOutcome,
    RoundPlan,
    VerifyCall,
    VerifyReply,
    WorkerFailure,
    WorkerUnavailable,
    completed,
    run_each,
)
from specfleet.policy.fusion import credit, fuse

NextToken = Callable[[Sequence[int]], int]


def toy_target(vocab: int = 50) -> NextToken:
    """A deterministic "model": the next token is a hash of the last two."""

    def next_token(seq: Sequence[int]) -> int:
        a = seq[-1] if seq else 0
        b = seq[-2] if len(seq) > 1 else 0
        return (a * 31 + b * 7 + 3) % vocab

    return next_token


def reference_output(next_token: NextToken, prompt: Sequence[int], sampling: SamplingParams,
                     eos_token_ids: Sequence[int] = (), decode=None) -> list[int]:
    """What plain greedy decoding of the toy target commits (the stop rule included)."""
    stop = StopChecker(sampling, frozenset(eos_token_ids), decode)
    seq, generated = list(prompt), []
    while True:
        token = next_token(seq)
        committed, finish = stop.commit(generated, [token])
        generated += committed
        seq += committed
        if finish is not None:
            return generated


@dataclass
class ScriptedDrafter:
    """A ``DraftWorker`` that guesses the toy target; ``wrong_at(request_id, position)``
    says which draft positions (0-based within the window) it gets wrong."""

    name: str
    next_token: NextToken
    wrong_at: Callable[[str, int], bool] = lambda request_id, k: False
    ns_per_token: int = 0  # the compute time its replies report, per drafted token
    calls: list[list[DraftRequest]] = field(default_factory=list)  # every call, in order
    state: dict[str, list[int]] = field(default_factory=dict)  # per request: committed, as told
    released: list[str] = field(default_factory=list)
    observed: list[list[int]] = field(default_factory=list)

    def propose(self, calls: Sequence[DraftRequest]) -> Future[DraftReply]:
        self.calls.append(list(calls))
        proposals, unknown = [], []
        for call in calls:
            seq = self.state.get(call.request_id)
            if seq is None and call.position > 0 or seq is not None and call.position > len(seq):
                unknown.append(call.request_id)
                proposals.append(DraftProposal.empty(call.request_id, self.name))
                continue
            seq = self.state.setdefault(call.request_id, [])
            del seq[call.position :]
            seq.extend(call.new_tokens)
            guess, tokens = list(seq), []
            for k in range(call.num_draft_tokens):
                token = self.next_token(guess)
                if self.wrong_at(call.request_id, k):
                    token = (token + 1) % 50
                tokens.append(token)
                guess.append(token)
            proposals.append(DraftProposal(call.request_id, tokens, DraftProposal.chain_parents(len(tokens)),
                                           [1.0] * len(tokens), None, self.name))
        compute_ns = self.ns_per_token * sum(len(p) for p in proposals)
        return completed(DraftReply(proposals, compute_ns, tuple(unknown)))

    def release(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            self.state.pop(request_id, None)
            self.released.append(request_id)

    def observe_output(self, tokens: Sequence[int]) -> None:
        self.observed.append(list(tokens))

    def lose_state(self) -> None:
        """What a restarted actor holds: nothing."""
        self.state.clear()


@dataclass
class ScriptedVerifier:
    """A ``VerifyWorker`` over the toy target: greedy accept along a chain or a tree.
    Several drafters' proposals for a request are fused as the real verifier does
    (``policy/fusion.py``) when the call carries a fusion plan, and credited per drafter."""

    next_token: NextToken
    calls: list[list[VerifyCall]] = field(default_factory=list)
    state: dict[str, list[int]] = field(default_factory=dict)
    released: list[str] = field(default_factory=list)

    def verify(self, calls: Sequence[VerifyCall], drafts: Sequence[DraftReply] = ()) -> Future[VerifyReply]:
        self.calls.append(list(calls))
        drafted: dict[str, list[DraftProposal]] = {}
        for reply in drafts:
            for p in reply.proposals:
                drafted.setdefault(p.request_id, []).append(p)
        results, unknown = [], []
        for call in calls:
            seq = self.state.get(call.request_id)
            if seq is None and call.position > 0 or seq is not None and call.position > len(seq):
                unknown.append(call.request_id)
                results.append(VerifyResult.unverified(call.request_id))
                continue
            seq = self.state.setdefault(call.request_id, [])
            del seq[call.position :]
            seq.extend(call.new_tokens)
            proposal = call.proposal or _one_tree(call, drafted.get(call.request_id, []))
            emitted, guess, path, node = [], list(seq), [], ROOT
            while True:  # walk down the child that matches the target's token
                want = self.next_token(guess)
                child = next((i for i, (t, p) in enumerate(zip(proposal.tokens, proposal.parents))
                              if p == node and t == want), None)
                emitted.append(want)
                guess.append(want)
                if child is None:
                    break
                path.append(child)
                node = child
            depth = _depth(proposal.parents)
            results.append(VerifyResult(call.request_id, emitted, len(path), max(depth, default=0), path,
                                        credit=credit(proposal, path) if len(proposal) else {}))
        return completed(VerifyReply(results, 0, tuple(unknown)))

    def release(self, request_ids: Sequence[str]) -> None:
        for request_id in request_ids:
            self.state.pop(request_id, None)
            self.released.append(request_id)

    def lose_state(self) -> None:
        self.state.clear()


def _one_tree(call: VerifyCall, proposals: list[DraftProposal]) -> DraftProposal:
    proposals = [p for p in proposals if len(p)]
    if not proposals:
        return DraftProposal.empty(call.request_id)
    if call.fusion is None or len(proposals) == 1:
        return proposals[0]
    return fuse(call.request_id, proposals, call.fusion)


def _depth(parents: Sequence[int]) -> list[int]:
    depth: list[int] = []
    for parent in parents:
        depth.append(1 if parent == ROOT else depth[parent] + 1)
    return depth


class ScriptedExecutor:
    """Runs plans on scripted workers and moves a ``ManualClock`` by scripted costs.

    Failures are injected per call: ``fail_draft[name] = kind`` makes the next call to
    that drafter fail, ``fail_verify[group] = kind`` the next verify of that group;
    ``LOST`` also wipes the worker's state, as a replaced actor would. A group in
    ``given_up`` is past its restart budget: its verify raises
    ``WorkerUnavailable(group=g)`` (its worker's state wiped) and ``group_available``
    says False until the test takes it out again.
    """

    def __init__(self, drafters: Mapping[str, ScriptedDrafter], verifiers: Sequence[ScriptedVerifier],
                 clock: ManualClock | None = None, *, draft_ns_per_token: int = 1_000,
                 verify_ns: int = 10_000):
        self.drafters = dict(drafters)
        self.verifiers = list(verifiers)
        self.clock = clock
        self.draft_ns_per_token = draft_ns_per_token
        self.verify_ns = verify_ns
        self.plans: list[RoundPlan] = []
        self.fail_draft: dict[str, FailureKind] = {}
        self.fail_verify: dict[int, FailureKind] = {}
        self.given_up: set[int] = set()
        self.idled = 0

    def group_available(self, group: int) -> bool:
        return group not in self.given_up

    def run_rounds(self, plans: Sequence[RoundPlan]) -> list[RoundOutcome]:
        outcomes: list[RoundOutcome] = []
        try:
            return run_each(plans, lambda plan: self._run(plan, outcomes))
        finally:
            if self.clock is not None:  # groups run side by side: the step takes the slowest
                self.clock.advance(max((o.wall_ns for o in outcomes), default=0))

    def _run(self, plan: RoundPlan, outcomes: list[RoundOutcome]) -> RoundOutcome:
        self.plans.append(plan)
        outcome = RoundOutcome(plan.round_id, plan.group)
        replies = []
        for name, calls in plan.drafts.items():
            kind = self.fail_draft.pop(name, None)
            if kind is not None:
                if kind == FailureKind.LOST:
                    self.drafters[name].lose_state()
                outcome.drafts[name] = WorkerFailure(kind, "injected")
                continue
            reply = self.drafters[name].propose(calls).result()
            outcome.drafts[name] = reply
            replies.append(reply)
            positions = max((len(p) for p in reply.proposals), default=0)
            outcome.draft_positions += positions
            outcome.draft_ns += positions * self.draft_ns_per_token
        if plan.group in self.given_up:
            self.verifiers[plan.group].lose_state()
            raise WorkerUnavailable(f"verifier group {plan.group} is unavailable", group=plan.group)
        kind = self.fail_verify.pop(plan.group, None)
        if kind is not None:
            if kind == FailureKind.LOST:
                self.verifiers[plan.group].lose_state()
            outcome.verify = WorkerFailure(kind, "injected")
        else:
            reply = self.verifiers[plan.group].verify(plan.verify, replies).result()
            outcome.verify = VerifyReply(reply.results, self.verify_ns, reply.unknown)
        outcome.wall_ns = outcome.draft_ns + self.verify_ns
        outcomes.append(outcome)
        return outcome

    def add_drafter(self, name: str, worker: ScriptedDrafter) -> None:
        self.drafters[name] = worker

    def remove_drafter(self, name: str) -> ScriptedDrafter:
        return self.drafters.pop(name)

    def housekeeping(self, work: Housekeeping) -> None:
        work.deliver(self.drafters, self.verifiers)

    def idle(self) -> None:
        self.idled += 1
