"""Workloads: when requests arrive and what they ask for.

Where it sits: ``specfleet simulate`` / ``plan`` / ``bench sim-validate`` turn a
``--workload`` spec into a list of ``SimRequest``s (arrival time, prompt length,
output length, domain), which the simulator feeds to the scheduler at their arrival
times and the validation replays to the real engine at the same timestamps.

Specs: ``poisson:QPS``; ``gamma:QPS:CV`` (gamma inter-arrival times with coefficient
of variation CV: 1 is Poisson, > 1 bursty); ``trace:FILE`` (JSON lines with
``arrival_s``, and optionally ``prompt_tokens``, ``max_new_tokens``, ``domain``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

DOMAIN_MIX = {"code": 1 / 3, "prose": 1 / 3, "data": 1 / 3}


@dataclass(frozen=True)
class SimRequest:
    request_id: str
    arrival_ns: int
    prompt_tokens: int
    max_new_tokens: int
    domain: str
    prompt: tuple[int, ...] = ()  # explicit prompt tokens (tests, replays); () = synthetic
    drafter: str | None = None  # a pinned drafter; None = routed


@dataclass(frozen=True)
class WorkloadShape:
    """What every generated request looks like (traces may override per request)."""

    prompt_tokens: int = 96
    max_new_tokens: int = 64
    domains: tuple[tuple[str, float], ...] = tuple(DOMAIN_MIX.items())


def parse_workload(spec: str, *, duration_s: float | None = None, count: int | None = None,
                   shape: WorkloadShape = WorkloadShape(), seed: int = 0) -> list[SimRequest]:
    """Requests of ``spec`` over ``duration_s`` seconds or ``count`` requests (whichever
    ends first; a trace is replayed whole unless cut by either)."""
    kind, _, rest = spec.partition(":")
    try:
        if kind == "poisson":
            return _renewal(float(rest), 1.0, duration_s, count, shape, seed)
        if kind == "gamma":
            qps, cv = rest.split(":")
            return _renewal(float(qps), float(cv), duration_s, count, shape, seed)
    except ValueError:
        raise ValueError(f"workload {spec!r}: expected poisson:QPS or gamma:QPS:CV with positive "
                         "numbers") from None
    if kind == "trace":
        return load_trace(rest, duration_s=duration_s, count=count, shape=shape)
    raise ValueError(f"workload {spec!r}: unknown kind {kind!r} (poisson:QPS, gamma:QPS:CV, trace:FILE)")


def _renewal(qps: float, cv: float, duration_s, count, shape: WorkloadShape, seed: int) -> list[SimRequest]:
    if qps <= 0 or cv <= 0:
        raise ValueError("rate and CV must be > 0")
    if duration_s is None and count is None:
        raise ValueError("a generated workload needs a duration or a request count")
    rng = random.Random(seed)
    k = 1.0 / (cv * cv)  # gamma shape: CV = 1/sqrt(k); mean interval 1/qps
    names = [d for d, _ in shape.domains]
    weights = [w for _, w in shape.domains]
    out, t = [], 0.0
    while True:
        t += rng.gammavariate(k, 1.0 / (qps * k))
        if (duration_s is not None and t > duration_s) or (count is not None and len(out) >= count):
            return out
        out.append(SimRequest(f"sim-{len(out)}", int(t * 1e9), shape.prompt_tokens, shape.max_new_tokens,
                              rng.choices(names, weights)[0]))


def load_trace(path: str, *, duration_s=None, count=None, shape: WorkloadShape = WorkloadShape()
               ) -> list[SimRequest]:
    out = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise ValueError(f"trace {path}: cannot read: {exc.strerror or exc}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            arrival = float(row["arrival_s"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"trace {path}:{n}: expected a JSON object with a numeric 'arrival_s'") from None
        if duration_s is not None and arrival > duration_s or count is not None and len(out) >= count:
            break
        out.append(SimRequest(str(row.get("request_id", f"trace-{len(out)}")), int(arrival * 1e9),
                              int(row.get("prompt_tokens", shape.prompt_tokens)),
                              int(row.get("max_new_tokens", shape.max_new_tokens)),
                              str(row.get("domain", "prose"))))
    out.sort(key=lambda r: r.arrival_ns)
    return out


def write_trace(requests: list[SimRequest], path: str | Path) -> None:
    with open(path, "w") as f:
        for r in requests:
            f.write(json.dumps({"request_id": r.request_id, "arrival_s": r.arrival_ns / 1e9,
                                "prompt_tokens": r.prompt_tokens, "max_new_tokens": r.max_new_tokens,
                                "domain": r.domain}) + "\n")
