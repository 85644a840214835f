"""Routing: which drafters propose for a request — the contract, and the first routers.

Where it sits: the scheduler asks a ``Router`` at admission (``route``: the request's
domain and first drafter), before every round (``cooperators``: who drafts this round,
with how much trust, possibly re-routing the request) and after every verification
round (``observe``: what each drafter got accepted, and what the round cost). Routing
only chooses *who proposes*; it can never change the output.

Routers here: ``ExpertiseRouter`` (the first one; routes once at admission, one
drafter per request — kept as a benchmark arm, "today's expertise router"),
``RandomRouter`` (a benchmark arm). The learned, cost- and load-aware bandit with
cooperation is ``policy/learned_routing.py``.

ExpertiseRouter's policy:
Policy (CoSine-style specialisation, kept simple and explainable):
1. ``domains.classify_domain`` puts the prompt into ``code``, ``data`` or ``prose``.
2. Per (domain, drafter) the router keeps a running mean of *tokens committed per
   verification round* (mean acceptance length, counting the bonus token), fed one
   round at a time — a long request teaches the table as it runs, not once at its end.
   Before any observation a drafter's score is its prior: highest for a drafter whose
   configured domain matches, then for ``general`` ones.
3. The best-scoring drafter wins; with probability ``exploration`` another one is
   tried so that the table keeps learning (epsilon-greedy, seeded).
Failure mode: a misclassified prompt goes to a weaker drafter — it costs speed,
never correctness, and the observed acceptance corrects the table over time.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from specfleet.core.load import LoadSnapshot
from specfleet.policy.domains import DOMAINS, classify_domain

__all__ = ["DOMAINS", "Cooperators", "DrafterProfile", "ExpertiseRouter", "RandomRouter",
           "RoundFeedback", "Router", "RouterPriors", "classify_domain"]

# (drafter, reliability in (0, 1]) per cooperating drafter, the primary first.
Cooperators = tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class RoundFeedback:
    """What one verification round of one request tells the router."""

    # drafter → (tokens it drafted on its deepest path, how many were accepted), per
    # drafter whose nodes were verified (several when proposals were fused).
    credit: Mapping[str, tuple[int, int]]
    emitted: int  # tokens committed this round (accepted + bonus, after the stop rule)
    draft_ns: Mapping[str, int] = field(default_factory=dict)  # drafter → its call's compute time
    verify_ns: int = 0  # the verify call's compute time (the whole batch's forward)


class Router(Protocol):
    """What the scheduler asks of a router (every method is told the time and load)."""

    drafters: list[DrafterProfile]

    def route(self, prompt_token_ids: Sequence[int], *, now_ns: int = 0,
              load: LoadSnapshot | None = None) -> tuple[str, str]:
        """(domain, first drafter) of a new request."""
        ...

    def cooperators(self, request_id: str, domain: str, current: str, *, width: int = 1,
                    now_ns: int = 0, load: LoadSnapshot | None = None) -> Cooperators:
        """Who drafts for the request this round (at most ``width``), primary first;
        a primary other than ``current`` re-routes the request."""
        ...

    def observe(self, request_id: str, domain: str, feedback: RoundFeedback, *, now_ns: int = 0) -> None: ...

    def forget(self, request_id: str) -> None: ...

    def add_drafter(self, profile: DrafterProfile) -> None: ...

    def remove_drafter(self, name: str) -> None: ...

    def table(self) -> dict[str, dict[str, float]]: ...


@dataclass(frozen=True)
class DrafterProfile:
    name: str
    domain: str  # configured specialisation: code, data, prose or general


@dataclass(frozen=True)
class RouterPriors:
    """Scores (tokens per round) an untried drafter starts from."""

    specialist: float = 2.5  # the drafter's domain is the request's
    general: float = 2.0  # a drafter configured for every domain
    other: float = 1.5  # a specialist of another domain


DEFAULT_PRIORS = RouterPriors()


class ExpertiseRouter:
    def __init__(
        self,
        drafters: Sequence[DrafterProfile],
        *,
        exploration: float = 0.1,
        decode: Callable[[list[int]], str] | None = None,
        seed: int = 0,
        smoothing: float = 0.1,
        priors: RouterPriors = DEFAULT_PRIORS,
    ):
        if not drafters:
            raise ValueError("the router needs at least one drafter")
        self.drafters = list(drafters)
        self.exploration = exploration
        self.decode = decode
        self.smoothing = smoothing
        self.priors = priors
        self._rng = random.Random(seed)
        self._score: dict[tuple[str, str], float] = {}  # (domain, drafter) → mean acceptance length
        self._count: dict[tuple[str, str], int] = {}

    def prior(self, domain: str, drafter: DrafterProfile) -> float:
        if drafter.domain == domain:
            return self.priors.specialist
        return self.priors.general if drafter.domain == "general" else self.priors.other

    def score(self, domain: str, drafter: str) -> float:
        profile = next(d for d in self.drafters if d.name == drafter)
        return self._score.get((domain, drafter), self.prior(domain, profile))

    def domain_of(self, prompt_token_ids: Sequence[int]) -> str:
        if self.decode is None:
            return "prose"
        return classify_domain(self.decode(list(prompt_token_ids[-512:])))

    def route(
        self, prompt_token_ids: Sequence[int], *, now_ns: int = 0, load: LoadSnapshot | None = None
    ) -> tuple[str, str]:
        """(domain, drafter name) for a new request.

        ``now_ns`` and ``load`` are what every policy call is told; this policy does
        not weigh load yet (cost- and load-aware routing is the cooperative-drafting
        work), but callers already pass them."""
        domain = self.domain_of(prompt_token_ids)
        ranked = sorted(self.drafters, key=lambda d: self.score(domain, d.name), reverse=True)
        choice = ranked[0]
        if len(ranked) > 1 and self._rng.random() < self.exploration:
            choice = self._rng.choice(ranked[1:])
        return domain, choice.name

    def observe_round(
        self, domain: str, drafter: str, *, drafted: int, accepted: int, emitted: int,
        now_ns: int = 0,
    ) -> None:
        """Fold one verification round of one request into the table.

        Rounds where the drafter proposed nothing (window 0) say nothing about it."""
        if drafted <= 0:
            return
        key = (domain, drafter)
        n = self._count.get(key, 0)
        if n == 0:
            self._score[key] = float(emitted)
        else:
            # Running mean for the first few, then an EMA so the table tracks drift.
            weight = max(1.0 / (n + 1), self.smoothing)
            self._score[key] += weight * (emitted - self._score[key])
        self._count[key] = n + 1

    def table(self) -> dict[str, dict[str, float]]:
        """domain → drafter → current score (observed or prior), for logs and ``Info``."""
        return {dom: {d.name: self.score(dom, d.name) for d in self.drafters} for dom in DOMAINS}

    # ---- the Router contract: one drafter per request, chosen once at admission ----------
    def cooperators(self, request_id: str, domain: str, current: str, *, width: int = 1,
                    now_ns: int = 0, load: LoadSnapshot | None = None) -> Cooperators:
        return ((current, 1.0),)

    def observe(self, request_id: str, domain: str, feedback: RoundFeedback, *, now_ns: int = 0) -> None:
        for drafter, (drafted, accepted) in feedback.credit.items():
            self.observe_round(domain, drafter, drafted=drafted, accepted=accepted,
                               emitted=min(feedback.emitted, accepted + 1), now_ns=now_ns)

    def forget(self, request_id: str) -> None:
        pass

    def add_drafter(self, profile: DrafterProfile) -> None:
        self.drafters = [d for d in self.drafters if d.name != profile.name] + [profile]

    def remove_drafter(self, name: str) -> None:
        if len(self.drafters) == 1 and self.drafters[0].name == name:
            raise ValueError("cannot remove the router's last drafter")
        self.drafters = [d for d in self.drafters if d.name != name]


class RandomRouter(ExpertiseRouter):
    """Every request to a drafter drawn uniformly at admission (seeded): a benchmark
    arm that shows what learning is worth. Classifies domains like its parent, for stats."""

    def route(self, prompt_token_ids: Sequence[int], *, now_ns: int = 0,
              load: LoadSnapshot | None = None) -> tuple[str, str]:
        return self.domain_of(prompt_token_ids), self._rng.choice(self.drafters).name
