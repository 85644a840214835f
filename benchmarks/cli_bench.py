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
    engine.add_argument("--target", default="target-xl", metavar="MODEL",
                        help="target: a zoo model (target, target-xl: the cost-realistic one, the "
                             "default) or any checkpoint — an HF directory, a .gguf file, pkg:<module>/<file>")
    engine.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported (default: 3)")
    engine.add_argument("--max-new-tokens", type=int, default=None,
                        help="tokens per generation (default: 64 on the zoo, 128 on a checkpoint)")
    engine.add_argument("--prompts", default=None, metavar="N|FILE",
                        help="zoo: held-out prompts per domain (default: 3); checkpoint: a JSONL file of "
                             "{kind, messages|prompt} (default: benchmarks/prompts/chat_heldout.jsonl)")
    engine.add_argument("--drafter", nargs="+", default=None, metavar="D",
                        help="checkpoint: drafters to time: ngram, suffix, NAME=PATH (default: ngram suffix)")
    engine.add_argument("--draft-length", type=int, default=4, help="fixed window γ (default: 4)")
    engine.add_argument("--batch-size", type=int, default=8,
                        help="batch for the throughput comparison; 1 skips it (default: 8)")
    engine.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    engine.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    engine.set_defaults(handler=_engine)

    fleet = sub.add_parser(
        "fleet",
        help="routing and cooperative drafting across the zoo's drafters: single drafters, random, "
             "expertise, learned, learned+fusion, hindsight oracle",
    )
    fleet.add_argument("--zoo", default="small", choices=["tiny", "small"], help="zoo size (default: small)")
    fleet.add_argument("--target", default="target-xl", choices=["target", "target-xl"],
                       help="target model of the zoo (default: target-xl)")
    fleet.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported (default: 3)")
    fleet.add_argument("--max-new-tokens", type=int, default=32, help="tokens per request (default: 32)")
    fleet.add_argument("--prompts", type=int, default=3, help="held-out prompts per domain (default: 3)")
    fleet.add_argument("--loads", default="0.5,1.5",
                       help="Poisson arrival rates in requests/s, comma-separated (default: 0.5,1.5)")
    fleet.add_argument("--max-cooperating", type=int, default=3,
                       help="drafters fused per request in the learned+fusion arm (default: 3)")
    fleet.add_argument("--arms", help="comma-separated subset of the arms (default: all)")
    fleet.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    fleet.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    fleet.set_defaults(handler=_fleet)

    pipe = sub.add_parser("pipeline", help="pipelined speculation (PEARL) vs lockstep, on Ray actors pinned to cores")
    pipe.add_argument("--zoo", default="small", choices=["tiny", "small"], help="zoo size (default: small)")
    pipe.add_argument("--runs", type=int, default=3, help="repetitions; medians are reported (default: 3)")
    pipe.add_argument("--max-new-tokens", type=int, default=64, help="tokens per request (default: 64)")
    pipe.add_argument("--prompts", type=int, default=2, help="held-out prompts per domain (default: 2)")
    pipe.add_argument("--windows", default="2,4,6", help="fixed windows to try, comma-separated (default: 2,4,6)")
    pipe.add_argument("--batch-size", type=int, default=8, help="batch of the second part (default: 8)")
    pipe.add_argument("--no-pin", action="store_true", help="do not pin the verifier and drafter to cores 0 and 1")
    pipe.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    pipe.set_defaults(handler=_pipeline)

    load = sub.add_parser("load", help="goodput and latency vs offered load: AR, fixed windows, goodput controller")
    load.add_argument("--zoo", default="small", choices=["tiny", "small"], help="zoo size (default: small)")
    load.add_argument("--target", default="target-xl", help="target model of the zoo (default: target-xl)")
    load.add_argument("--repeats", type=int, default=3, help="repeats per cell; medians (default: 3)")
    load.add_argument("--requests", type=int, default=12, help="requests per cell (default: 12)")
    load.add_argument("--max-new-tokens", type=int, default=32, help="tokens per request (default: 32)")
    load.add_argument("--fractions", default="0.1,0.3,0.5,0.7,0.9,1.2",
                      help="offered loads as fractions of measured AR capacity (default: 0.1,...,1.2)")
    load.add_argument("--windows", default="1,2,4,6", help="fixed-window arms (default: 1,2,4,6)")
    load.add_argument("--cv", type=float, default=1.0, help="inter-arrival CV: 1 Poisson, >1 bursty Gamma")
    load.add_argument("--batch-size", type=int, default=8, help="max batch (default: 8)")
    load.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    load.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    load.add_argument("--plot", metavar="PNG", help="write goodput and latency vs load as PNG")
    load.set_defaults(handler=_load)

    kern = sub.add_parser(
        "kernels",
        help="the runner's linears per kernel path (fp32 default/oneDNN, bf16) vs the measured roofline",
    )
    kern.add_argument("--quick", action="store_true", help="batch 1 only, fewer repetitions")
    kern.add_argument("--threads", default="1,2", help="torch thread counts, comma-separated (default: 1,2)")
    kern.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    kern.add_argument("--plot", metavar="PNG", help="write time vs tokens per path as PNG")
    kern.set_defaults(handler=_kernels)

    exact = sub.add_parser("kernel-exactness",
                           help="greedy divergence per verifier.kernel path: spec vs our AR vs HF generate")
    exact.add_argument("--targets", default="zoo:tiny/target,zoo:small/target-xl",
                       help="zoo targets, comma-separated (default: zoo:tiny/target,zoo:small/target-xl)")
    exact.add_argument("--kernels", default="default,mkldnn", help="paths (default: default,mkldnn)")
    exact.add_argument("--prompts", type=int, default=3, help="held-out prompts per domain (default: 3)")
    exact.add_argument("--max-new-tokens", type=int, default=128, help="tokens per sequence (default: 128)")
    exact.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    exact.add_argument("--json", metavar="FILE", help="write the full report as JSON")
    exact.set_defaults(handler=_kernel_exactness)

    val = sub.add_parser(
        "sim-validate",
        help="the simulator against the real in-process engine on the same arrivals (small zoo)",
    )
    val.add_argument("--json", metavar="FILE", required=True, help="write the full report as JSON")
    val.add_argument("--out-dir", default="sim-validate", help="profile file and plots (default: ./sim-validate)")
    val.add_argument("--requests", type=int, default=96, help="requests per run (default: 96)")
    val.add_argument("--repeats", type=int, default=3, help="real runs per config (default: 3)")
    val.add_argument("--max-new-tokens", type=int, default=32, help="tokens per request (default: 32)")
    val.add_argument("--scale-requests", type=int, default=10_000,
                     help="requests of the 64-drafter, 8-group H200 speed run (default: 10000)")
    val.add_argument("--configs", help="comma-separated subset of the validation configs")
    val.set_defaults(handler=_sim_validate)


def _kernels(args) -> int:
    from specfleet.benchmarks.kernel_bench import KernelSettings, format_table, plot, run

    threads = tuple(int(t) for t in args.threads.split(","))
    settings = KernelSettings(quick=args.quick, threads=threads, reps=15 if args.quick else 20,
                              forward_reps=7 if args.quick else 15)
    report = run(settings)
    print(f"machine: {report['machine']}")
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    if args.plot:
        plot(report, args.plot)
    return 0


def _kernel_exactness(args) -> int:
    from specfleet.benchmarks.kernel_exactness import ExactnessSettings, format_table, run

    settings = ExactnessSettings(targets=args.targets.split(","), kernels=args.kernels.split(","),
                                 prompts_per_domain=args.prompts, max_new_tokens=args.max_new_tokens,
                                 threads=args.threads)
    report = run(settings)
    print(f"machine: {report['machine']}")
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


def _checkpoint_engine(args) -> int:
    from specfleet.benchmarks.checkpoint_bench import (
        DEFAULT_PROMPTS,
        CheckpointBenchSettings,
        format_checkpoint_table,
        run_checkpoint_bench,
    )

    settings = CheckpointBenchSettings(
        target=args.target, drafters=args.drafter or ["ngram", "suffix"],
        prompts=args.prompts or str(DEFAULT_PROMPTS), runs=args.runs,
        max_new_tokens=args.max_new_tokens or 128, draft_length=args.draft_length, threads=args.threads,
    )
    try:
        report = run_checkpoint_bench(settings)
    except (OSError, ValueError) as exc:  # a bad path, prompts file or drafter
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"target: {settings.target}; machine: {report['machine']}")
    print(format_checkpoint_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _engine(args) -> int:
    from specfleet.benchmarks.engine_bench import BenchSettings, format_table, run

    for name in ("runs", "max_new_tokens", "draft_length", "batch_size", "threads"):
        if (getattr(args, name) or 1) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.target not in ("target", "target-xl"):
        return _checkpoint_engine(args)
    if args.drafter:
        print("error: --drafter is for a checkpoint --target; the zoo bench times every zoo drafter",
              file=sys.stderr)
        return 2
    try:
        per_domain = int(args.prompts or 3)
    except ValueError:
        print("error: --prompts with a zoo target is a count per domain", file=sys.stderr)
        return 2
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    settings = BenchSettings(
        zoo=args.zoo, target=args.target, runs=args.runs, max_new_tokens=args.max_new_tokens or 64,
        prompts_per_domain=per_domain, draft_length=args.draft_length,
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


def _fleet(args) -> int:
    from specfleet.benchmarks.fleet_bench import FleetSettings, arm_names, format_table, run

    for name in ("runs", "max_new_tokens", "prompts", "max_cooperating", "threads"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    try:
        loads = tuple(float(x) for x in args.loads.split(",") if x.strip())
    except ValueError:
        print(f"error: --loads: expected numbers like 0.5,1.5, got {args.loads!r}", file=sys.stderr)
        return 2
    if not loads or any(x <= 0 for x in loads):
        print("error: --loads: rates must be > 0", file=sys.stderr)
        return 2
    arms = [a for a in (args.arms or "").split(",") if a]
    unknown = [a for a in arms if a not in arm_names()]
    if unknown:
        print(f"error: unknown arm {unknown[0]!r} (known: {', '.join(arm_names())})", file=sys.stderr)
        return 2
    settings = FleetSettings(zoo=args.zoo, target=args.target, runs=args.runs,
                             max_new_tokens=args.max_new_tokens, prompts_per_domain=args.prompts,
                             loads=loads, max_cooperating=args.max_cooperating, threads=args.threads,
                             arms=arms)
    report = run(settings, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(f"target: zoo:{settings.zoo}/{settings.target}; machine: {report['machine']}")
    print(format_table(report))
    if "speedup_vs_best_single" in report:
        print(f"learned+fusion vs best single ({report['best_single']}): "
              f"{report['speedup_vs_best_single']:.2f}x tokens/s, p50 x{report['p50_ratio_vs_best_single']:.2f}; "
              f"fraction of oracle {report.get('fraction_of_oracle', float('nan')):.2f}; fusion gain "
              f"{report.get('fusion_gain_accepted_per_verify', float('nan')):.2f}x accepted/verify; "
              f"newcomer: {report.get('newcomer_requests_to_fair_share')} requests to its fair share")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    return 0


def _sim_validate(args) -> int:
    from pathlib import Path

    from specfleet.benchmarks import sim_validate

    for name in ("requests", "repeats", "max_new_tokens", "scale_requests"):
        if getattr(args, name) < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    if args.configs:
        known = {c.name: c for c in sim_validate.CONFIGS}
        unknown = [n for n in args.configs.split(",") if n not in known]
        if unknown:
            print(f"error: unknown config {unknown[0]!r} (known: {', '.join(known)})", file=sys.stderr)
            return 2
        sim_validate.CONFIGS = tuple(known[n] for n in args.configs.split(","))
    settings = sim_validate.ValidationSettings(requests=args.requests, repeats=args.repeats,
                                               max_new_tokens=args.max_new_tokens,
                                               scale_requests=args.scale_requests)
    out = Path(args.out_dir)
    report = sim_validate.run(settings, out, progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(f"machine: {report['machine']}")
    print(sim_validate.format_table(report))
    print(f"median error {report['median_error']:.1%}, max {report['max_error']:.1%} (throughput, p50, p90); "
          f"acceptance length max error {report['acceptance_max_error']:.1%}; Kendall tau (p90) "
          f"{report['kendall_tau']:.2f}; M/M/1 max error {report['mm1_max_error']:.1%}; "
          f"{report['events_per_s']:,.0f} events/s; 64x8 H200, {report['scale']['requests']} requests: "
          f"{report['scale']['wall_s']:.1f} s")
    for path in sim_validate.write_plots(report, out):
        print(f"wrote {path}")
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    return 0


def _load(args) -> int:
    from specfleet.benchmarks.load_bench import LoadSettings, format_table, plot, run

    try:
        fractions = tuple(float(x) for x in args.fractions.split(",") if x.strip())
        windows = tuple(int(x) for x in args.windows.split(",") if x.strip())
    except ValueError:
        print("error: --fractions/--windows: expected comma-separated numbers", file=sys.stderr)
        return 2
    if not fractions or min(fractions) <= 0 or not windows or min(windows) < 1 or args.cv <= 0:
        print("error: fractions and cv must be > 0, windows >= 1", file=sys.stderr)
        return 2
    s = LoadSettings(zoo=args.zoo, target=args.target, repeats=args.repeats, requests=args.requests,
                     max_new_tokens=args.max_new_tokens, fractions=fractions, windows=windows, cv=args.cv,
                     batch=args.batch_size, threads=args.threads)
    report = run(s)
    print(f"machine: {report['machine']}; AR capacity {report['ar_capacity_qps']:.2f} req/s")
    print(format_table(report))
    print({k: round(report[k], 3) for k in ("min_ratio_vs_best_baseline", "max_gain_vs_best_fixed",
                                              "worst_vs_ar", "max_adjacent_drop")})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)
    if args.plot:
        plot(report, args.plot)
    return 0


def _pipeline(args) -> int:
    from specfleet.benchmarks.pipeline_bench import PipelineSettings, format_table, run
    from specfleet.zoo.build import build_zoo

    build_zoo(args.zoo)
    windows = tuple(int(w) for w in args.windows.split(","))
    settings = PipelineSettings(zoo=args.zoo, runs=args.runs, max_new_tokens=args.max_new_tokens,
                                prompts_per_domain=args.prompts, windows=windows, batch=args.batch_size,
                                pin=not args.no_pin)
    report = run(settings, progress=lambda line: print(line, file=sys.stderr, flush=True))
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    return 0 if report["outputs_identical"] else 1
