"""Pipelined speculation (PEARL): the drafter drafts the next window while the
verifier checks this one.

Where it sits: a ``Scheduler`` (``engine/scheduler.py``) with one difference in
planning and one in reading outcomes; the driver, executors and workers are the
lockstep ones. Lockstep, a round costs ``t_draft(γ) + t_verify`` and each side idles
while the other works. Here every round of a single-drafter request also carries an
*ahead call* (``core/workers.py: AheadCall``): the drafter drafts window k+1 from the
committed tokens plus window k's draft, as if window k will be accepted whole
(PEARL's post-verify), while the verifier checks window k. When the verify reply
accepts all of window k and its bonus token is the ahead draft's first token, the
rest of the ahead draft is exactly a draft from the new committed tokens: the next
round verifies it at once, with no drafting on the critical path. Otherwise the
ahead draft is dropped and the next round starts cold: a first draft (PEARL's pre-verify: one token, verified while the
drafter goes on ahead of it, when drafting is dear; the whole window when it is
cheap — ``policy/draft_length.py: cold_window``), then warm rounds again.

Exactness: a draft is only ever *checked* by the target's accept rule, and an ahead
draft is used only when its context is the committed sequence, so the output is the
target's (greedy) or the keyed sampler's (``core/sampling.py``: output depends on
prompt, parameters and seed only) whether or not a window was pre-drafted. Drafters
never learn anything was speculative: the position contract rolls them back (a
drafter told ``committed + draft`` is next told to truncate at the first token the
verifier did not keep).

What is pipelined: requests with one drafter in the round. Cooperating teams (a
fused tree, ``policy/fusion.py``) and tree proposals run lockstep, as do rounds of
executors that do not run ahead calls (then no ahead draft ever comes back and each
round is a cold one: still exact). Cohorts over verifier groups are not built yet.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from specfleet.core.types import DraftProposal, DraftRequest
from specfleet.core.workers import (
    AheadCall,
    DraftReply,
    FailureKind,
    RoundOutcome,
    RoundPlan,
    VerifyReply,
)
from specfleet.engine.scheduler import DRAFTER_DOWN_NS, Scheduler, _Request
from specfleet.policy.draft_length import cold_window


@dataclass
class _Ahead:
    """What one request's round sent ahead: the drafter, and the draft being verified
    (None: this round's own draft call, known only from the verify reply)."""

    drafter: str
    verified: list[int] | None
    committed: int  # committed tokens when the round was planned


@dataclass
class _Pending:
    """An ahead draft that holds: it continues exactly ``at`` committed tokens."""

    drafter: str
    at: int
    proposal: DraftProposal


class PipelinedScheduler(Scheduler):
    def __init__(self, *args, first_window: int = 0, **kwargs):
        """``first_window``: the draft of a cold round (after a rejection), verified
        while the drafter drafts ahead of it; 1 is PEARL's pre-verify; 0 chooses from
        the measured draft/verify cost (``policy/draft_length.py: cold_window``)."""
        super().__init__(*args, **kwargs)
        if first_window < 0:
            raise ValueError(f"first_window: must be >= 0, got {first_window}")
        self.first_window = first_window
        self.cost_ratio = 0.1  # draft token / verify, measured from outcomes (prior until then)
        self.pipeline_hits = 0  # rounds whose draft was drafted during the previous round
        self.pipeline_rounds = 0  # request-rounds that sent a draft ahead
        self._pending: dict[str, _Pending] = {}
        # (request, drafter) → (seen, spec): the drafter was told req.tokens[:seen] + spec
        # (spec: a draft being verified). Valid only while drafter_seen is still seen.
        self._spec: dict[tuple[str, str], tuple[int, list[int]]] = {}
        self._ahead_of_round: dict[int, dict[str, _Ahead]] = {}
        self._building: tuple[dict[str, list[AheadCall]], dict[str, _Ahead]] | None = None

    # ---- planning ----------------------------------------------------------------------
    def _plan(self, group, requests, now_ns, load) -> RoundPlan:
        self._building = ({}, {})
        try:
            plan = super()._plan(group, requests, now_ns, load)
            calls, aheads = self._building
        finally:
            self._building = None
        if aheads:
            self._ahead_of_round[plan.round_id] = aheads
            self.pipeline_rounds += len(aheads)
            plan = dataclasses.replace(plan, ahead=calls)
        return plan

    def _draft(self, req: _Request, team, window: int, drafts) -> DraftProposal | None:
        if len(team) != 1 or self._building is None:
            return super()._draft(req, team, window, drafts)
        name = team[0][0]
        rid = req.request_id
        self._advance_view(req, name)
        pending = self._pending.pop(rid, None)
        committed = len(req.tokens)
        calls, aheads = self._building
        if pending is not None and pending.drafter == name and pending.at == committed:
            proposal = _chain_slice(pending.proposal, 0, window)
            verified = list(proposal.tokens)
            self.pipeline_hits += 1
            seen = req.drafter_seen.get(name, 0)
            context = [*req.tokens[seen:], *verified]
            ahead_window = self._ahead_window(req, window, len(verified))
            if ahead_window < 2:  # the request ends within this window: the drafter is not called
                return proposal
            ahead = DraftRequest(rid, seen, context, ahead_window, req.sampling)
            calls.setdefault(name, []).append(AheadCall(ahead))
        else:
            proposal, verified = None, None
            first = cold_window(window, self.cost_ratio, self.first_window)
            ahead_window = self._ahead_window(req, window, first)
            if ahead_window < 2:  # nothing worth drafting ahead: a lockstep round
                first = window
            seen = req.drafter_seen.get(name, 0)
            drafts.setdefault(name, []).append(
                DraftRequest(rid, seen, req.tokens[seen:], first, req.sampling))
            if ahead_window >= 2:
                ahead = DraftRequest(rid, committed, [], ahead_window, req.sampling)
                calls.setdefault(name, []).append(AheadCall(ahead, after_own_draft=True))
        req.drafter_seen[name] = committed
        if ahead_window >= 2:
            self._spec[(rid, name)] = (committed, verified or [])  # a cold draft's: learnt later
            aheads[rid] = _Ahead(name, verified, committed)
        return proposal

    @staticmethod
    def _ahead_window(req: _Request, window: int, drafted: int) -> int:
        """Tokens to draft ahead: the next round's window (this round's, within the
        client's cap) plus the bonus position it is checked against, within what the
        request may still emit after this round."""
        room = req.sampling.max_new_tokens - len(req.generated) - drafted - 1
        return max(0, min(window + 1, room))

    def _advance_view(self, req: _Request, name: str) -> None:
        """What the drafter was told beyond the committed prefix and was then
        committed is part of its committed view: it need not be sent again."""
        told = self._spec.pop((req.request_id, name), None)
        seen = req.drafter_seen.get(name, 0)
        if told is None or told[0] != seen or not told[1]:  # reset since (a failure): re-sent whole
            return
        spec = told[1]
        tail = req.tokens[seen:seen + len(spec)]
        same = next((i for i, (a, b) in enumerate(zip(spec, tail)) if a != b), min(len(spec), len(tail)))
        req.drafter_seen[name] = seen + same

    # ---- events ------------------------------------------------------------------------
    def on_round_done(self, outcome: RoundOutcome, now_ns: int) -> None:
        aheads = self._ahead_of_round.pop(outcome.round_id, {})
        rnd = self._rounds.get(outcome.round_id)
        for name, reply in outcome.ahead.items():
            if not isinstance(reply, DraftReply):
                self._ahead_failed(name, aheads, reply)
            elif rnd is not None and name not in outcome.drafts:
                # The round's draft was drafted ahead, last round: that is its cost.
                rnd.draft_ns[name] = reply.compute_ns
        super().on_round_done(outcome, now_ns)
        if aheads and isinstance(outcome.verify, VerifyReply):
            self._take_aheads(outcome, aheads)
        if not isinstance(outcome.verify, VerifyReply) or outcome.verify.compute_ns <= 0:
            return
        sample = None
        if outcome.draft_positions:
            sample = outcome.draft_ns / outcome.draft_positions
        replies = [r for r in outcome.ahead.values() if isinstance(r, DraftReply)]
        positions = max((len(p) for r in replies for p in r.proposals), default=0)
        if positions and not outcome.drafts:
            # Every draft of the round was made ahead: its timing still feeds c.
            sample = max(r.compute_ns for r in replies) / positions
            self.draft_length.observe_timing(sample, outcome.verify.compute_ns, now_ns=now_ns)
        if sample is not None:
            self.cost_ratio = 0.8 * self.cost_ratio + 0.2 * sample / outcome.verify.compute_ns

    def on_verify_done(self, round_id: int, reply, now_ns: int) -> None:
        # Reached directly (not through on_round_done) when a whole step failed: the
        # round's ahead bookkeeping goes with it (what the drafters were told stays
        # valid: nothing was committed).
        self._ahead_of_round.pop(round_id, None)
        super().on_verify_done(round_id, reply, now_ns)

    def _ahead_failed(self, name: str, aheads: dict[str, _Ahead], reply) -> None:
        """A failed ahead call: its requests are re-sent whole to that drafter."""
        if name not in self.drafters:
            return
        self.stats.draft_failures[name] += 1
        if reply.kind != FailureKind.ERROR:
            self._down_until[name] = self._now_ns + DRAFTER_DOWN_NS
        for rid, ahead in aheads.items():
            req = self._by_id.get(rid)
            if ahead.drafter == name and req is not None:
                req.drafter_seen[name] = 0
                self._spec.pop((rid, name), None)

    def _take_aheads(self, outcome: RoundOutcome, aheads: dict[str, _Ahead]) -> None:
        results = {r.request_id: r for r in outcome.verify.results}
        drafted = {}
        for name, reply in outcome.ahead.items():
            if isinstance(reply, DraftReply):
                for rid in reply.unknown:
                    req = self._by_id.get(rid)
                    if req is not None:
                        req.drafter_seen[name] = 0
                        self._spec.pop((rid, name), None)
                drafted[name] = {p.request_id: p for p in reply.proposals}
        for rid, ahead in aheads.items():
            req, result = self._by_id.get(rid), results.get(rid)
            if req is None or result is None or not result.emitted:
                continue
            n = result.num_drafted
            whole = (result.num_accepted == n and len(result.emitted) == n + 1
                     and len(req.tokens) == ahead.committed + n + 1)  # nothing cut by a stop
            told = self._spec.get((rid, ahead.drafter))
            if ahead.verified is None and told is not None:
                # A cold round: the drafter was told its own draft; known now if accepted.
                self._spec[(rid, ahead.drafter)] = (told[0], list(result.emitted[:n]) if whole else [])
            proposal = drafted.get(ahead.drafter, {}).get(rid)
            if (whole and proposal is not None and len(proposal) >= 2
                    and proposal.parents == DraftProposal.chain_parents(len(proposal))
                    and proposal.tokens[0] == result.emitted[-1]):
                self._pending[rid] = _Pending(ahead.drafter, len(req.tokens), _chain_slice(proposal, 1))

    def _finish(self, req: _Request, reason, *, error=None) -> None:
        self._pending.pop(req.request_id, None)
        for name in req.drafter_seen:
            self._spec.pop((req.request_id, name), None)
        super()._finish(req, reason, error=error)

    def remove_drafter(self, name: str) -> None:
        super().remove_drafter(name)
        for rid in [rid for rid, p in self._pending.items() if p.drafter == name]:
            del self._pending[rid]
        for key in [k for k in self._spec if k[1] == name]:
            del self._spec[key]


def _chain_slice(proposal: DraftProposal, start: int, stop: int | None = None) -> DraftProposal:
    """Nodes ``start:stop`` of a chain proposal, as a chain of their own: without its
    first node (the bonus token it matched), or cut to the round's window."""
    tokens = proposal.tokens[start:stop]
    if start == 0 and len(tokens) == len(proposal):
        return proposal

    def part(values):
        return None if values is None else values[start:stop]

    return DraftProposal(proposal.request_id, tokens, DraftProposal.chain_parents(len(tokens)),
                         proposal.confidences[start:stop], part(proposal.draft_probs), proposal.drafter,
                         part(proposal.sources))
