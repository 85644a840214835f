"""The verifier: checks a batch of draft proposals against the target in one forward pass.

Where it sits: the scheduler (``engine/scheduler.py``) plans a round; the executor
(in-process, or the verifier-group actor on Ray) calls ``verify`` with one
``VerifyCall`` per request of the group and the round's drafter replies. One
``LlamaRunner.forward`` scores every request's pending committed token(s) plus all
its draft nodes (chains or trees); the exact accept rule (``acceptance.py``) picks
what to emit. The verifier does not decide what is committed — the scheduler applies
the stop rule and length cap — so it follows the same position contract as drafters:

- each call says where its view of the request is truncated (``position``) and
  which committed tokens follow (``new_tokens``: the prompt the first time, then the
  tokens committed since, which include the ones this verifier emitted);
- the KV cache keeps the longest prefix of what it holds that still agrees with the
  committed sequence (so an accepted window costs nothing to re-send, a cut window
  is rolled back, and a request re-sent from position 0 after a failure reuses what
  is still valid); the last committed token is always *pending* and fed, followed by
  the drafts, in the next forward — prefill is simply a long pending run.

A proposal may be empty: then the round is one plain autoregressive step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from specfleet.core.sampling import draw_seed
from specfleet.core.types import ROOT, DraftProposal, SamplingParams, VerifyResult
from specfleet.core.workers import DraftReply, VerifyCall, VerifyReply
from specfleet.models.llama_runner import ForwardItem, LlamaRunner
from specfleet.policy.fusion import credit, fuse
from specfleet.verifiers.acceptance import Acceptance, accept_greedy, accept_keyed

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    sampling: SamplingParams
    seed: int  # keys the request's sampling noise by position (unused when greedy)
    tokens: list[int] = field(default_factory=list)  # the committed sequence, as told
    cached: list[int] = field(default_factory=list)  # tokens whose K/V the runner holds, in order
    last_verified_ns: int = field(default_factory=time.perf_counter_ns)


class Verifier:
    """Owns the target runner and, per request, the KV cache and sampling seed.

    ``eos_token_ids`` and ``decode`` describe the target's vocabulary; the verifier
    does not use them (the scheduler applies the stop rule), it carries them so the
    engine built around it knows the target's EOS and text.
    """

    def __init__(
        self,
        runner: LlamaRunner,
        *,
        eos_token_ids: Sequence[int] = (),
        decode: Callable[[list[int]], str] | None = None,
    ):
        self.runner = runner
        self.eos_token_ids = tuple(eos_token_ids)
        self.decode = decode
        self._requests: dict[str, _Request] = {}

    # ---- request lifecycle ----------------------------------------------------------
    def release(self, request_id: str) -> None:
        """Free the request's KV slot; unknown ids are ignored."""
        if self._requests.pop(request_id, None) is not None:
            self.runner.free(request_id)

    def has(self, request_id: str) -> bool:
        return request_id in self._requests

    @property
    def active(self) -> list[str]:
        return list(self._requests)

    def _sync(self, call: VerifyCall) -> _Request | None:
        """Apply the call's position contract; None if the call assumes state this
        verifier does not have (a replaced actor): the scheduler re-sends it whole."""
        req = self._requests.get(call.request_id)
        if req is None:
            if call.position > 0:
                return None
            call.sampling.validate()
            self.runner.allocate(call.request_id)
            # Engines seed every sampled request at the edge; a bare verifier call
            # without one gets a fresh seed, kept for the request's life.
            seed = draw_seed() if call.sampling.seed is None else call.sampling.seed
            req = self._requests[call.request_id] = _Request(call.sampling, seed)
        if call.position > len(req.tokens):
            return None
        del req.tokens[call.position :]
        req.tokens.extend(call.new_tokens)
        if not req.tokens:
            raise ValueError(f"request {call.request_id!r}: empty prompt")
        bad = [t for t in call.new_tokens if not 0 <= t < self.runner.vocab_size]
        if bad:
            raise ValueError(f"request {call.request_id!r}: token id {bad[0]} outside the vocabulary")
        if len(req.tokens) > self.runner.max_seq_len:
            raise ValueError(f"request {call.request_id!r}: {len(req.tokens)} tokens exceed the "
                             f"context ({self.runner.max_seq_len})")
        # Keep the cached prefix that still matches, but never the last committed
        # token: it is fed again so its logits score the first draft. Everything
        # before ``position`` matched when it was told, so comparing starts there.
        limit = min(len(req.cached), len(req.tokens) - 1)
        keep = min(call.position, limit)
        while keep < limit and req.cached[keep] == req.tokens[keep]:
            keep += 1
        if keep < len(req.cached):
            self.runner.truncate(call.request_id, keep)
            del req.cached[keep:]
        return req

    # ---- one round ----------------------------------------------------------------
    def verify(self, calls: Sequence[VerifyCall], drafts: Sequence[DraftReply] = ()) -> VerifyReply:
        """Score every call's draft in one forward pass; return what the accept rule emits.

        A call without its own ``proposal`` takes its request's proposal from
        ``drafts`` (the round's drafter replies), or verifies without drafts.
        """
        start = time.perf_counter_ns()
        drafted: dict[str, list[DraftProposal]] = {}
        for reply in drafts:
            for p in reply.proposals:
                drafted.setdefault(p.request_id, []).append(p)
        items, work, unknown = [], [], []
        for call in calls:
            req = self._sync(call)
            if req is None:
                unknown.append(call.request_id)
                continue
            proposal = call.proposal if call.proposal is not None else _one_tree(call, drafted)
            room = self.runner.max_seq_len - len(req.tokens)  # cache slots left for drafts
            if len(proposal) > room:
                # Parents precede children, so a prefix of the nodes is still a valid tree.
                proposal = _trim(proposal, max(0, room))
            pending = req.tokens[len(req.cached) :]
            n_pending = len(pending)
            parents = list(range(-1, n_pending - 1))
            parents += [n_pending - 1 if p == ROOT else n_pending + p for p in proposal.parents]
            rows = [n_pending - 1] + [n_pending + i for i in range(len(proposal))]
            items.append(ForwardItem(call.request_id, pending + list(proposal.tokens), parents, rows))
            work.append((call.request_id, req, proposal, pending))
        all_logits = self.runner.forward(items) if items else []  # per request [N+1, V]
        forward_ns = time.perf_counter_ns() - start

        results = {}
        for (rid, req, proposal, pending), logits in zip(work, all_logits):
            try:
                outcome = self._accept(req, logits, proposal)
            except Exception as exc:  # one request's failure must not fail its batch
                logger.exception("verifying request %r failed; the rest of the batch goes on", rid)
                results[rid] = VerifyResult(rid, [], 0, 0, [], error=f"verification failed ({type(exc).__name__})")
                continue
            # The cache keeps the pending tokens and the accepted path; the newest
            # emitted token becomes pending.
            n_pending = len(pending)
            base = len(req.cached)
            keep = list(range(n_pending)) + [n_pending + node for node in outcome.accepted_nodes]
            self.runner.compact(rid, base, keep)
            req.cached.extend(pending)
            req.cached.extend(proposal.tokens[node] for node in outcome.accepted_nodes)
            results[rid] = VerifyResult(
                request_id=rid,
                emitted=list(outcome.emitted),
                num_accepted=len(outcome.accepted_nodes),
                num_drafted=_path_length(proposal.parents),
                accepted_nodes=list(outcome.accepted_nodes),
                forward_ns=forward_ns,
                queue_ns=max(0, start - req.last_verified_ns),
                credit=credit(proposal, outcome.accepted_nodes) if len(proposal) else {},
            )
            req.last_verified_ns = time.perf_counter_ns()
        ordered = [results.get(c.request_id) or VerifyResult.unverified(c.request_id) for c in calls]
        return VerifyReply(ordered, time.perf_counter_ns() - start, tuple(unknown))


    def _accept(self, req: _Request, logits: torch.Tensor, proposal: DraftProposal) -> Acceptance:
        """The accept rule for one request's round; ``len(req.tokens)`` is the absolute
        position of the first token it emits (what keys the sampling noise)."""
        if req.sampling.greedy:
            return accept_greedy(logits, proposal.tokens, proposal.parents)
        return accept_keyed(logits, proposal.tokens, proposal.parents, req.sampling, req.seed,
                            len(req.tokens))


def _one_tree(call: VerifyCall, drafted: dict[str, list[DraftProposal]]) -> DraftProposal:
    """The proposal to check for ``call``: its drafters' replies, fused when the plan
    asks for it and more than one drafter proposed something."""
    proposals = [p for p in drafted.get(call.request_id, ()) if len(p)]
    if not proposals:
        return DraftProposal.empty(call.request_id)
    if call.fusion is None or len(proposals) == 1:
        return proposals[0]
    return fuse(call.request_id, proposals, call.fusion)


def _trim(proposal: DraftProposal, n: int) -> DraftProposal:
    q = None if proposal.draft_probs is None else proposal.draft_probs[:n]
    sources = None if proposal.sources is None else proposal.sources[:n]
    return DraftProposal(
        proposal.request_id, proposal.tokens[:n], proposal.parents[:n],
        proposal.confidences[:n], q, proposal.drafter, sources,
    )


def _path_length(parents: Sequence[int]) -> int:
    """Depth of the deepest node: how many draft tokens one path could accept."""
    depth: list[int] = []
    for p in parents:
        depth.append(1 if p == ROOT else depth[p] + 1)
    return max(depth, default=0)
