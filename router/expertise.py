"""Expertise routing: send each request to the drafter accepted most for its kind.

Where it sits: when a request arrives without a drafter preference, the serving
backend asks ``ExpertiseRouter.route`` which drafter should serve it, and when the
request finishes it reports the request's acceptance with ``observe``. Routing only
chooses *who proposes*; it can never change the output.

Policy (CoSine-style specialisation, kept simple and explainable):
1. ``classify_domain`` puts the prompt into one of ``code``, ``data``, ``prose`` with
   cheap textual cues (no model call on the request path).
2. Per (domain, drafter) the router keeps a running mean of *tokens committed per
   verification round* (mean acceptance length, which counts the bonus token).
   Before any observation a drafter's score is its prior: higher for a drafter whose
   configured domain matches, then for ``general`` ones.
3. The best-scoring drafter wins; with probability ``exploration`` another one is
   tried so that the table keeps learning (epsilon-greedy).
Failure mode: a misclassified prompt goes to a weaker drafter — it costs speed,
never correctness, and the observed acceptance corrects the table over time.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

DOMAINS = ("code", "data", "prose")

_CODE_CUES = re.compile(
    r"^\s*(def |class |import |from \S+ import|return\b|if .*:$|for .* in .*:$|@\w+|#|\"\"\")|"
    r"[=!]=|\bself\.|\(\)|:\s*$|^\s*\w+(\.\w+)*\s*=\s*\S|__\w+__",
    re.MULTILINE,
)
_DATA_CUES = re.compile(
    r'"\w+"\s*:|^\s*[\w.-]+(,[\w .:/-]*){3,}$|\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}|'
    r"\b(INFO|WARN|WARNING|ERROR|DEBUG)\b|^\s*[{\[]|"
    r"\b\d{1,3}(\.\d{1,3}){3}\b|\[\d{2}/\w{3}/\d{4}:|\b(GET|POST|PUT|DELETE) /",
    re.MULTILINE,
)


def classify_domain(text: str) -> str:
    """``code``, ``data`` or ``prose`` from textual cues in (the end of) a prompt."""
    tail = text[-2000:]
    lines = max(1, tail.count("\n") + 1)
    code = len(_CODE_CUES.findall(tail)) / lines
    data = len(_DATA_CUES.findall(tail)) / lines
    if max(code, data) < 0.15:
        return "prose"
    return "code" if code >= data else "data"


@dataclass
class DrafterProfile:
    name: str
    domain: str  # configured specialisation: code, data, prose or general


class ExpertiseRouter:
    def __init__(
        self,
        drafters: Sequence[DrafterProfile],
        *,
        exploration: float = 0.1,
        decode: Callable[[list[int]], str] | None = None,
        seed: int = 0,
        smoothing: float = 0.1,
    ):
        if not drafters:
            raise ValueError("the router needs at least one drafter")
        self.drafters = list(drafters)
        self.exploration = exploration
        self.decode = decode
        self.smoothing = smoothing
        self._rng = random.Random(seed)
        self._score: dict[tuple[str, str], float] = {}  # (domain, drafter) → mean acceptance length
        self._count: dict[tuple[str, str], int] = {}

    def prior(self, domain: str, drafter: DrafterProfile) -> float:
        # An untried specialist for the domain first, then general drafters.
        if drafter.domain == domain:
            return 2.5
        return 2.0 if drafter.domain == "general" else 1.5

    def score(self, domain: str, drafter: str) -> float:
        profile = next(d for d in self.drafters if d.name == drafter)
        return self._score.get((domain, drafter), self.prior(domain, profile))

    def domain_of(self, prompt_token_ids: Sequence[int]) -> str:
        if self.decode is None:
            return "prose"
        return classify_domain(self.decode(list(prompt_token_ids[-512:])))

    def route(self, prompt_token_ids: Sequence[int]) -> tuple[str, str]:
        """(domain, drafter name) for a new request."""
        domain = self.domain_of(prompt_token_ids)
        ranked = sorted(self.drafters, key=lambda d: self.score(domain, d.name), reverse=True)
        choice = ranked[0]
        if len(ranked) > 1 and self._rng.random() < self.exploration:
            choice = self._rng.choice(ranked[1:])
        return domain, choice.name

    def observe(self, domain: str, drafter: str, mean_acceptance_length: float) -> None:
        """Fold one finished request's acceptance into the table."""
        key = (domain, drafter)
        n = self._count.get(key, 0)
        if n == 0:
            self._score[key] = mean_acceptance_length
        else:
            # Running mean for the first few, then an EMA so the table tracks drift.
            weight = max(1.0 / (n + 1), self.smoothing)
            self._score[key] += weight * (mean_acceptance_length - self._score[key])
        self._count[key] = n + 1

    def table(self) -> dict[str, dict[str, float]]:
        """domain → drafter → current score (observed or prior), for logs and ``Info``."""
        return {dom: {d.name: self.score(dom, d.name) for d in self.drafters} for dom in DOMAINS}


def router_from_config(cfg, decode: Callable[[list[int]], str]) -> ExpertiseRouter | None:
    """The router ``cfg.router`` describes; None for policy ``fixed`` (default drafter)."""
    if cfg.router.policy != "expertise":
        return None
    return ExpertiseRouter(
        [DrafterProfile(d.name, d.domain) for d in cfg.drafters],
        exploration=cfg.router.exploration,
        decode=decode,
    )
