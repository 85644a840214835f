"""The in-process speculative engine: admit → draft → verify → commit, for a batch.

Where it sits: ``specfleet bench engine`` and tests drive it directly; the Ray
runtime runs the same round structure with drafters and the verifier behind actor
handles. Mechanism only: which drafter serves a request is given at ``submit`` or, with
``route=True``, asked of the router (``policy/routing.py``) at admission; how long
each window is comes from a ``DraftLengthPolicy`` (``policy/draft_length.py``).
Policies are told the time from the engine's ``Clock`` and a ``LoadSnapshot``; the
router learns from every round of every routed request.

A round: every active request gets a ``DraftRequest`` carrying only the committed
tokens its drafter has not seen; drafters propose (one batched call per drafter);
the verifier checks every proposal in one forward pass and commits the exact
target output; finished requests are released everywhere and their full sequence
is offered to drafters that learn across requests.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from specfleet.core.clock import Clock, MonotonicClock
from specfleet.core.load import GroupLoad, LoadSnapshot
from specfleet.core.stats import RequestStats
from specfleet.core.types import (
    DraftProposal,
    DraftRequest,
    FinishReason,
    SamplingParams,
    VerifyResult,
)
from specfleet.drafters.base import Drafter
from specfleet.policy.draft_length import DraftLengthPolicy, FixedDraftLength
from specfleet.policy.routing import ExpertiseRouter
from specfleet.verifiers.verifier import Verifier

logger = logging.getLogger(__name__)


@dataclass
class GenerationOutput:
    request_id: str
    prompt: list[int]
    token_ids: list[int]  # generated tokens only
    finish_reason: FinishReason
    stats: RequestStats


@dataclass
class _Active:
    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    drafter: str | None
    max_draft_length: int | None = None  # the client's cap on the window
    domain: str | None = None  # the router's classification; None when not routed
    arrived_ns: int = 0  # engine clock at submit
    seen: int = 0  # committed tokens the drafter has been sent
    stats: RequestStats = field(default_factory=RequestStats)


class SpecEngine:
    """Runs speculative decoding for many requests in one process."""

    def __init__(
        self,
        verifier: Verifier,
        drafters: Mapping[str, Drafter],
        *,
        draft_policy: DraftLengthPolicy | None = None,
        router: ExpertiseRouter | None = None,
        default_drafter: str | None = None,
        max_batch_size: int = 8,
        token_sink: Callable[[str, list[int]], None] | None = None,
        clock: Clock | None = None,
    ):
        """``token_sink(request_id, tokens)`` receives each round's committed tokens
        as soon as they are verified (streaming servers use it). ``router`` chooses the
        drafter of requests submitted with ``route=True`` and no drafter; without one,
        ``default_drafter`` (default: the first drafter) serves them."""
        self.verifier = verifier
        self.token_sink = token_sink
        self.drafters = dict(drafters)
        self.policy = draft_policy or FixedDraftLength(4)
        self.router = router
        self.default_drafter = default_drafter or next(iter(self.drafters), None)
        self.clock = clock or MonotonicClock()
        self.max_batch_size = max_batch_size
        self._waiting: deque[_Active] = deque()
        self._active: dict[str, _Active] = {}
        self._finished: list[GenerationOutput] = []
        self._next_id = 0

    # ---- submission ------------------------------------------------------------------
    def submit(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams | None = None,
        *,
        drafter: str | None = None,
        request_id: str | None = None,
        max_draft_length: int | None = None,
        route: bool = False,
    ) -> str:
        """Queue a request; ``drafter=None`` decodes it without speculation unless
        ``route`` asks the router (or the default drafter) to pick one."""
        sampling = sampling or SamplingParams()
        sampling.validate()
        now = self.clock.now_ns()
        domain = None
        if route and drafter is None:
            if self.router is not None:
                domain, drafter = self.router.route(prompt, now_ns=now, load=self.load())
            else:
                drafter = self.default_drafter
        if drafter is not None and drafter not in self.drafters:
            raise ValueError(f"unknown drafter {drafter!r} (known: {', '.join(self.drafters)})")
        if request_id is None:
            request_id = f"req-{self._next_id}"
            self._next_id += 1
        if request_id in self._active or any(r.request_id == request_id for r in self._waiting):
            raise ValueError(f"request id {request_id!r} is already in use")
        req = _Active(request_id, list(prompt), sampling, drafter, max_draft_length, domain, now)
        req.stats.domain = domain
        self._waiting.append(req)
        return request_id

    def cancel(self, request_id: str) -> bool:
        """Stop a request now and free its KV caches; True if it was queued or running."""
        for queued in self._waiting:
            if queued.request_id == request_id:
                self._waiting.remove(queued)
                return True
        req = self._active.get(request_id)
        if req is None:
            return False
        self._finish(req, FinishReason.CANCELLED)
        return True

    @property
    def request_ids(self) -> list[str]:
        """Every queued or running request."""
        return [r.request_id for r in self._waiting] + list(self._active)

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or self._active)

    def load(self) -> LoadSnapshot:
        """What policies are told about load (one verifier group in this engine)."""
        per_drafter = Counter(r.drafter for r in self._active.values() if r.drafter)
        return LoadSnapshot(
            waiting=len(self._waiting),
            groups=(GroupLoad(len(self._active), self.max_batch_size),),
            drafter_requests=dict(per_drafter),
        )

    # ---- the loop ----------------------------------------------------------------------
    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        drafter: str | None = None,
    ) -> list[GenerationOutput]:
        """Run a batch to completion; outputs in prompt order."""
        if sampling is None or isinstance(sampling, SamplingParams):
            sampling = [sampling or SamplingParams()] * len(prompts)
        ids = [self.submit(p, s, drafter=drafter) for p, s in zip(prompts, sampling)]
        done: dict[str, GenerationOutput] = {}
        while self.has_work:
            for output in self.step():
                done[output.request_id] = output
        return [done[i] for i in ids]

    def step(self) -> list[GenerationOutput]:
        """One round for every active request; returns the requests that finished."""
        self._admit()
        if not self._active:
            return self._drain_finished()
        results, timing = self._draft_and_verify()
        now = self.clock.now_ns()
        if timing is not None:
            self.policy.observe_timing(*timing, now_ns=now)
        for result in results:
            req = self._active[result.request_id]
            drafted, accepted, emitted = result.num_drafted, result.num_accepted, len(result.emitted)
            req.stats.observe_round(drafted, accepted, emitted, req.drafter)
            if emitted and req.stats.first_token_ns is None:
                req.stats.first_token_ns = now - req.arrived_ns
            self.policy.observe(req.request_id, drafted, accepted, now_ns=now)
            if self.router is not None and req.domain is not None:
                self.router.observe_round(req.domain, req.drafter, drafted=drafted,
                                          accepted=accepted, emitted=emitted, now_ns=now)
            if self.token_sink is not None and result.emitted:
                self.token_sink(req.request_id, result.emitted)
            if result.finish_reason is not None:
                self._finish(req, result.finish_reason)
        return self._drain_finished()

    def _admit(self) -> None:
        batch = []
        while self._waiting and len(self._active) + len(batch) < self.max_batch_size:
            batch.append(self._waiting.popleft())
        if not batch:
            return
        try:
            self.verifier.add_requests([(r.request_id, r.prompt, r.sampling) for r in batch])
        except Exception:
            # Nothing was admitted: put the batch back so no request is silently lost.
            self._waiting.extendleft(reversed(batch))
            raise
        now = self.clock.now_ns()
        for req in batch:
            req.stats.verifier_group = 0
            req.stats.queue_ns = now - req.arrived_ns
            self._active[req.request_id] = req

    def idle(self) -> None:
        """Servers call this when no request has come for a while (a hook for engines
        that hold resources between rounds; this one holds none)."""

    def _draft_and_verify(self) -> tuple[list[VerifyResult], tuple[float, float] | None]:
        """Draft for every active request and verify all proposals in one call.

        Returns the results (in ``_active`` order) and, if anything was drafted, the
        timing the draft policy learns c from: (ns per sequential draft position,
        ns of the verify step).
        """
        start = time.perf_counter_ns()
        proposals, draft_positions = self._draft()
        verify_start = time.perf_counter_ns()
        results = self.verifier.verify([proposals[rid] for rid in self._active])
        if not draft_positions:
            return results, None
        return results, ((verify_start - start) / draft_positions, time.perf_counter_ns() - verify_start)

    def _draft(self) -> tuple[dict[str, DraftProposal], int]:
        """Proposals per request, and the number of sequential draft positions taken."""
        proposals: dict[str, DraftProposal] = {}
        by_drafter: dict[str, list[DraftRequest]] = {}
        now, load = self.clock.now_ns(), self.load()
        for rid, req in self._active.items():
            tokens = self.verifier.tokens(rid)
            # Drafts past max_new_tokens are wasted: the round's bonus token is free.
            remaining = req.sampling.max_new_tokens - (len(tokens) - len(req.prompt))
            window = min(self.policy.window(rid, now_ns=now, load=load), remaining - 1) if req.drafter else 0
            if req.max_draft_length is not None:
                window = min(window, req.max_draft_length)
            if window <= 0:
                proposals[rid] = DraftProposal.empty(rid)
                continue
            by_drafter.setdefault(req.drafter, []).append(
                DraftRequest(rid, req.seen, tokens[req.seen :], window, req.sampling)
            )
            req.seen = len(tokens)
        positions = 0
        for name, requests in by_drafter.items():
            for proposal in self.drafters[name].propose(requests):
                proposals[proposal.request_id] = proposal
            positions += max(len(proposals[r.request_id]) for r in requests)
        return proposals, positions

    def _finish(self, req: _Active, reason: FinishReason) -> None:
        tokens = self.verifier.tokens(req.request_id)
        self.verifier.release(req.request_id)
        for drafter in self.drafters.values():
            drafter.release(req.request_id)
            if reason != FinishReason.CANCELLED:
                drafter.observe_output(tokens)
        self.policy.forget(req.request_id)
        del self._active[req.request_id]
        self._finished.append(
            GenerationOutput(req.request_id, req.prompt, tokens[len(req.prompt) :], reason, req.stats)
        )

    def _drain_finished(self) -> list[GenerationOutput]:
        done, self._finished = self._finished, []
        return done
