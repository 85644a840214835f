"""``specfleet simulate`` and ``specfleet plan``: capacity planning from the command line.

Where it sits: the user's entry to ``sim/``. ``simulate`` runs one deployment
(``deployment.py`` YAML) under one workload and prints a report (throughput, TTFT /
inter-token / end-to-end percentiles, acceptance, utilisation per worker, cost),
optionally with PNG plots and JSON; ``plan`` simulates every candidate deployment of
a file under the same arrivals and names the cheapest one meeting an SLO, with a
table of all. matplotlib and tqdm are imported inside the handlers.
"""

from __future__ import annotations

import argparse
import json
import operator
import re
import sys
from pathlib import Path

from specfleet.core.clock import MonotonicClock

SLO_METRICS = {
    "p50_latency": ("latency", "p50"), "p90_latency": ("latency", "p90"),
    "p99_latency": ("latency", "p99"), "mean_latency": ("latency", "mean"),
    "p50_ttft": ("ttft", "p50"), "p90_ttft": ("ttft", "p90"), "p99_ttft": ("ttft", "p99"),
    "p50_tpot": ("tpot", "p50"), "p90_tpot": ("tpot", "p90"), "p99_tpot": ("tpot", "p99"),
    "throughput": ("throughput", None),
}
_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}
_SLO = re.compile(r"^\s*(\w+)\s*(<=|>=|<|>)\s*([0-9.]+)\s*(ms|s)?\s*$")


def parse_slo(text: str) -> list[tuple[str, str, float]]:
    """``'p90_latency<=2s,p99_ttft<=500ms'`` → [(metric, op, value in s or tok/s)]."""
    out = []
    for part in text.split(","):
        m = _SLO.match(part)
        if not m or m.group(1) not in SLO_METRICS:
            raise ValueError(f"SLO {part.strip()!r}: expected METRIC<=VALUE[s|ms] with METRIC one of "
                             f"{', '.join(SLO_METRICS)}")
        value = float(m.group(3)) / (1000.0 if m.group(4) == "ms" else 1.0)
        out.append((m.group(1), m.group(2), value))
    return out


def slo_value(report: dict, metric: str) -> float:
    key, sub = SLO_METRICS[metric]
    return report[key] if sub is None else report[key][sub]


def meets(report: dict, slo: list[tuple[str, str, float]]) -> bool:
    return all(_OPS[op](slo_value(report, m), v) for m, op, v in slo)


def _add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", required=True, help="poisson:QPS | gamma:QPS:CV | trace:FILE")
    p.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals (default: 60)")
    p.add_argument("--prompt-tokens", type=int, default=96, help="prompt length of generated requests")
    p.add_argument("--max-new-tokens", type=int, default=64, help="output length of generated requests")
    p.add_argument("--seed", type=int, default=0, help="arrival seed (default: 0)")


def register(subparsers: argparse._SubParsersAction) -> None:
    sim = subparsers.add_parser("simulate", help="simulate a deployment under a workload (no GPUs needed)")
    sim.add_argument("--config", required=True, help="deployment YAML (see configs/sim/)")
    _add_workload_args(sim)
    sim.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    sim.add_argument("--plots", metavar="DIR", help="write PNG plots (latency CDF, utilisation) here")
    sim.add_argument("--no-progress", action="store_true", help="no progress bar")
    sim.set_defaults(handler=_simulate)

    plan = subparsers.add_parser("plan", help="the cheapest candidate deployment meeting an SLO")
    plan.add_argument("--slo", required=True, help="e.g. 'p90_latency<=2s' or 'p90_latency<=2s,p99_ttft<=500ms'")
    plan.add_argument("--candidates", required=True, help="YAML with a 'candidates:' list of deployments")
    _add_workload_args(plan)
    plan.add_argument("--json", metavar="FILE", help="write every candidate's report as JSON")
    plan.set_defaults(handler=_plan)


def _workload(args):
    from specfleet.sim.workload import WorkloadShape, parse_workload

    if args.duration <= 0 or args.prompt_tokens < 1 or args.max_new_tokens < 1:
        raise ValueError("--duration, --prompt-tokens and --max-new-tokens must be > 0")
    return parse_workload(args.workload, duration_s=args.duration, seed=args.seed,
                          shape=WorkloadShape(args.prompt_tokens, args.max_new_tokens))


def simulate_one(cfg, base: Path, requests, *, progress: bool = False) -> dict:
    from specfleet.sim.deployment import build_simulation, cost_per_hour
    from specfleet.sim.metrics import summarize

    sim = build_simulation(cfg, base)
    if progress:
        from tqdm import tqdm

        with tqdm(total=len(requests), unit="req", desc=cfg.name, file=sys.stderr) as bar:
            run = sim.run(requests, progress=bar.update, wall_clock=MonotonicClock())
    else:
        run = sim.run(requests, wall_clock=MonotonicClock())
    report = summarize(run, cost_per_hour=cost_per_hour(cfg))
    report["name"] = cfg.name
    report["batch_per_group"] = sim.scheduler.max_batch_size
    report["_run"] = run
    return report


def format_report(r: dict) -> str:
    lines = [
        f"{r['name']}: {r['requests']} requests, {r['tokens']} tokens in {r['duration_s']:.1f} s simulated "
        f"({r['sim_wall_s']:.1f} s wall, {r['events_per_s']:,.0f} events/s)",
        f"  throughput {r['throughput']:,.1f} tok/s; mean acceptance length "
        f"{r['mean_acceptance_length']:.2f} (acceptance rate {r['acceptance_rate']:.1%})",
    ]
    for key, label in (("latency", "e2e latency"), ("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "inter-token")):
        d = r[key]
        lines.append(f"  {label:12s} p50 {d['p50']:.4f} s  p90 {d['p90']:.4f} s  p99 {d['p99']:.4f} s  "
                     f"mean {d['mean']:.4f} s")
    util = r["utilisation"]
    groups = [v for k, v in util.items() if k.startswith("group")]
    drafters = [v for k, v in util.items() if not k.startswith("group")]
    lines.append(f"  utilisation: verifier groups mean {sum(groups) / len(groups):.1%} (max {max(groups):.1%})"
                 + (f", drafters mean {sum(drafters) / len(drafters):.1%} (max {max(drafters):.1%})"
                    if drafters else ""))
    lines.append(f"  cost: {r['cost_per_hour']:.2f}/h, {r['cost_per_million_tokens']:.3f} per million tokens")
    if r["rejected"]:
        lines.append(f"  {r['rejected']} requests rejected by the scheduler (too long for the context)")
    return "\n".join(lines)


def write_plots(report: dict, directory: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    run = report["_run"]
    recs = [r for r in run.records.values() if r.finish_ns is not None]
    paths = []
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, values in (("end-to-end", [(r.finish_ns - r.arrival_ns) / 1e9 for r in recs]),
                          ("TTFT", [(r.first_token_ns - r.arrival_ns) / 1e9 for r in recs])):
        xs = sorted(values)
        ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=label)
    ax.set_xlabel("seconds")
    ax.set_ylabel("fraction of requests")
    ax.set_title(f"{report['name']}: latency CDF")
    ax.legend()
    fig.tight_layout()
    paths.append(directory / "latency_cdf.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    util = report["utilisation"]
    names = sorted(util, key=lambda k: (not k.startswith("group"), k))[:40]
    ax.bar(range(len(names)), [util[n] for n in names])
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    ax.set_ylabel("busy fraction")
    ax.set_title(f"{report['name']}: utilisation per worker")
    fig.tight_layout()
    paths.append(directory / "utilisation.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def _public(report: dict) -> dict:
    return {k: v for k, v in report.items() if not k.startswith("_")}


def _simulate(args) -> int:
    from specfleet.core.typed_yaml import ConfigError
    from specfleet.sim.deployment import load_deployment

    try:
        cfg, base = load_deployment(args.config)
        requests = _workload(args)
        report = simulate_one(cfg, base, requests, progress=not args.no_progress)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.plots:
        for path in write_plots(report, Path(args.plots)):
            print(f"wrote {path}")
    if args.json:
        Path(args.json).write_text(json.dumps(_public(report), indent=1))
    return 0


def _plan(args) -> int:
    from specfleet.core.typed_yaml import ConfigError
    from specfleet.sim.deployment import load_candidates

    try:
        slo = parse_slo(args.slo)
        candidates, base = load_candidates(args.candidates)
        requests = _workload(args)
        reports = [simulate_one(c, base, requests) for c in candidates]
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    metrics = [m for m, _, _ in slo]
    header = f"{'deployment':24s} {'cost/h':>9s} {'tok/s':>10s} " + " ".join(f"{m:>12s}" for m in metrics) + "  meets"
    print(header)
    for r in reports:
        cells = " ".join(f"{slo_value(r, m):12.4f}" for m in metrics)
        print(f"{r['name']:24s} {r['cost_per_hour']:9.2f} {r['throughput']:10.1f} {cells}  "
              f"{'yes' if meets(r, slo) else 'no'}")
    ok = [r for r in reports if meets(r, slo)]
    if args.json:
        Path(args.json).write_text(json.dumps({"slo": args.slo, "candidates": [_public(r) for r in reports],
                                               "best": min(ok, key=lambda r: r['cost_per_hour'])['name']
                                               if ok else None}, indent=1))
    if not ok:
        print(f"no candidate meets {args.slo}")
        return 1
    best = min(ok, key=lambda r: (r["cost_per_hour"], -r["throughput"]))
    print(f"cheapest meeting {args.slo}: {best['name']} at {best['cost_per_hour']:.2f}/h")
    return 0
