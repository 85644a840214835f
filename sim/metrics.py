"""A simulation's report: throughput, latency percentiles, acceptance, utilisation, cost.

Where it sits: after ``simulator.Simulator.run``; ``specfleet simulate`` prints and
plots this dict, ``plan`` compares candidates by it, ``bench sim-validate`` compares
it with the same numbers measured on the real engine (``real_metrics`` computes those
from real outputs with the same definitions, so both sides mean the same thing).

Definitions: throughput = generated tokens / (last finish − first arrival); TTFT =
arrival → first committed token; inter-token latency = time between successive
commits of a request (one speculation round may commit several tokens at once);
TPOT = (e2e − TTFT) / (tokens − 1); latency = end-to-end, arrival → finish.
"""

from __future__ import annotations

from collections.abc import Sequence

from specfleet.sim.simulator import SimRun

PERCENTILES = (50, 90, 99)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), 0 for no values."""
    if not values:
        return 0.0
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values_s: Sequence[float]) -> dict:
    out = {f"p{q}": percentile(values_s, q) for q in PERCENTILES}
    out["mean"] = sum(values_s) / len(values_s) if values_s else 0.0
    return out


def latency_report(e2e_s: Sequence[float], ttft_s: Sequence[float], tpot_s: Sequence[float],
                   itl_s: Sequence[float], tokens: int, span_s: float) -> dict:
    return {
        "requests": len(e2e_s),
        "tokens": tokens,
        "duration_s": span_s,
        "throughput": tokens / span_s if span_s > 0 else 0.0,  # tokens / s
        "p50": percentile(e2e_s, 50),
        "p90": percentile(e2e_s, 90),
        "latency": distribution(e2e_s),
        "ttft": distribution(ttft_s),
        "tpot": distribution(tpot_s),
        "itl": distribution(itl_s),
    }


def summarize(run: SimRun, *, cost_per_hour: float = 0.0) -> dict:
    recs = [r for r in run.records.values() if r.finish_ns is not None]
    e2e = [(r.finish_ns - r.arrival_ns) / 1e9 for r in recs]
    ttft = [(r.first_token_ns - r.arrival_ns) / 1e9 for r in recs if r.first_token_ns is not None]
    tpot = [(r.finish_ns - r.first_token_ns) / 1e9 / (r.tokens - 1) for r in recs
            if r.first_token_ns is not None and r.tokens > 1]
    itl = [g / 1e9 for r in recs for g in r.chunk_gaps_ns]
    tokens = sum(r.tokens for r in recs)
    span_ns = max(1, run.end_ns - run.start_ns)
    report = latency_report(e2e, ttft, tpot, itl, tokens, span_ns / 1e9)
    stats = run.scheduler.stats
    rounds = sum(c.rounds for c in stats.per_drafter.values())
    emitted = sum(c.emitted for c in stats.per_drafter.values())
    drafted_rounds = [c for d, c in stats.per_drafter.items() if d]
    report["mean_acceptance_length"] = emitted / rounds if rounds else 0.0
    drafted = sum(c.drafted for c in drafted_rounds)
    report["acceptance_rate"] = sum(c.accepted for c in drafted_rounds) / drafted if drafted else 0.0
    report["per_drafter"] = {d: {"rounds": c.rounds, "mean_acceptance_length": c.mean_acceptance_length}
                             for d, c in stats.per_drafter.items() if d}
    report["utilisation"] = {w: busy / span_ns for w, busy in run.executor.busy_ns.items()}
    report["verify_rounds"] = stats.verify_rounds
    hours = span_ns / 3.6e12
    report["cost_per_hour"] = cost_per_hour
    report["cost"] = cost_per_hour * hours
    report["cost_per_million_tokens"] = cost_per_hour * hours / tokens * 1e6 if tokens else 0.0
    report["events"] = run.events
    report["sim_wall_s"] = run.wall_s
    report["events_per_s"] = run.events / run.wall_s if run.wall_s > 0 else 0.0
    report["rejected"] = len(run.rejected)
    return report
