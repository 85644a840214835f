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
        for call in calls:
            held = self.lengths.get(call.request_id)
            if call.position > (held or 0):
                unknown.append(call.request_id)
                proposals.append(DraftProposal.empty(call.request_id, name))
                continue
            length = self.lengths[call.request_id] = call.position + len(call.new_tokens)
            new_tokens += len(call.new_tokens)
            context += length
            n = call.num_draft_tokens
            proposals.append(DraftProposal(call.request_id, [DRAFT_TOKEN] * n,
                                           [ROOT, *range(n - 1)] if n else [], [1.0] * n, None, name))
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
        by_request: dict[str, list[DraftProposal]] = {}
        for reply in drafts:
            for p in reply.proposals:
                if p.tokens:
                    by_request.setdefault(p.request_id, []).append(p)
        results, unknown = [], []
        tokens = context = 0
        for call in calls:
            rid = call.request_id
            held = self.lengths.get(rid)
            if call.position > (held or 0):
                unknown.append(rid)
                results.append(VerifyResult.unverified(rid))
                continue
            length = call.position + len(call.new_tokens)
            proposals = [call.proposal] if call.proposal is not None else by_request.get(rid, [])
            round_index = self.rounds.get(rid, 0)
            self.rounds[rid] = round_index + 1
            best_accepted, drafted = 0, 0
            domain = self.domain_of.get(rid, "prose")
            for p in proposals:
                window = chain_length(p)
                if window == 0:
                    continue
                drafted = max(drafted, window)
                a = self.acceptance.accepted(rid, drafter=p.drafter, domain=domain,
                                             round_index=round_index, window=window)
                best_accepted = max(best_accepted, a)
            # The verifier's KV now holds the committed tokens; what the scheduler keeps
            # of the emitted ones arrives with the next call's position.
            self.lengths[rid] = length
            tokens += len(call.new_tokens) + sum(len(p) for p in proposals)
            context += length
            results.append(VerifyResult(rid, [DRAFT_TOKEN] * best_accepted + [TARGET_TOKEN],
                                        best_accepted, drafted, list(range(best_accepted))))
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
    depth: list[int] = []
    for parent in proposal.parents:
        depth.append(1 if parent == ROOT else depth[parent] + 1)
    return max(depth, default=0)
