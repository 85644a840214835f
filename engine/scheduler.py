"""The scheduler: owns every request's state and decides what each round does.

Where it sits: between the frontend and the workers. The engine driver
(``engine/engine.py``) feeds it requests and cancels, asks it for the next rounds,
hands the resulting ``RoundPlan``s to an executor (in-process, Ray actors, or the
simulator's simulated workers) and feeds the outcomes back as events. The scheduler
never calls a worker, never reads a clock (``now_ns`` is passed in) and never sees a
tensor, which is what lets the same code run against actors, fakes and a simulated
clock.

What it owns, per request: prompt and committed tokens; the stop rule (EOS, stop
strings, max_new_tokens — a stop inside an accepted window cuts it there); what each
drafter and the verifier group have been told (their position contract, so a failed
or replaced worker is resynchronised by re-sending from position 0); the verifier
group whose KV holds the request (least loaded at admission); statistics.

What it asks ``policy/``: the router (``policy/routing.py``: a request's first
drafter at admission; before every round who cooperates on it — which may move it to
another drafter — and how much each is trusted; after every round what each drafter
got accepted and what the round cost), the width policy (how many drafters may
cooperate and the fused tree's node budget, from load, every round), the draft-length
policy (the window, every round), each with ``now_ns`` and a ``LoadSnapshot``.

A round of a group: every request of the group is verified once; those with a
drafter and a window > 0 are drafted for first — by several drafters when the router
lets them cooperate, their proposals then fused into one tree where they meet
(``VerifyCall.fusion``). Failures are events too: a failed draft call means its
requests are verified without that drafter's drafts this round (and the drafter is
reported down to the router for a moment); a failed verify call commits nothing and
the requests are re-sent from their committed tokens to the (possibly replaced)
verifier. A group given up for good (``evict_group``: past its restart budget) takes
no admissions until ``restore_group``; its requests wait again at the front of the
queue, keep their committed tokens, and are re-sent whole to another group.
"""

from __future__ import annotations

import itertools
import logging
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from specfleet.core.load import GroupLoad, LoadSnapshot
from specfleet.core.serving import GenerationOutput
from specfleet.core.stats import RequestStats, SpecDecodingStats
from specfleet.core.stopping import StopChecker
from specfleet.core.types import DraftProposal, DraftRequest, FinishReason, SamplingParams
from specfleet.core.workers import (
    DraftReply,
    FailureKind,
    FusionPlan,
    Housekeeping,
    RoundOutcome,
    RoundPlan,
    VerifyCall,
    VerifyReply,
    WorkerFailure,
)
from specfleet.policy.draft_length import DraftLengthPolicy
from specfleet.policy.routing import DrafterProfile, RoundFeedback, Router
from specfleet.policy.speculation_width import SpeculationWidth

logger = logging.getLogger(__name__)

NO_DOMAIN = "-"  # stats label of requests whose drafter was not chosen by the router
# How long a drafter whose call failed (restarting, lost) is reported down to the router;
# then it is offered traffic again, and a success clears it at once.
DRAFTER_DOWN_NS = 500_000_000


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    drafter: str | None  # who drafts for it (the primary, when several cooperate); None: plain decoding
    domain: str  # the router's classification, or NO_DOMAIN
    routed: bool  # the router chose the drafter (and learns from its rounds)
    max_draft_length: int | None  # the client's cap on the window
    stop: StopChecker
    arrival_ns: int
    tokens: list[int] = field(default_factory=list)  # prompt + committed
    # The committed tokens alone, kept beside ``tokens`` (slicing them off every round
    # was the scheduler's largest per-round cost).
    generated: list[int] = field(default_factory=list)
    group: int | None = None  # verifier group holding its KV, once admitted
    moved: int = 0  # times its group was given up under it (it waited again, KV lost)
    verifier_seen: int = 0  # committed tokens the group's verifier has been sent
    drafter_seen: dict[str, int] = field(default_factory=dict)  # drafter → committed tokens sent
    stats: RequestStats = field(default_factory=RequestStats)


@dataclass
class _Round:
    group: int
    drafter_of: dict[str, tuple[str, ...]]  # request → drafters asked for it this round, primary first
    draft_calls: dict[str, list[DraftRequest]]
    draft_ns: dict[str, int] = field(default_factory=dict)  # drafter → its call's compute time


class Scheduler:
    def __init__(
        self,
        *,
        drafters: Sequence[str],
        draft_length: DraftLengthPolicy,
        router: Router | None = None,
        width: SpeculationWidth | None = None,
        default_drafter: str | None = None,
        groups: int = 1,
        max_batch_size: int = 8,
        eos_token_ids: Sequence[int] = (),
        decode: Callable[[list[int]], str] | None = None,
        vocab_size: int | None = None,
        max_seq_len: int | None = None,
        token_sink: Callable[[str, list[int]], None] | None = None,
    ):
        """``token_sink(request_id, tokens)`` receives each round's committed tokens as
        soon as they are committed (streaming servers use it)."""
        if groups < 1:
            raise ValueError(f"groups: must be >= 1, got {groups}")
        self.drafters = list(drafters)
        self.draft_length = draft_length
        self.router = router
        self.width = width or SpeculationWidth(max_width=1)
        self.default_drafter = default_drafter
        self.max_batch_size = max_batch_size
        self.eos_token_ids = frozenset(eos_token_ids)
        self.decode = decode
        self.vocab_size = vocab_size
        self.max_seq_len = max_seq_len
        self.token_sink = token_sink
        self.stats = SpecDecodingStats()
        self._waiting: deque[_Request] = deque()
        self._groups: list[dict[str, _Request]] = [{} for _ in range(groups)]
        self._by_id: dict[str, _Request] = {}
        self._rounds: dict[int, _Round] = {}  # in flight, by round id
        self._busy: set[int] = set()  # groups with a round in flight
        self._unavailable: set[int] = set()  # groups given up (evict_group): no admissions
        self._finished: list[GenerationOutput] = []
        self._verifier_releases: dict[int, list[str]] = {}
        self._drafter_releases: dict[str, list[str]] = {}
        self._observed: list[list[int]] = []
        self._round_ids = itertools.count(1)
        self._down_until: dict[str, int] = {}  # drafter → when it is offered traffic again
        self._now_ns = 0  # the latest time the scheduler was told (for load snapshots)
        self._next_id = 0

    # ---- requests ----------------------------------------------------------------------
    def add(
        self,
        prompt: Sequence[int],
        sampling: SamplingParams,
        *,
        now_ns: int,
        drafter: str | None = None,
        route: bool = False,
        request_id: str | None = None,
        max_draft_length: int | None = None,
    ) -> str:
        """Queue a request. ``drafter`` names who drafts; with ``route`` and no drafter
        the router (or the default drafter) chooses; otherwise it is decoded plainly.
        Raises ValueError naming the problem for anything that cannot be served."""
        sampling.validate()
        prompt = list(prompt)
        if not prompt:
            raise ValueError("prompt: must hold at least one token")
        if self.vocab_size is not None:
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"prompt: token id {bad[0]} outside the vocabulary ({self.vocab_size})")
        if self.max_seq_len is not None and len(prompt) + sampling.max_new_tokens > self.max_seq_len:
            raise ValueError(f"prompt ({len(prompt)}) + max_new_tokens ({sampling.max_new_tokens}) "
                             f"exceeds the context ({self.max_seq_len})")
        if drafter is not None and drafter not in self.drafters:
            raise ValueError(f"unknown drafter {drafter!r} (known: {', '.join(self.drafters) or 'none'})")
        if request_id is None:
            request_id = f"req-{self._next_id}"
            self._next_id += 1
        if request_id in self._by_id:
            raise ValueError(f"request id {request_id!r} is already in use")
        stop = StopChecker(sampling, self.eos_token_ids, self.decode)
        domain, routed = NO_DOMAIN, False
        if drafter is None and route:
            if self.router is not None:
                domain, drafter = self.router.route(prompt, now_ns=now_ns, load=self.load())
                routed = True
            else:
                drafter = self.default_drafter
        req = _Request(request_id, prompt, sampling, drafter, domain, routed, max_draft_length,
                       stop, now_ns, tokens=list(prompt))
        req.stats.domain = None if domain == NO_DOMAIN else domain
        self._waiting.append(req)
        self._by_id[request_id] = req
        return request_id

    def cancel(self, request_id: str, now_ns: int) -> bool:
        """Stop a request now (its workers free it with the next housekeeping); True if
        it was queued or running. A reply for it still in flight is ignored."""
        req = self._by_id.get(request_id)
        if req is None:
            return False
        if req.group is None and not req.moved:  # no worker has seen it
            self._waiting.remove(req)
            del self._by_id[request_id]
            return True
        self._finish(req, FinishReason.CANCELLED)
        return True

    @property
    def request_ids(self) -> list[str]:
        """Every queued or running request."""
        return [r.request_id for r in self._waiting] + [rid for g in self._groups for rid in g]

    @property
    def has_work(self) -> bool:
        return bool(self._waiting or any(self._groups))

    def group_of(self, request_id: str) -> int | None:
        req = self._by_id.get(request_id)
        return None if req is None else req.group

    def generated(self, request_id: str) -> list[int]:
        return list(self._by_id[request_id].generated)

    def load(self) -> LoadSnapshot:
        users: dict[str, int] = {}  # queued requests count: a burst is spread at admission
        for req in itertools.chain(self._waiting, *(g.values() for g in self._groups)):
            if req.drafter is not None:
                users[req.drafter] = users.get(req.drafter, 0) + 1
        down = frozenset(d for d, until in self._down_until.items() if until > self._now_ns)
        return LoadSnapshot(
            waiting=len(self._waiting),
            groups=tuple(GroupLoad(len(g), 0 if i in self._unavailable else self.max_batch_size)
                         for i, g in enumerate(self._groups)),
            drafter_requests=users,
            drafters_down=down,
        )

    # ---- the fleet --------------------------------------------------------------------------
    def add_drafter(self, profile: DrafterProfile) -> None:
        """A drafter joins (its worker is already up): routable from the next round."""
        if profile.name in self.drafters:
            raise ValueError(f"drafter {profile.name!r} is already deployed")
        self.drafters.append(profile.name)
        if self.router is not None:
            self.router.add_drafter(profile)

    def remove_drafter(self, name: str) -> None:
        """A drafter leaves: its requests go on — re-routed, or plainly decoded when it
        was their only drafter — from their committed tokens; nothing is lost. Its
        worker holds nothing the scheduler still needs (no releases are owed to it)."""
        if name not in self.drafters:
            raise ValueError(f"unknown drafter {name!r}")
        if self.router is not None:
            self.router.remove_drafter(name)  # refuses to remove the last one
        self.drafters.remove(name)
        self._drafter_releases.pop(name, None)
        self._down_until.pop(name, None)
        if self.default_drafter == name:
            self.default_drafter = self.drafters[0] if self.drafters else None
        for req in [*self._waiting, *(r for g in self._groups for r in g.values())]:
            req.drafter_seen.pop(name, None)
            if req.drafter == name:
                if req.routed and self.router is not None:
                    req.drafter = self.router.route(req.tokens, now_ns=self._now_ns, load=self.load())[1]
                else:
                    req.drafter = self.default_drafter if req.routed else None

    # ---- verifier groups given up ---------------------------------------------------------
    @property
    def available_groups(self) -> list[int]:
        """Verifier groups that take admissions (all but the evicted ones)."""
        return [g for g in range(len(self._groups)) if g not in self._unavailable]

    @property
    def unavailable_groups(self) -> list[int]:
        return sorted(self._unavailable)

    def evict_group(self, group: int, now_ns: int) -> list[str]:
        """A verifier group is given up (past its restart budget): its requests lost
        their KV there. They go back to the front of the queue, in their order, keeping
        every committed token, and are re-sent whole (position 0) to the group that
        admits them next — the output stays exact. A round of the group still in flight
        is dropped (a late reply for it is ignored). The group takes no admissions
        until ``restore_group``. Raises ValueError for the last available group: with
        none left the requests cannot be served (the server fails them UNAVAILABLE).
        Returns the ids of the requests moved."""
        if group in self._unavailable:
            return []
        if self.available_groups == [group]:
            raise ValueError(f"verifier group {group} is the last one available")
        self._now_ns = now_ns
        self._unavailable.add(group)
        for round_id in [i for i, rnd in self._rounds.items() if rnd.group == group]:
            del self._rounds[round_id]
        self._busy.discard(group)
        moved = list(self._groups[group].values())
        self._groups[group] = {}
        for req in moved:
            req.group, req.verifier_seen = None, 0
            req.moved += 1
            # The round that failed (or was dropped) may not have reached its drafters.
            req.drafter_seen = dict.fromkeys(req.drafter_seen, 0)
        self._waiting.extendleft(reversed(moved))
        # A worker that comes back may still hold them (in process): free them there.
        if moved:
            self._verifier_releases.setdefault(group, []).extend(r.request_id for r in moved)
        return [r.request_id for r in moved]

    def restore_group(self, group: int) -> None:
        """An evicted group is back (its executor says a new worker has loaded): it
        takes admissions again from the next round; nothing moves back by itself."""
        self._unavailable.discard(group)

    # ---- planning -----------------------------------------------------------------------
    def _admit(self, now_ns: int) -> None:
        groups = self.available_groups
        while self._waiting and groups:
            group = min(groups, key=lambda g: (len(self._groups[g]), g))
            if len(self._groups[group]) >= self.max_batch_size:
                return
            req = self._waiting.popleft()
            req.group = group
            req.stats.verifier_group = group
            if not req.moved:  # the time to its first admission
                req.stats.queue_ns = now_ns - req.arrival_ns
            self._groups[group][req.request_id] = req

    def next_rounds(self, now_ns: int) -> list[RoundPlan]:
        """Admit what fits, then plan one round for every idle group with requests."""
        self._now_ns = now_ns
        self._admit(now_ns)
        load = self.load()
        plans = []
        for group, requests in enumerate(self._groups):
            if requests and group not in self._busy:
                plans.append(self._plan(group, requests, now_ns, load))
        return plans

    @staticmethod
    def _window_cap(req: _Request) -> int:
        """The client's cap and opt-out always win; drafts past max_new_tokens are wasted
        (the round's bonus token is free)."""
        if req.drafter is None:
            return 0
        cap = req.sampling.max_new_tokens - len(req.generated) - 1
        if req.max_draft_length is not None:
            cap = min(cap, req.max_draft_length)
        return max(cap, 0)

    def _plan(self, group: int, requests: dict[str, _Request], now_ns: int, load: LoadSnapshot) -> RoundPlan:
        round_id = next(self._round_ids)
        drafts: dict[str, list[DraftRequest]] = {}
        verify, drafter_of = [], {}
        width = self.width.plan(load, len(requests))
        batch_plan = None
        if hasattr(self.draft_length, "plan_round"):  # batch-level policy (policy/goodput.py)
            batch_plan = self.draft_length.plan_round(
                round_id, {rid: self._window_cap(req) for rid, req in requests.items()},
                now_ns=now_ns, load=load)
        for rid, req in requests.items():
            window = 0
            if req.drafter is not None:
                chosen = (batch_plan[rid] if batch_plan is not None
                          else self.draft_length.window(rid, now_ns=now_ns, load=load))
                window = min(chosen, self._window_cap(req))
            proposal, fusion = DraftProposal.empty(rid), None
            if window > 0:
                if req.routed and self.router is not None:
                    team = self.router.cooperators(rid, req.domain, req.drafter, width=width.width,
                                                   now_ns=now_ns, load=load)
                    req.drafter = team[0][0]  # the router may have moved the request
                else:
                    team = ((req.drafter, 1.0),)
                drafter_of[rid] = tuple(name for name, _ in team)
                proposal = self._draft(req, team, window, drafts)
                if len(team) > 1:
                    fusion = FusionPlan(team, width.max_nodes(window, len(team)))
            verify.append(VerifyCall(rid, req.verifier_seen, req.tokens[req.verifier_seen :],
                                     req.sampling, proposal, fusion))
            req.verifier_seen = len(req.tokens)
        self._rounds[round_id] = _Round(group, drafter_of, drafts)
        self._busy.add(group)
        rounds_left = max(
            (r.sampling.max_new_tokens - len(r.generated)) / max(1.0, r.stats.mean_acceptance_length)
            for r in requests.values()
        )
        return RoundPlan(round_id, group, drafts, verify, rounds_left)

    def _draft(self, req: _Request, team: tuple[tuple[str, float], ...], window: int,
               drafts: dict[str, list[DraftRequest]]) -> DraftProposal | None:
        """Ask ``team`` to draft ``window`` tokens for ``req`` this round; the proposal
        the verifier checks, or None: this round's drafter replies (lockstep: drafted
        first, then verified). The pipelined scheduler (``engine/pipeline.py``) may
        answer a draft made during the previous round instead."""
        for name, _ in team:
            seen = req.drafter_seen.get(name, 0)
            drafts.setdefault(name, []).append(
                DraftRequest(req.request_id, seen, req.tokens[seen:], window, req.sampling))
            req.drafter_seen[name] = len(req.tokens)
        return None

    # ---- events -----------------------------------------------------------------------------
    def on_round_done(self, outcome: RoundOutcome, now_ns: int) -> None:
        """Every reply of a round, in order: the drafters', then the verifier's. A round
        dropped meanwhile (its group evicted) is ignored."""
        if outcome.round_id not in self._rounds:
            return
        for drafter, reply in outcome.drafts.items():
            self.on_draft_done(outcome.round_id, drafter, reply, now_ns)
        if outcome.draft_positions and isinstance(outcome.verify, VerifyReply):
            self.draft_length.observe_timing(outcome.draft_ns / outcome.draft_positions,
                                             outcome.verify.compute_ns, now_ns=now_ns)
        if isinstance(outcome.verify, VerifyReply) and hasattr(self.draft_length, "observe_round"):
            self.draft_length.observe_round(outcome.round_id, outcome.verify.compute_ns, now_ns=now_ns)
        self.on_verify_done(outcome.round_id, outcome.verify, now_ns)

    def on_draft_done(self, round_id: int, drafter: str, reply: DraftReply | WorkerFailure,
                      now_ns: int) -> None:
        rnd = self._rounds.get(round_id)
        if rnd is None or drafter not in self.drafters:  # dropped, or removed while it ran
            return
        if isinstance(reply, WorkerFailure):
            self.stats.draft_failures[drafter] += 1
            if reply.kind != FailureKind.ERROR:  # restarting or replaced: give it a moment
                self._down_until[drafter] = now_ns + DRAFTER_DOWN_NS
            logger.warning("drafter %r failed a call (%s: %s); its requests are verified without "
                           "drafts this round", drafter, reply.kind.value, reply.message)
            # Resend whole next time: the worker may not have seen the delta (unavailable),
            # may hold a suspect state (error) or nothing at all (lost).
            resync = [c.request_id for c in rnd.draft_calls.get(drafter, ())]
            if reply.kind == FailureKind.LOST:
                resync = [r.request_id for r in self._by_id.values() if drafter in r.drafter_seen]
            for rid in resync:
                req = self._by_id.get(rid)
                if req is not None:
                    req.drafter_seen[drafter] = 0
            return
        self._down_until.pop(drafter, None)
        rnd.draft_ns[drafter] = reply.compute_ns
        for rid in reply.unknown:
            req = self._by_id.get(rid)
            if req is not None:
                req.drafter_seen[drafter] = 0

    def on_verify_done(self, round_id: int, reply: VerifyReply | WorkerFailure | None,
                       now_ns: int) -> None:
        rnd = self._rounds.pop(round_id, None)
        if rnd is None:  # dropped: its group was evicted while it ran
            return
        self._busy.discard(rnd.group)
        if not isinstance(reply, VerifyReply):
            failure = reply or WorkerFailure(FailureKind.ERROR, "no reply")
            self.stats.verify_failures[rnd.group] += 1
            logger.warning("verifier group %d failed a round (%s: %s); its requests resume from "
                           "their committed tokens", rnd.group, failure.kind.value, failure.message)
            for req in self._groups[rnd.group].values():
                req.verifier_seen = 0
            return
        self.stats.verify_rounds += 1
        unknown = set(reply.unknown)
        for result in reply.results:
            req = self._by_id.get(result.request_id)
            if req is None or req.group != rnd.group:  # cancelled while the round ran
                continue
            if result.request_id in unknown:  # a replaced verifier: re-send it whole
                req.verifier_seen = 0
                continue
            if result.error is not None:
                self._finish(req, FinishReason.ERROR, error=result.error)
                continue
            try:
                committed, finish = req.stop.commit(req.generated, result.emitted)
            except Exception as exc:  # e.g. a decode error on these tokens: this request only
                logger.exception("stop rule of request %r failed", result.request_id)
                self._finish(req, FinishReason.ERROR, error=f"stop check failed ({type(exc).__name__})")
                continue
            req.tokens.extend(committed)
            req.generated.extend(committed)
            accepted = min(result.num_accepted, len(committed))
            team = rnd.drafter_of.get(result.request_id, ())
            drafted = result.num_drafted if team else 0
            # Who earned the round: per-node provenance from the verifier, or (a worker
            # that does not report it) the one drafter asked.
            credit = dict(result.credit) or ({team[0]: (result.num_drafted, result.num_accepted)}
                                             if team else {})
            credit = {name: (d, min(a, accepted)) for name, (d, a) in credit.items()}
            drafter = max(team, key=lambda n: (credit.get(n, (0, 0))[1], -team.index(n))) if team else None
            req.stats.observe_round(drafted, accepted, len(committed), drafter, credit)
            self.stats.observe(drafter=drafter or "", domain=req.domain, group=rnd.group,
                               drafted=drafted, accepted=accepted, emitted=len(committed))
            if req.drafter is not None:
                self.draft_length.observe(req.request_id, drafted, accepted, now_ns=now_ns)
            if req.routed and team:
                feedback = RoundFeedback(credit, len(committed),
                                         {n: rnd.draft_ns.get(n, 0) for n in team}, reply.compute_ns)
                self.router.observe(req.request_id, req.domain, feedback, now_ns=now_ns)
            if committed:
                if req.stats.first_token_ns is None:
                    req.stats.first_token_ns = now_ns - req.arrival_ns
                if self.token_sink is not None:
                    self.token_sink(req.request_id, committed)
            if finish is not None:
                self._finish(req, finish)

    # ---- finishing ----------------------------------------------------------------------------
    def _finish(self, req: _Request, reason: FinishReason, *, error: str | None = None) -> None:
        if req.group is None:  # waiting again after an eviction (its release is queued)
            self._waiting.remove(req)
        else:
            del self._groups[req.group][req.request_id]
            self._verifier_releases.setdefault(req.group, []).append(req.request_id)
        del self._by_id[req.request_id]
        for drafter in req.drafter_seen:
            if drafter in self.drafters:
                self._drafter_releases.setdefault(drafter, []).append(req.request_id)
        if reason not in (FinishReason.CANCELLED, FinishReason.ERROR):
            self._observed.append(list(req.tokens))
        if req.drafter is not None:
            self.draft_length.forget(req.request_id)
        if req.routed and self.router is not None:
            self.router.forget(req.request_id)
        self._finished.append(
            GenerationOutput(req.request_id, req.prompt, list(req.generated), reason, req.stats,
                             req.sampling.seed, error))

    def drain_finished(self) -> list[GenerationOutput]:
        done, self._finished = self._finished, []
        return done

    def take_housekeeping(self) -> Housekeeping:
        """Releases and finished sequences owed to workers since the last call."""
        work = Housekeeping(self._verifier_releases, self._drafter_releases, self._observed)
        self._verifier_releases, self._drafter_releases, self._observed = {}, {}, []
        return work
