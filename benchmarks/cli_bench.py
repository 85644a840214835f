"""``specfleet bench engine``: the in-process engine benchmark (see engine_bench.py)."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks")
    sub = bench.add_subparsers(dest="bench_command", metavar="BENCH")
    sub.required = True
    engine = sub.add_parser(
        "engine",
        help="speculative vs autoregressive vs Hugging Face (assisted) generation, in one process",
    )
    engine.add_argument("--zoo", default="small", choices=["tiny", "small"], help="zoo size (default: small)")
    engine.add_argument("--target", default="target-xl", choices=["target", "target-xl"],
                        help="target model of the zoo (default: target-xl, the cost-realistic one)")
    engine.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported (default: 3)")
    engine.add_argument("--max-new-tokens", type=int, default=64, help="tokens per generation (default: 64)")
    engine.add_argument("--prompts", type=int, default=3, help="held-out prompts per domain (default: 3)")
    engine.add_argument("--draft-length", type=int, default=4, help="fixed window γ (default: 4)")
    engine.add_argument("--batch-size", type=int, default=8,
                        help="batch for the throughput comparison; 1 skips it (default: 8)")
    engine.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    engine.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    engine.set_defaults(handler=_engine)


def _engine(args) -> int:
    from specfleet.benchmarks.engine_bench import BenchSettings, format_table, run

    for name in ("runs", "max_new_tokens", "prompts", "draft_length", "batch_size", "threads"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    settings = BenchSettings(
        zoo=args.zoo, target=args.target, runs=args.runs, max_new_tokens=args.max_new_tokens,
        prompts_per_domain=args.prompts, draft_length=args.draft_length,
        batch_size=args.batch_size, threads=args.threads,
    )
    report = run(settings)
    print(f"target: zoo:{settings.zoo}/{settings.target}; machine: {report['machine']}")
    print(format_table(report))
    print(
        f"speedup vs autoregressive {report['speedup_vs_autoregressive']:.2f}x, "
        f"vs HF assisted {report['speedup_vs_hf_assisted']:.2f}x, "
        f"{report['fraction_of_analytic_bound']:.0%} of the analytic bound"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0
