"""``specfleet profile``: time this machine's drafters and verifier for the simulator
(see ``sim_profile.py``); the profile file feeds ``specfleet simulate`` / ``plan``."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "profile", help="measure drafters and verifier step times (and acceptance) for the simulator")
    p.add_argument("--config", required=True, help="serving config naming the models (e.g. configs/tiny.yaml)")
    p.add_argument("--out", required=True, metavar="FILE", help="profile file to write (JSON)")
    p.add_argument("--grid", choices=["tiny", "default"], default="default",
                   help="tiny: 2x2x2 points (CI); default: batch 1,2,4 × context 32,128 × window 1,3,6")
    p.add_argument("--acceptance", action="store_true",
                   help="also measure per-drafter, per-domain, per-position acceptance on held-out zoo prompts")
    p.add_argument("--prompts", type=int, default=3, help="held-out prompts per domain (default: 3)")
    p.add_argument("--window", type=int, default=6, help="fixed window for --acceptance (default: 6)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    p.set_defaults(handler=_profile)


def _profile(args) -> int:
    from specfleet.core.config import ConfigError, load_config

    for name in ("prompts", "window", "threads"):
        if getattr(args, name) < 1:
            print(f"error: --{name} must be >= 1", file=sys.stderr)
            return 2
    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from specfleet.benchmarks.sim_profile import TINY_GRID, ProfileGrid, run_profile

    grid = TINY_GRID if args.grid == "tiny" else ProfileGrid()
    try:
        profile = run_profile(cfg, grid=grid, threads=args.threads, acceptance=args.acceptance,
                              acceptance_prompts=args.prompts, acceptance_window=args.window,
                              progress=lambda what: print(f"profiled {what}", file=sys.stderr))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with open(args.out, "w") as f:
        json.dump(profile, f, indent=1)
    print(f"wrote {args.out}: verifier {len(profile['verifier'])} samples, drafters "
          f"{', '.join(profile['drafters']) or 'none with a model'}, round overhead "
          f"{profile['round_overhead_ns'] / 1e6:.2f} ms; machine: {profile['machine']}")
    return 0
