"""The simulator's executor: runs a ``RoundPlan`` on simulated workers, in no time.

Where it sits: ``simulator.Simulator`` takes the scheduler's plans and hands each to
``SimExecutor.run_plan``, which calls the simulated drafters and the group's
simulated verifier through the same contracts the in-process executor uses
(``engine/executor.py``), then prices the round with the ``StepTimeModel`` and the
network model. The round's duration is *returned*, not waited for: the event loop
schedules the outcome at ``now + duration``.

How the round's time is composed follows the executor being predicted:
``drafters_parallel`` (Ray: each drafter on its own node; in-process: one after
another), and the outcome's ``draft_ns`` / ``draft_positions`` / verify
``compute_ns`` are filled exactly as real executors fill them, because the adaptive
window policy learns its cost ratio from them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from specfleet.core.types import DraftProposal
from specfleet.core.workers import (
    DraftReply,
    Housekeeping,
    RoundOutcome,
    RoundPlan,
    VerifyReply,
    ahead_requests,
)
from specfleet.sim.acceptance import AcceptanceModel
from specfleet.sim.step_time import StepTimeModel
from specfleet.sim.workers import DRAFT_TOKEN, TARGET_TOKEN, SimDraftWorker, SimVerifyWorker


@dataclass(frozen=True)
class NetworkModel:
    """One message between nodes costs ``hop_ns`` plus its bytes over ``bytes_per_s``."""

    hop_ns: int = 0  # one-way latency of a hop (0: everything in one process)
    bytes_per_s: float = 0.0  # 0: size is free
    bytes_per_token: int = 8  # int64 ids (tokens cross the network, never tensors)

    def message_ns(self, tokens: int) -> int:
        if not self.hop_ns and not self.bytes_per_s:
            return 0
        size = tokens * self.bytes_per_token + 64  # + envelope
        return self.hop_ns + (int(size / self.bytes_per_s * 1e9) if self.bytes_per_s else 0)


class SimExecutor:
    """Simulated drafters and verifier groups behind the executor contract."""

    def __init__(self, drafters: Sequence[str], groups: int, step_time: StepTimeModel,
                 acceptance: AcceptanceModel, *, network: NetworkModel | None = None,
                 drafters_parallel: bool = False, drafter_cost_names: Mapping[str, str] | None = None):
        self.domain_of: dict[str, str] = {}
        self.drafters = {name: SimDraftWorker(name) for name in drafters}
        self.verifiers = [SimVerifyWorker(acceptance, self.domain_of) for _ in range(groups)]
        self.step_time = step_time
        self.network = network or NetworkModel()
        self.drafters_parallel = drafters_parallel
        # drafter → the profiled drafter whose timings it has (64 copies of one model)
        self.cost_name = dict(drafter_cost_names or {})
        self.overhead_ns = int(getattr(step_time, "round_overhead_ns", 0.0))
        self.busy_ns: dict[str, int] = {name: 0 for name in drafters}
        self.busy_ns.update({f"group{g}": 0 for g in range(groups)})
        self.plans: list[RoundPlan] | None = None  # set to [] to record every plan

    def run_plan(self, plan: RoundPlan) -> tuple[RoundOutcome, int]:
        """The plan's outcome and how long the round takes (ns)."""
        if self.plans is not None:
            self.plans.append(plan)
        outcome = RoundOutcome(plan.round_id, plan.group)
        replies = []
        net = self.network
        critical = 0
        for name, calls in plan.drafts.items():
            worker = self.drafters[name]
            reply = worker.propose(calls).result()
            outcome.drafts[name] = reply
            replies.append(reply)
            positions = max((len(p) for p in reply.proposals), default=0)
            outcome.draft_positions += positions
            critical = self._after(critical, self._price_draft(name, worker, len(calls), positions)[1])
        verifier = self.verifiers[plan.group]
        reply = verifier.verify(plan.verify, replies).result()
        verify_ns = self.step_time.verify_ns(plan.group, batch=len(plan.verify),
                                             tokens=verifier.last_tokens, context=verifier.last_context)
        self.busy_ns[f"group{plan.group}"] += verify_ns
        outcome.draft_ns = critical
        outcome.verify = VerifyReply(reply.results, verify_ns, reply.unknown)
        # Pipelined mode: drafting ahead runs beside the verify; the round ends with the later.
        verify_side = verify_ns + net.message_ns(verifier.last_tokens)
        ahead_side = self._run_ahead(plan, outcome, reply.results) if plan.ahead else 0
        outcome.wall_ns = critical + max(verify_side, ahead_side) + self.overhead_ns
        return outcome, outcome.wall_ns

    def _run_ahead(self, plan: RoundPlan, outcome: RoundOutcome, results) -> int:
        """The plan's ahead calls on the simulated drafters; returns their critical path.
        An ahead draft's first token is the drafter's guess of the bonus token: after a
        fully accepted window it is right with the drafter's acceptance probability of
        one more position (the curve, a fresh draw), and the rest are ordinary drafts."""
        whole = {r.request_id for r in results if r.emitted and r.num_accepted == r.num_drafted}
        critical = 0
        for name, calls in plan.ahead.items():
            worker = self.drafters[name]
            own = outcome.drafts.get(name)
            reply = worker.propose(ahead_requests(calls, own if isinstance(own, DraftReply) else None)).result()
            proposals = []
            for p in reply.proposals:
                if p.tokens:
                    rid = p.request_id
                    hit = rid in whole and self.verifiers[plan.group].acceptance.accepted(
                        rid, drafter=name, domain=self.domain_of.get(rid, "prose"),
                        round_index=self.verifiers[plan.group].rounds.get(rid, 0), window=1) == 1
                    p = DraftProposal(rid, [TARGET_TOKEN if hit else DRAFT_TOKEN, *p.tokens[1:]], p.parents,
                                      p.confidences, None, name)
                proposals.append(p)
            positions = max((len(p) for p in proposals), default=0)
            compute_ns, ns = self._price_draft(name, worker, len(calls), positions)
            outcome.ahead[name] = DraftReply(proposals, compute_ns, reply.unknown)
            critical = self._after(critical, ns)
        return critical

    def _price_draft(self, name: str, worker: SimDraftWorker, batch: int, positions: int) -> tuple[int, int]:
        """A drafter call's (compute, compute + messages there and back); the compute
        counts as the drafter's busy time."""
        compute = self.step_time.draft_ns(self.cost_name.get(name, name), batch=batch,
                                          new_tokens=worker.last_new_tokens, positions=positions,
                                          context=worker.last_context)
        self.busy_ns[name] += compute
        net = self.network
        ns = compute
        if net.hop_ns or net.bytes_per_s:
            ns += net.message_ns(worker.last_new_tokens) + net.message_ns(positions * batch)
        return compute, ns

    def _after(self, critical: int, ns: int) -> int:
        """The critical path once one more drafter call of ``ns`` is on it."""
        return max(critical, ns) if self.drafters_parallel else critical + ns

    def housekeeping(self, work: Housekeeping) -> None:
        for group, request_ids in work.verifier_releases.items():
            self.verifiers[group].release(request_ids)
        for name, request_ids in work.drafter_releases.items():
            self.drafters[name].release(request_ids)
        for rid in (r for ids in work.verifier_releases.values() for r in ids):
            self.domain_of.pop(rid, None)
