"""Acceptance models: how many of a simulated draft's tokens the target accepts.

Where it sits: the simulated verifier (``workers.py``) asks an ``AcceptanceModel``
once per request per round how many of the ``window`` draft tokens pass. Two kinds:

- ``AcceptanceCurves``: per drafter, per domain, per position k the conditional
  probability that draft token k is accepted given tokens 0..k-1 were — measured by
  ``specfleet profile --acceptance`` on held-out zoo prompts. Draws come from one
  seeded generator per request, so a request's acceptance depends on (seed, request
  id, its own rounds), never on what else shares its batch.
- ``AcceptanceTrace``: accepted counts recorded per request per round (from a real
  run); replays them exactly (the invariant test, trace workloads).
"""

from __future__ import annotations

import json
import random
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol


class AcceptanceModel(Protocol):
    def accepted(self, request_id: str, *, drafter: str, domain: str, round_index: int,
                 window: int) -> int:
        """Draft tokens (0..window) accepted in this request's ``round_index``-th round."""
        ...


class AcceptanceCurves:
    """Per-(drafter, domain) conditional acceptance per position, drawn with a seeded RNG."""

    def __init__(self, curves: Mapping[str, Mapping[str, Sequence[float]]], seed: int = 0,
                 default: Sequence[float] = (0.6,)):
        """``curves[drafter][domain][k]`` = P(accept k | accepted 0..k-1); positions
        past the end repeat the last value; an unknown (drafter, domain) uses the
        drafter's ``general`` curve, then ``default``."""
        for drafter, by_domain in curves.items():
            for domain, curve in by_domain.items():
                if not curve or not all(0.0 <= p <= 1.0 for p in curve):
                    raise ValueError(f"acceptance curve {drafter}/{domain}: probabilities must be in "
                                     f"[0, 1] and at least one position, got {list(curve)}")
        self.curves = {d: {dom: list(c) for dom, c in by.items()} for d, by in curves.items()}
        self.default = list(default)
        self.seed = seed
        self._rngs: dict[str, random.Random] = {}

    def curve(self, drafter: str, domain: str) -> list[float]:
        by_domain = self.curves.get(drafter, {})
        return by_domain.get(domain) or by_domain.get("general") or self.default

    def accepted(self, request_id: str, *, drafter: str, domain: str, round_index: int,
                 window: int) -> int:
        rng = self._rngs.get(request_id)
        if rng is None:
            rng = self._rngs[request_id] = random.Random(
                zlib.crc32(request_id.encode()) ^ (self.seed * 0x9E3779B1))
        curve = self.curve(drafter, domain)
        last = len(curve) - 1
        for k in range(window):
            if rng.random() >= curve[k if k < last else last]:
                return k
        return window

    def forget(self, request_id: str) -> None:
        self._rngs.pop(request_id, None)

    def mean_acceptance_length(self, drafter: str, domain: str, window: int) -> float:
        """Expected tokens per round (accepted + the recovered/bonus one)."""
        curve, expected, passed = self.curve(drafter, domain), 1.0, 1.0
        for k in range(window):
            passed *= curve[min(k, len(curve) - 1)]
            expected += passed
        return expected

    def to_dict(self) -> dict:
        return {"curves": self.curves, "default": self.default}

    @classmethod
    def from_file(cls, path: str | Path, seed: int = 0) -> AcceptanceCurves:
        data = json.loads(Path(path).read_text())
        data = data.get("acceptance", data)
        return cls(data["curves"], seed=seed, default=data.get("default", (0.6,)))

    @classmethod
    def from_rounds(cls, rounds: Sequence[tuple[str, str, int, int]], seed: int = 0) -> AcceptanceCurves:
        """Curves from observed rounds ``(drafter, domain, window, accepted)``: position
        k is *reached* by rounds with window > k that accepted 0..k-1, and passed by
        those that also accepted k, so P(k | 0..k-1) = passed[k] / reached[k]."""
        reached: dict[tuple[str, str], list[int]] = {}
        passed: dict[tuple[str, str], list[int]] = {}
        for drafter, domain, window, accepted in rounds:
            r = reached.setdefault((drafter, domain), [])
            p = passed.setdefault((drafter, domain), [])
            while len(r) < window:
                r.append(0)
                p.append(0)
            for k in range(min(accepted + 1, window)):
                r[k] += 1
                p[k] += int(k < accepted)
        curves: dict[str, dict[str, list[float]]] = {}
        for (drafter, domain), r in reached.items():
            curve = [p / n for p, n in zip(passed[(drafter, domain)], r) if n > 0]
            if curve:
                curves.setdefault(drafter, {})[domain] = curve
        return cls(curves, seed=seed)


class AcceptanceTrace:
    """Accepted counts recorded per request, one per round, replayed in order."""

    def __init__(self, trace: Mapping[str, Sequence[int]], fallback: AcceptanceModel | None = None):
        self.trace = {rid: list(counts) for rid, counts in trace.items()}
        self.fallback = fallback

    def accepted(self, request_id: str, *, drafter: str, domain: str, round_index: int,
                 window: int) -> int:
        counts = self.trace.get(request_id)
        if counts is not None and round_index < len(counts):
            return min(counts[round_index], window)
        if self.fallback is not None:
            return self.fallback.accepted(request_id, drafter=drafter, domain=domain,
                                          round_index=round_index, window=window)
        raise KeyError(f"acceptance trace has no round {round_index} for request {request_id!r}")
