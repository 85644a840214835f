"""How many tokens to draft per request per round (policy only, no mechanism).

Where it sits: before each round the engine asks the policy for every request's
window; after verification it reports what was accepted and how long drafting and
verifying took. Every call is told the time (``now_ns``) and, for windows, a
``LoadSnapshot``; the policy never reads a clock, so it runs unchanged on a simulated
one. Windows only choose *what*
is proposed; they can never change the output, which the accept rule fixes.

``AdaptiveDraftLength`` picks the window that maximises expected committed tokens
per unit time. With per-token acceptance α, a window γ commits on average
``(1 − α^(γ+1)) / (1 − α)`` tokens and costs ``γ·c + 1`` target-forward units, where
c is the measured draft-token/verify-step time ratio (PEARL's speed ratio). α is a
per-request running estimate (EMA), so a request whose drafts stop matching falls
back to plain decoding (γ = 0), SmartSpec-style, and recovers when drafts match.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from specfleet.core.load import LoadSnapshot


class DraftLengthPolicy(Protocol):
    def window(self, request_id: str, *, now_ns: int = 0, load: LoadSnapshot | None = None) -> int: ...

    def observe(self, request_id: str, drafted: int, accepted: int, *, now_ns: int = 0) -> None: ...

    def observe_timing(self, draft_ns_per_token: float, verify_ns: float, *, now_ns: int = 0) -> None: ...

    def forget(self, request_id: str) -> None: ...


@dataclass
class FixedDraftLength:
    length: int

    def window(self, request_id: str, *, now_ns: int = 0, load: LoadSnapshot | None = None) -> int:
        return self.length

    def observe(self, request_id: str, drafted: int, accepted: int, *, now_ns: int = 0) -> None:
        pass

    def observe_timing(self, draft_ns_per_token: float, verify_ns: float, *, now_ns: int = 0) -> None:
        pass

    def forget(self, request_id: str) -> None:
        pass


def expected_speedup(alpha: float, gamma: int, cost_ratio: float) -> float:
    """Expected tokens per target-forward-equivalent (Leviathan et al.'s formula)."""
    if gamma == 0:
        return 1.0
    committed = gamma + 1 if alpha >= 1.0 else (1 - alpha ** (gamma + 1)) / (1 - alpha)
    return committed / (gamma * cost_ratio + 1)


@dataclass
class AdaptiveDraftLength:
    max_length: int = 8
    initial_alpha: float = 0.6  # prior before a request has any history
    smoothing: float = 0.3  # EMA weight of the newest round
    cost_ratio: float = 0.1  # prior c until timings are observed
    probe_every: int = 16  # rounds between one-token probes while speculation is off
    timing_smoothing: float = 0.2  # EMA weight of the newest draft/verify timing
    _alpha: dict[str, float] = field(default_factory=dict)
    _rounds_off: dict[str, int] = field(default_factory=dict)

    def window(self, request_id: str, *, now_ns: int = 0, load: LoadSnapshot | None = None) -> int:
        alpha = self._alpha.get(request_id, self.initial_alpha)
        best = max(range(self.max_length + 1), key=lambda g: expected_speedup(alpha, g, self.cost_ratio))
        if best > 0:
            return best
        # Speculation looks unprofitable. Without drafting, neither α nor c would ever
        # be measured again, so it could never switch back on: probe with one token,
        # every round while drafting is cheap, else every `probe_every` rounds.
        rounds = self._rounds_off[request_id] = self._rounds_off.get(request_id, 0) + 1
        return 1 if self.cost_ratio < 0.5 or rounds % self.probe_every == 0 else 0

    def observe(self, request_id: str, drafted: int, accepted: int, *, now_ns: int = 0) -> None:
        if drafted <= 0:
            return
        # A window of γ with a accepted tokens: estimate per-token α as the fraction of
        # positions passed, counting the rejected one (a < γ) as a failure.
        trials = accepted + (1 if accepted < drafted else 0)
        rate = accepted / trials if trials else 1.0
        old = self._alpha.get(request_id, self.initial_alpha)
        self._alpha[request_id] = (1 - self.smoothing) * old + self.smoothing * rate

    def observe_timing(self, draft_ns_per_token: float, verify_ns: float, *, now_ns: int = 0) -> None:
        if verify_ns > 0 and draft_ns_per_token > 0:
            w = self.timing_smoothing
            self.cost_ratio = (1 - w) * self.cost_ratio + w * (draft_ns_per_token / verify_ns)

    def forget(self, request_id: str) -> None:
        self._alpha.pop(request_id, None)
        self._rounds_off.pop(request_id, None)


@dataclass
class PearlDraftLength:
    """PEARL's window for pipelined speculation (``engine/pipeline.py``): drafting ahead
    is hidden behind the verify while it takes no longer, so the window is what the
    drafter drafts in one verify's time — ``1/c`` tokens, less the bonus position the
    ahead draft also covers — whatever the acceptance (a rejected window costs no
    verifier time that drafting would not have cost). c is measured, as above."""

    max_length: int = 8
    cost_ratio: float = 0.1  # prior c until timings are observed
    timing_smoothing: float = 0.2

    def window(self, request_id: str, *, now_ns: int = 0, load: LoadSnapshot | None = None) -> int:
        per_verify = 1.0 / max(self.cost_ratio, 1e-6)
        return max(1, min(self.max_length, round(per_verify) - 1))

    def observe(self, request_id: str, drafted: int, accepted: int, *, now_ns: int = 0) -> None:
        pass

    def observe_timing(self, draft_ns_per_token: float, verify_ns: float, *, now_ns: int = 0) -> None:
        if verify_ns > 0 and draft_ns_per_token > 0:
            w = self.timing_smoothing
            self.cost_ratio = (1 - w) * self.cost_ratio + w * (draft_ns_per_token / verify_ns)

    def forget(self, request_id: str) -> None:
        pass
