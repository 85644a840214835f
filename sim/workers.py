"""Simulated draft and verify workers: the worker contracts without a model.

Where it sits: the simulator's executor (``executor.py``) hands them the calls of a
``RoundPlan`` exactly as the in-process executor hands real drafters and verifiers
theirs (``core/workers.py``: ``DraftWorker.propose`` → ``DraftReply``,
``VerifyWorker.verify`` → ``VerifyReply``). They keep per-request state by the
position contract and *check* it (a call at a position the worker does not hold is
answered "unknown", as a restarted actor would), so a scheduler that sends a wrong
delta behaves the same here as against real workers.

Tokens are synthetic (the simulated target has no vocabulary); what matters is how
many are accepted, which the ``AcceptanceModel`` decides per request and round, and
how long each call takes, which the executor asks the ``StepTimeModel``. A verify
call may carry several drafters' proposals for one request (cooperative drafting):
each chain is judged by its own drafter's curve and the longest accepted one wins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import Future

from specfleet.core.types import ROOT, DraftProposal, DraftRequest, VerifyResult
from specfleet.core.workers import DraftReply, VerifyCall, VerifyReply, completed
from specfleet.sim.acceptance import AcceptanceModel

DRAFT_TOKEN = 1  # every synthetic draft token; the target "emits" it too when it accepts
TARGET_TOKEN = 2  # the recovered/bonus token


class SimDraftWorker:
    """A ``DraftWorker`` that proposes ``window`` synthetic tokens per call."""

    def __init__(self, name: str):
        self.name = name
        self.lengths: dict[str, int] = {}  # request → committed tokens held (the position contract)
        self.last_new_tokens = 0  # of the latest call, for the step-time model
        self.last_context = 0

    def propose(self, calls: Sequence[DraftRequest]) -> Future[DraftReply]:
        proposals, unknown = [], []
        new_tokens = context = 0
        name = self.name
        lengths = self.lengths
        for call in calls:
            rid = call.request_id
            if call.position > lengths.get(rid, 0):
                unknown.append(rid)
                proposals.append(DraftProposal.empty(rid, name))
                continue
            new = len(call.new_tokens)
            length = lengths[rid] = call.position + new
            new_tokens += new
            context += length
            n = call.num_draft_tokens
            proposals.append(DraftProposal(rid, [DRAFT_TOKEN] * n, list(range(ROOT, n - 1)),
                                           [1.0] * n, None, name))
        self.last_new_tokens, self.last_context = new_tokens, context
        return completed(DraftReply(proposals, 0, tuple(unknown)))

    def release(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            self.lengths.pop(rid, None)

    def observe_output(self, tokens: Sequence[int]) -> None:
        """Simulated drafters learn nothing across requests (curves are fixed)."""


class SimVerifyWorker:
    """A ``VerifyWorker`` whose accept decisions come from an ``AcceptanceModel``."""

    def __init__(self, acceptance: AcceptanceModel, domain_of: Mapping[str, str]):
        self.acceptance = acceptance
        self.domain_of = domain_of  # request → its workload domain (what the curves are keyed by)
        self.lengths: dict[str, int] = {}
        self.rounds: dict[str, int] = {}  # request → rounds verified so far (the trace index)
        self.last_tokens = 0  # new tokens of the latest call (delta + drafts), for the step-time model
        self.last_context = 0

    def verify(self, calls: Sequence[VerifyCall], drafts: Sequence[DraftReply] = ()) -> Future[VerifyReply]:
        # The hot path of a simulation (every request, every round): plain loops, locals.
        by_request: dict[str, list[DraftProposal]] = {}
        for reply in drafts:
            for p in reply.proposals:
                if p.tokens:
                    got = by_request.get(p.request_id)
                    if got is None:
                        by_request[p.request_id] = [p]
                    else:
                        got.append(p)
        results, unknown = [], []
        tokens = context = 0
        lengths, rounds, domain_of = self.lengths, self.rounds, self.domain_of
        accept = self.acceptance.accepted
        for call in calls:
            rid = call.request_id
            if call.position > lengths.get(rid, 0):
                unknown.append(rid)
                results.append(VerifyResult.unverified(rid))
                continue
            length = lengths[rid] = call.position + len(call.new_tokens)
            proposals = by_request.get(rid, ()) if call.proposal is None else (call.proposal,)
            round_index = rounds.get(rid, 0)
            rounds[rid] = round_index + 1
            best, drafted, new = 0, 0, len(call.new_tokens)
            domain = domain_of.get(rid, "prose")
            for p in proposals:
                window = chain_length(p)
                new += len(p.tokens)
                if window:
                    if window > drafted:
                        drafted = window
                    a = accept(rid, drafter=p.drafter, domain=domain, round_index=round_index,
                               window=window)
                    if a > best:
                        best = a
            # The KV now holds the committed tokens; what the scheduler keeps of the
            # emitted ones arrives with the next call's position.
            tokens += new
            context += length
            results.append(VerifyResult(rid, [DRAFT_TOKEN] * best + [TARGET_TOKEN], best, drafted,
                                        list(range(best))))
        self.last_tokens, self.last_context = tokens, context
        return completed(VerifyReply(results, 0, tuple(unknown)))

    def release(self, request_ids: Sequence[str]) -> None:
        for rid in request_ids:
            self.lengths.pop(rid, None)
            self.rounds.pop(rid, None)
            forget = getattr(self.acceptance, "forget", None)
            if forget is not None:
                forget(rid)


def chain_length(proposal: DraftProposal) -> int:
    """Depth of a proposal's deepest path (its length for a chain)."""
    parents = proposal.parents
    n = len(parents)
    if parents == list(range(ROOT, n - 1)):  # a chain (the common case): compared in C
        return n
    depth: list[int] = []
    for parent in proposal.parents:
        depth.append(1 if parent == ROOT else depth[parent] + 1)
    return max(depth, default=0)
