"""Speculation statistics: per request, and per round across the whole fleet.

Where it sits: the engine (``engine/engine.py``) folds every verify reply into
the request's ``RequestStats`` (returned with the output, and in the last stream
chunk) and into one fleet-wide ``SpecDecodingStats`` (read by benchmarks, logs and,
later, Prometheus). Executors report where a round's time went as ``RoundTiming``.

Vocabulary (vLLM's): a round *drafts* tokens along its longest path, *accepts* a
prefix of them and always emits one more (*recovered* at the first rejection or
*bonus* after a full match), so mean acceptance length = emitted / rounds >= 1.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


def _count_positions(drafted_at: list[int], accepted_at: list[int], drafted: int, accepted: int) -> None:
    """Add one round to per-position counters ([k] = rounds with a k-th draft token / accepting it)."""
    while len(drafted_at) < drafted:
        drafted_at.append(0)
        accepted_at.append(0)
    for k in range(drafted):
        drafted_at[k] += 1
        accepted_at[k] += int(k < accepted)


@dataclass
class RequestStats:
    """Speculation statistics of one request."""

    rounds: int = 0  # verification rounds (target forward passes), the prefill round included
    drafted: int = 0  # draft tokens proposed (longest path per round)
    accepted: int = 0  # draft tokens accepted
    emitted: int = 0  # tokens committed (accepted + recovered/bonus)
    position_drafted: list[int] = field(default_factory=list)  # [k]: rounds with a k-th draft token
    position_accepted: list[int] = field(default_factory=list)  # [k]: rounds accepting it
    drafters: Counter = field(default_factory=Counter)  # drafter name → rounds it served with drafts
    # drafter → accepted draft tokens it had proposed (per-node provenance: with fused
    # trees several drafters are credited with the same token).
    accepted_by: Counter = field(default_factory=Counter)
    verifier_group: int | None = None  # the group whose KV held the request (last one, after moves)
    domain: str | None = None  # the router's classification, when the router chose the drafter
    queue_ns: int = 0  # arrival → admission into a verifier group
    first_token_ns: int | None = None  # arrival → first committed token (TTFT)

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens committed per verification round, counting the recovered/bonus token."""
        return self.emitted / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def observe_round(self, drafted: int, accepted: int, emitted: int, drafter: str | None,
                      credit: dict[str, tuple[int, int]] | None = None) -> None:
        """``drafter``: who earned the round; ``credit``: drafter → (drafted, accepted)
        for every drafter whose nodes were verified (default: ``drafter`` alone)."""
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.emitted += emitted
        _count_positions(self.position_drafted, self.position_accepted, drafted, accepted)
        if credit is None:
            credit = {drafter: (drafted, accepted)} if drafter else {}
        for name, (own_drafted, own_accepted) in credit.items():
            if own_drafted:
                self.drafters[name] += 1
                self.accepted_by[name] += own_accepted


@dataclass
class Counts:
    """Draft/accept/emit counters of one slice of traffic (a drafter, a domain, a group)."""

    rounds: int = 0  # request-rounds (one request verified once)
    drafted: int = 0
    accepted: int = 0
    emitted: int = 0

    def add(self, drafted: int, accepted: int, emitted: int) -> None:
        self.rounds += 1
        self.drafted += drafted
        self.accepted += accepted
        self.emitted += emitted

    @property
    def mean_acceptance_length(self) -> float:
        return self.emitted / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass
class SpecDecodingStats:
    """Fleet-wide counters since start, updated once per request per round (vLLM's
    ``SpecDecodingStats`` with SpecFleet's labels: drafter, domain, verifier group)."""

    verify_rounds: int = 0  # verify calls (one forward pass of one group)
    position_drafted: list[int] = field(default_factory=list)
    position_accepted: list[int] = field(default_factory=list)
    per_drafter: dict[str, Counts] = field(default_factory=dict)  # "" = undrafted rounds
    per_domain: dict[str, Counts] = field(default_factory=dict)
    per_group: dict[int, Counts] = field(default_factory=dict)
    draft_failures: Counter = field(default_factory=Counter)  # drafter → failed calls
    verify_failures: Counter = field(default_factory=Counter)  # group → failed calls

    def observe(self, *, drafter: str, domain: str, group: int, drafted: int, accepted: int,
                emitted: int) -> None:
        _count_positions(self.position_drafted, self.position_accepted, drafted, accepted)
        for table, key in ((self.per_drafter, drafter), (self.per_domain, domain), (self.per_group, group)):
            counts = table.get(key)
            if counts is None:
                counts = table[key] = Counts()
            counts.add(drafted, accepted, emitted)


@dataclass(frozen=True)
class RoundTiming:
    """Where one round's wall time went (ns); overhead = wall − compute on the critical path."""

    wall_ns: int  # from launching the round to its reply being available
    draft_compute_ns: int  # drafting on the critical path (slowest drafter if they ran side by side)
    verify_compute_ns: int  # the verifier's own time for the round
    group: int = 0  # verifier group the round ran on

    @property
    def overhead_ns(self) -> int:
        return self.wall_ns - self.draft_compute_ns - self.verify_compute_ns
