"""The verifier: checks a batch of draft proposals against the target in one forward pass.

Where it sits: every speculation round, after drafters propose, the engine (or the
verifier-group actor in the distributed runtime) calls ``verify`` with one
``DraftProposal`` per request. One ``LlamaRunner.forward`` scores every request's
pending committed token(s) plus all its draft nodes (chains or trees); the exact
accept rule (``acceptance.py``) picks what to emit; ``StopChecker`` cuts the window
at EOS, a stop sequence or max_new_tokens; the KV cache keeps exactly the committed
tokens (truncated for chains, compacted for trees).

Invariant per request: the runner's cache holds ``tokens[:-1]``; the last committed
token is *pending* and is fed, followed by the drafts, in the next round. A
proposal may be empty: then the round is one plain autoregressive step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from specfleet.core.sampling import make_generator
from specfleet.core.stopping import StopChecker
from specfleet.core.types import ROOT, DraftProposal, FinishReason, SamplingParams, VerifyResult
from specfleet.models.llama_runner import ForwardItem, LlamaRunner
from specfleet.verifiers.acceptance import accept_greedy, accept_sampled

logger = logging.getLogger(__name__)


@dataclass
class _Request:
    sampling: SamplingParams
    prompt_len: int
    tokens: list[int]  # prompt + generated (committed)
    stop: StopChecker
    generator: torch.Generator | None
    submitted_ns: int = field(default_factory=time.perf_counter_ns)
    finish_reason: FinishReason | None = None

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len :]


class Verifier:
    """Owns the target runner and every request's committed state."""

    def __init__(
        self,
        runner: LlamaRunner,
        *,
        eos_token_ids: Sequence[int] = (),
        decode: Callable[[list[int]], str] | None = None,
    ):
        self.runner = runner
        self.eos_token_ids = frozenset(eos_token_ids)
        self.decode = decode
        self._requests: dict[str, _Request] = {}

    # ---- request lifecycle ----------------------------------------------------------
    def add_requests(self, requests: Sequence[tuple[str, list[int], SamplingParams]]) -> None:
        """Admit requests and prefill their prompts (all but the last token) together."""
        items = []
        for request_id, prompt, sampling in requests:
            if request_id in self._requests:
                raise ValueError(f"request {request_id!r} is already active")
            if not prompt:
                raise ValueError(f"request {request_id!r}: empty prompt")
            sampling.validate()
            bad = [t for t in prompt if not 0 <= t < self.runner.vocab_size]
            if bad:
                raise ValueError(f"request {request_id!r}: token id {bad[0]} outside the vocabulary")
            if len(prompt) + sampling.max_new_tokens > self.runner.max_seq_len:
                raise ValueError(
                    f"request {request_id!r}: prompt ({len(prompt)}) + max_new_tokens "
                    f"({sampling.max_new_tokens}) exceeds the context ({self.runner.max_seq_len})"
                )
            generator = None if sampling.greedy else make_generator(sampling.seed)
            stop = StopChecker(sampling, self.eos_token_ids, self.decode)
            self.runner.allocate(request_id)
            self._requests[request_id] = _Request(sampling, len(prompt), list(prompt), stop, generator)
            if len(prompt) > 1:
                items.append(ForwardItem(request_id, list(prompt[:-1]), logit_rows=[]))
        self.runner.forward(items)

    def release(self, request_id: str) -> None:
        self._requests.pop(request_id, None)
        self.runner.free(request_id)

    def tokens(self, request_id: str) -> list[int]:
        return list(self._requests[request_id].tokens)

    def generated(self, request_id: str) -> list[int]:
        return list(self._requests[request_id].generated)

    def has(self, request_id: str) -> bool:
        return request_id in self._requests

    @property
    def active(self) -> list[str]:
        return list(self._requests)

    # ---- one round ----------------------------------------------------------------
    def verify(self, proposals: Sequence[DraftProposal]) -> list[VerifyResult]:
        """Score all proposals in one forward pass and commit what the accept rule emits."""
        start = time.perf_counter_ns()
        items, pending_counts, checked = [], [], []
        for proposal in proposals:
            req = self._requests[proposal.request_id]
            if req.finish_reason is not None:
                raise ValueError(f"request {proposal.request_id!r} is already finished")
            pending = req.tokens[self.runner.length(proposal.request_id) :]
            n_pending = len(pending)
            room = self.runner.max_seq_len - len(req.tokens)  # cache slots left for drafts
            if len(proposal) > room:
                # Parents precede children, so a prefix of the nodes is still a valid tree.
                proposal = _trim(proposal, max(0, room))
            checked.append(proposal)
            parents = list(range(-1, n_pending - 1))
            parents += [n_pending - 1 if p == ROOT else n_pending + p for p in proposal.parents]
            rows = [n_pending - 1] + [n_pending + i for i in range(len(proposal))]
            items.append(ForwardItem(proposal.request_id, pending + list(proposal.tokens), parents, rows))
            pending_counts.append(n_pending)
        all_logits = self.runner.forward(items)  # per request [N+1, V]
        forward_ns = time.perf_counter_ns() - start

        results = []
        for proposal, logits, n_pending in zip(checked, all_logits, pending_counts):
            rid = proposal.request_id
            req = self._requests[rid]
            base = self.runner.length(rid) - n_pending - len(proposal)
            if req.sampling.greedy:
                outcome = accept_greedy(logits, proposal.tokens, proposal.parents)
            else:
                outcome = accept_sampled(
                    logits,
                    proposal.tokens,
                    proposal.parents,
                    req.sampling,
                    req.generator,
                    _draft_probs(proposal),
                )
            committed, finish = req.stop.commit(req.generated, outcome.emitted)
            req.tokens.extend(committed)
            req.finish_reason = finish
            # Cache keeps pending tokens + accepted nodes; the newest emitted token is pending.
            keep = list(range(n_pending)) + [n_pending + node for node in outcome.accepted_nodes]
            self.runner.compact(rid, base, keep)
            accepted = min(len(outcome.accepted_nodes), len(committed))
            results.append(
                VerifyResult(
                    request_id=rid,
                    emitted=committed,
                    num_accepted=accepted,
                    num_drafted=_path_length(proposal.parents),
                    accepted_nodes=outcome.accepted_nodes[:accepted],
                    finish_reason=finish,
                    forward_ns=forward_ns,
                    queue_ns=max(0, start - req.submitted_ns),
                )
            )
            req.submitted_ns = time.perf_counter_ns()
        return results


def _trim(proposal: DraftProposal, n: int) -> DraftProposal:
    q = None if proposal.draft_probs is None else proposal.draft_probs[:n]
    return DraftProposal(
        proposal.request_id, proposal.tokens[:n], proposal.parents[:n],
        proposal.confidences[:n], q, proposal.drafter,
    )


def _draft_probs(proposal: DraftProposal) -> torch.Tensor | None:
    if proposal.draft_probs is None:
        return None
    return torch.from_numpy(np.asarray(proposal.draft_probs, dtype=np.float32))


def _path_length(parents: Sequence[int]) -> int:
    """Depth of the deepest node: how many draft tokens one path could accept."""
    depth: list[int] = []
    for p in parents:
        depth.append(1 if p == ROOT else depth[p] + 1)
    return max(depth, default=0)
