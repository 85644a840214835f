"""Batch goodput controller: per-request windows chosen for the whole round (policy only).

Where it sits: before each round the scheduler hands ``plan_round`` the group's
requests with their caps (client cap, opt-out = 0, tokens left); after the verifier's
reply it reports the verify time with ``observe_round``. Acceptance per request comes
through ``observe`` like the other window policies. The policy never reads a clock.

Why batch-level: under load the verifier is compute-bound and every drafted token
costs verify time for the whole batch, so a window that pays at batch 1 can lose
goodput. SmartSpec-style, the controller maximises predicted goodput =
Σ expected committed tokens ÷ predicted round time, where round time =
verify(B, tokens) + drafting(longest window). The verify model
``t = a + b·B + c·tokens`` is fitted online by exponentially-forgotten least squares
from the replies' timings. Windows grow greedily one token at a time, always at the
request whose next token gains most, so under overload the least-gaining requests are
the ones left without speculation. Hysteresis: the previous plan is kept unless the new
one predicts ``switch_margin`` more goodput, so a steady input never oscillates.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from specfleet.core.load import LoadSnapshot


def committed_tokens(alpha: float, gamma: int) -> float:
    """Expected tokens a round commits with window γ: 1 + α + … + α^γ."""
    return sum(alpha ** k for k in range(gamma + 1))


@dataclass
class StepTimeModel:
    """Verify time ≈ a + b·batch + c·tokens, least squares with forgetting."""

    prior_ns: tuple[float, float, float] = (2e6, 0.0, 1e6)  # (a, b, c) until fitted
    forget: float = 0.9  # weight kept by older rounds per new one (fast: load shifts quickly)
    ridge: float = 1e-3  # keeps the fit defined before enough distinct rounds
    _xtx: list[list[float]] = field(default_factory=lambda: [[0.0] * 3 for _ in range(3)])
    _xty: list[float] = field(default_factory=lambda: [0.0] * 3)
    _n: float = 0.0

    def observe(self, batch: int, tokens: int, verify_ns: float) -> None:
        x = (1.0, float(batch), float(tokens))
        for i in range(3):
            self._xty[i] = self.forget * self._xty[i] + x[i] * verify_ns
            for j in range(3):
                self._xtx[i][j] = self.forget * self._xtx[i][j] + x[i] * x[j]
        self._n = self.forget * self._n + 1

    def coefficients(self) -> tuple[float, float, float]:
        if self._n < 1.5:
            return self.prior_ns
        # Ridge towards the prior so a batch that never changed size still solves.
        p = self.prior_ns
        m = [[self._xtx[i][j] + (self.ridge * self._n * 1e0 if i == j else 0.0) for j in range(3)]
             for i in range(3)]
        v = [self._xty[i] + self.ridge * self._n * p[i] for i in range(3)]
        sol = _solve3(m, v)
        if sol is None:
            return self.prior_ns
        a, b, c = sol
        return (max(a, 0.0), max(b, 0.0), max(c, 0.0))

    def predict(self, batch: int, tokens: int) -> float:
        a, b, c = self.coefficients()
        return a + b * batch + c * tokens


def _solve3(m: list[list[float]], v: list[float]) -> tuple[float, float, float] | None:
    a = [row[:] + [v[i]] for i, row in enumerate(m)]
    for col in range(3):
        piv = max(range(col, 3), key=lambda r: abs(a[r][col]))
        if abs(a[piv][col]) < 1e-12:
            return None
        a[col], a[piv] = a[piv], a[col]
        for r in range(3):
            if r != col:
                f = a[r][col] / a[col][col]
                a[r] = [x - f * y for x, y in zip(a[r], a[col], strict=True)]
    return tuple(a[i][3] / a[i][i] for i in range(3))  # type: ignore[return-value]


@dataclass
class GoodputDraftLength:
    max_length: int = 8
    initial_alpha: float = 0.6
    smoothing: float = 0.3  # EMA weight of the newest round's acceptance
    timing_smoothing: float = 0.2  # EMA weight of the newest draft-token time
    draft_ns_per_token: float = 2e5  # prior until drafting is timed
    switch_margin: float = 0.03  # hysteresis: new plan must predict this much more goodput
    probe_every: int = 16  # rounds between one-token probes of a request left at 0
    # Rounds between one-token nudges of one request's window: with a steady plan every
    # round has the same shape and the per-token cost could not be told from the fixed one.
    explore_every: int = 5
    steps: StepTimeModel = field(default_factory=StepTimeModel)
    _alpha: dict[str, float] = field(default_factory=dict)
    _last: dict[str, int] = field(default_factory=dict)  # previous plan's windows
    _off_rounds: dict[str, int] = field(default_factory=dict)
    _rounds: dict[int, tuple[int, int]] = field(default_factory=dict)  # round → (batch, tokens)
    _planned: int = 0

    # ---- the batch plan --------------------------------------------------------------
    def goodput(self, windows: dict[str, int]) -> float:
        """Predicted committed tokens per ns of a round with these windows."""
        if not windows:
            return 0.0
        tokens = sum(g + 1 for g in windows.values())
        longest = max(windows.values())
        t = self.steps.predict(len(windows), tokens) + longest * self.draft_ns_per_token
        gain = sum(committed_tokens(self._alpha.get(r, self.initial_alpha), g) for r, g in windows.items())
        return gain / max(t, 1.0)

    def best_plan(self, caps: dict[str, int]) -> dict[str, int]:
        """Greedy: add one token at a time where it raises batch goodput most."""
        plan = dict.fromkeys(caps, 0)
        best = self.goodput(plan)
        while True:
            choice, choice_g = None, best
            for rid, cap in caps.items():
                if plan[rid] >= min(cap, self.max_length):
                    continue
                plan[rid] += 1
                g = self.goodput(plan)
                plan[rid] -= 1
                if g > choice_g:
                    choice, choice_g = rid, g
            if choice is None:
                return plan
            plan[choice] += 1
            best = choice_g

    def plan_round(self, round_id: int, caps: dict[str, int], *, now_ns: int = 0,
                   load: LoadSnapshot | None = None) -> dict[str, int]:
        """Windows for one round; ``caps`` already holds the client cap and opt-out (0)."""
        new = self.best_plan(caps)
        old = {rid: min(self._last.get(rid, new[rid]), cap) for rid, cap in caps.items()}
        plan = new if self.goodput(new) > (1 + self.switch_margin) * self.goodput(old) else old
        plan = dict(plan)
        for rid, g in plan.items():
            if g == 0 and caps[rid] > 0:
                # Without drafting its α is never measured again: probe now and then.
                n = self._off_rounds[rid] = self._off_rounds.get(rid, 0) + 1
                if n % self.probe_every == 0:
                    plan[rid] = 1
            else:
                self._off_rounds.pop(rid, None)
        self._last.update({rid: g for rid, g in plan.items()})  # the base plan, pre-nudge
        self._planned += 1
        if self.explore_every and self._planned % self.explore_every == 0 and plan:
            rid = sorted(plan)[(self._planned // self.explore_every) % len(plan)]
            if plan[rid] > 0:
                plan[rid] //= 2  # a large step tells the per-token cost apart sooner
            elif caps[rid] > 0:
                plan[rid] = 1
        self._rounds[round_id] = (len(plan), sum(g + 1 for g in plan.values()))
        return plan

    # ---- DraftLengthPolicy protocol (per-request view of the last plan) ----------------
    def window(self, request_id: str, *, now_ns: int = 0, load: LoadSnapshot | None = None) -> int:
        return self._last.get(request_id, min(self.max_length, 4))

    def observe(self, request_id: str, drafted: int, accepted: int, *, now_ns: int = 0) -> None:
        if drafted <= 0:
            return
        trials = accepted + (1 if accepted < drafted else 0)
        rate = accepted / trials if trials else 1.0
        old = self._alpha.get(request_id, self.initial_alpha)
        self._alpha[request_id] = (1 - self.smoothing) * old + self.smoothing * rate

    def observe_timing(self, draft_ns_per_token: float, verify_ns: float, *, now_ns: int = 0) -> None:
        if draft_ns_per_token > 0:
            w = self.timing_smoothing
            self.draft_ns_per_token = (1 - w) * self.draft_ns_per_token + w * draft_ns_per_token

    def observe_round(self, round_id: int, verify_ns: float, *, now_ns: int = 0) -> None:
        shape = self._rounds.pop(round_id, None)
        if shape is not None and verify_ns > 0:
            self.steps.observe(shape[0], shape[1], verify_ns)

    def forget(self, request_id: str) -> None:
        for d in (self._alpha, self._last, self._off_rounds):
            d.pop(request_id, None)
