"""Expertise routing: send each request to the drafter accepted most for its kind.

Where it sits: when a request arrives without a drafter preference, the engine asks
``ExpertiseRouter.route`` at admission which drafter should serve it, and after every
verification round reports what that drafter achieved with ``observe_round``.
Routing only chooses *who proposes*; it can never change the output.

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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from specfleet.core.load import LoadSnapshot
from specfleet.policy.domains import DOMAINS, classify_domain

__all__ = ["DOMAINS", "DrafterProfile", "ExpertiseRouter", "RouterPriors", "classify_domain"]


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


class ExpertiseRouter:
    def __init__(
        self,
        drafters: Sequence[DrafterProfile],
        *,
        exploration: float = 0.1,
        decode: Callable[[list[int]], str] | None = None,
        seed: int = 0,
        smoothing: float = 0.1,
        priors: RouterPriors = RouterPriors(),
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
