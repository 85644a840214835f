"""Learned routing: a cost- and load-aware bandit over drafters that lets them cooperate.

Where it sits: the scheduler asks ``LearnedRouter.route`` when a request arrives (its
domain and first drafter), ``cooperators`` before every round (who drafts for it this
round and how much each is trusted — the fusion plan's weights — possibly moving the
request to another drafter), and ``observe`` after every verification round with what
each drafter got accepted (per-node provenance, ``policy/fusion.credit``) and what the
round cost. It decides who proposes, never what is emitted: every choice is exact.

Policy (CoSine's routing and cooperation, SPIN's reward, a UCB bandit):
1. Arms are (domain, drafter). The reward of one request-round for a drafter is the
   tokens it alone would have committed (its accepted run + the bonus token) per
   millisecond of the round it took part in (its own draft call + the verify call).
   A cheap drafter accepted half as often can therefore win, and a drafter whose calls
   slow down under load loses ground as it does.
2. Exploration is UCB1: ``score = mean + c * best_mean * sqrt(ln N / n)`` with ``N``
   the domain's observed rounds and ``n`` the arm's. An arm never tried scores above
   every tried one (ordered among themselves by the textual prior: specialist, general,
   other), so a drafter added at run time gets traffic at once and keeps only what it
   earns.
3. Load: a drafter the scheduler reports down is skipped; a drafter's score is divided
   by ``1 + load_weight * share``, its share of the drafted requests, so identical
   copies split the traffic instead of the first taking all of it.
4. Re-routing mid-flight: after ``min_rounds`` rounds on its primary drafter, a request
   whose own reward (an EMA) falls below ``(1 - reroute_margin)`` of what the best
   alternative promises for its domain is moved there (a move costs the new drafter a
   prefill, hence the margin and the minimum).
5. Cooperation: up to ``width`` drafters propose (the width policy sets it from load);
   besides the primary, the next best by score join while their score is at least
   ``cooperate_ratio`` of the primary's. Each one's fusion weight is its per-token
   acceptance rate for the domain (accepted / drafted; 0.5 before any evidence).
Everything is keyed dicts and arithmetic per request per round; no clock, no worker.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from specfleet.core.load import LoadSnapshot
from specfleet.policy.domains import DOMAINS, classify_domain
from specfleet.policy.routing import (
    DEFAULT_PRIORS,
    Cooperators,
    DrafterProfile,
    RoundFeedback,
    RouterPriors,
)

_UNTRIED = 1e12  # an untried arm's score: above any reward (tokens per ms)
_MIN_ROUND_MS = 1e-3  # rounds reported without timings (scripted workers) count as 1 µs


@dataclass
class _Arm:
    rounds: int = 0
    reward: float = 0.0  # tokens committed per ms of round (running mean, then EMA)
    drafted: float = 0.0  # decayed sums for the acceptance rate (fusion weight)
    accepted: float = 0.0


@dataclass
class _RequestState:
    primary: str
    rounds_on_primary: int = 0
    reward: float = 0.0  # EMA of the primary's reward for this request


class LearnedRouter:
    def __init__(
        self,
        drafters: Sequence[DrafterProfile],
        *,
        decode: Callable[[list[int]], str] | None = None,
        classify: Callable[[str], str] = classify_domain,
        ucb_c: float = 0.3,
        smoothing: float = 0.05,
        load_weight: float = 0.5,
        reroute_margin: float = 0.25,
        min_rounds: int = 4,
        cooperate_ratio: float = 0.6,
        priors: RouterPriors = DEFAULT_PRIORS,
    ):
        if not drafters:
            raise ValueError("the router needs at least one drafter")
        self.drafters = list(drafters)
        self.decode = decode
        self.classify = classify
        self.ucb_c = ucb_c
        self.smoothing = smoothing
        self.load_weight = load_weight
        self.reroute_margin = reroute_margin
        self.min_rounds = min_rounds
        self.cooperate_ratio = cooperate_ratio
        self.priors = priors
        self._arms: dict[tuple[str, str], _Arm] = {}
        self._domain_rounds: dict[str, int] = {}
        self._requests: dict[str, _RequestState] = {}
        self.reroutes = 0  # requests moved to another drafter mid-flight (stats)

    # ---- scoring --------------------------------------------------------------------------
    def _prior(self, domain: str, profile: DrafterProfile) -> float:
        if profile.domain == domain:
            return self.priors.specialist
        return self.priors.general if profile.domain == "general" else self.priors.other

    def _mean(self, domain: str, name: str) -> float | None:
        arm = self._arms.get((domain, name))
        return arm.reward if arm is not None and arm.rounds else None

    def _score(self, domain: str, profile: DrafterProfile, load: LoadSnapshot | None) -> float:
        arm = self._arms.get((domain, profile.name))
        if arm is None or not arm.rounds:
            score = _UNTRIED * (1.0 + 0.01 * self._prior(domain, profile))
        else:
            best = max((self._mean(domain, d.name) or 0.0) for d in self.drafters)
            total = self._domain_rounds.get(domain, 1)
            score = arm.reward + self.ucb_c * best * math.sqrt(math.log(total + 1) / arm.rounds)
        served = sum(load.drafter_requests.values()) if load is not None else 0
        if served:
            share = load.drafter_requests.get(profile.name, 0) / served
            score /= 1.0 + self.load_weight * share
        return score

    def _ranked(self, domain: str, load: LoadSnapshot | None) -> list[tuple[float, DrafterProfile]]:
        down = load.drafters_down if load is not None else frozenset()
        alive = [d for d in self.drafters if d.name not in down] or self.drafters
        scored = [(self._score(domain, d, load), i, d) for i, d in enumerate(alive)]
        scored.sort(key=lambda x: (-x[0], x[1]))
        return [(s, d) for s, _, d in scored]

    def reliability(self, domain: str, name: str) -> float:
        """The drafter's per-token acceptance rate for the domain, its fusion weight."""
        arm = self._arms.get((domain, name))
        if arm is None or arm.drafted <= 0:
            return 0.5
        return min(1.0, max(0.05, arm.accepted / arm.drafted))

    # ---- the Router contract ----------------------------------------------------------------
    def domain_of(self, prompt_token_ids: Sequence[int]) -> str:
        if self.decode is None:
            return "prose"
        return self.classify(self.decode(list(prompt_token_ids[-512:])))

    def route(self, prompt_token_ids: Sequence[int], *, now_ns: int = 0,
              load: LoadSnapshot | None = None) -> tuple[str, str]:
        domain = self.domain_of(prompt_token_ids)
        return domain, self._ranked(domain, load)[0][1].name

    def cooperators(self, request_id: str, domain: str, current: str, *, width: int = 1,
                    now_ns: int = 0, load: LoadSnapshot | None = None) -> Cooperators:
        state = self._requests.get(request_id)
        if state is None or state.primary != current:
            state = self._requests[request_id] = _RequestState(current)
        ranked = self._ranked(domain, load)
        names = [d.name for _, d in ranked]
        if current not in names:  # removed or down: move at once
            state = self._requests[request_id] = _RequestState(names[0])
            self.reroutes += 1
        elif state.rounds_on_primary >= self.min_rounds:
            best = next((d.name for _, d in ranked if d.name != current), None)
            promise = self._mean(domain, best) if best is not None else None
            if promise is not None and state.reward < (1.0 - self.reroute_margin) * promise:
                state = self._requests[request_id] = _RequestState(best)
                self.reroutes += 1
        primary = state.primary
        chosen = [primary]
        primary_score = next(s for s, d in ranked if d.name == primary)
        for score, profile in ranked:
            if len(chosen) >= width:
                break
            if profile.name != primary and score >= self.cooperate_ratio * primary_score:
                chosen.append(profile.name)
        return tuple((name, self.reliability(domain, name)) for name in chosen)

    def observe(self, request_id: str, domain: str, feedback: RoundFeedback, *, now_ns: int = 0) -> None:
        state = self._requests.get(request_id)
        for name, (drafted, accepted) in feedback.credit.items():
            if drafted <= 0:
                continue
            elapsed_ms = max((feedback.draft_ns.get(name, 0) + feedback.verify_ns) / 1e6, _MIN_ROUND_MS)
            reward = min(feedback.emitted, accepted + 1) / elapsed_ms
            arm = self._arms.setdefault((domain, name), _Arm())
            weight = max(1.0 / (arm.rounds + 1), self.smoothing)
            arm.reward += weight * (reward - arm.reward)
            arm.rounds += 1
            decay = 1.0 - self.smoothing
            arm.drafted = arm.drafted * decay + drafted
            arm.accepted = arm.accepted * decay + accepted
            self._domain_rounds[domain] = self._domain_rounds.get(domain, 0) + 1
            if state is not None and name == state.primary:
                state.reward = reward if not state.rounds_on_primary else 0.5 * (state.reward + reward)
                state.rounds_on_primary += 1

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    def add_drafter(self, profile: DrafterProfile) -> None:
        """A drafter joining a running fleet: untried, so it is tried first everywhere."""
        self.drafters = [d for d in self.drafters if d.name != profile.name] + [profile]
        for key in [k for k in self._arms if k[1] == profile.name]:
            del self._arms[key]

    def remove_drafter(self, name: str) -> None:
        if len(self.drafters) == 1 and self.drafters[0].name == name:
            raise ValueError("cannot remove the router's last drafter")
        self.drafters = [d for d in self.drafters if d.name != name]

    def table(self) -> dict[str, dict[str, float]]:
        """domain → drafter → mean reward (tokens per ms of round; 0 if untried)."""
        return {dom: {d.name: self._mean(dom, d.name) or 0.0 for d in self.drafters} for dom in DOMAINS}
