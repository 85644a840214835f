"""``specfleet distill``: train a small drafter for any checkpoint (see zoo/distill.py)."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "distill",
        help="train a 1-2 layer drafter for a checkpoint on its own greedy outputs",
        description="Train a small drafter that shares TARGET's tokenizer, embeddings and LM head, on "
                    "TARGET's greedy continuations of text this machine has, within a time budget; "
                    "saved as an ordinary HF checkpoint for a `kind: model` drafter.",
    )
    p.add_argument("--target", required=True, help="the target: HF directory, .gguf file, pkg: or zoo: spec")
    p.add_argument("--out", required=True, metavar="DIR", help="where the drafter checkpoint is written")
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the drafter (default: 2)")
    p.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget, all included (default: 15)")
    p.add_argument("--prompts", type=int, default=256, help="prompts the target continues (default: 256)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_distill)


def _distill(args) -> int:
    from specfleet.models.loading import ModelPathError
    from specfleet.zoo.distill import DistillSettings, distill

    if args.minutes <= 0 or args.prompts < 16 or args.layers < 1:
        print("error: --minutes must be > 0, --prompts >= 16, --layers >= 1", file=sys.stderr)
        return 2
    settings = DistillSettings(target=args.target, out=args.out, layers=args.layers, minutes=args.minutes,
                               prompts=args.prompts, threads=args.threads, seed=args.seed)
    try:
        report = distill(settings)
    except (ModelPathError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2))
    print(f"drafter written to {args.out}: use it as  - {{name: distilled, kind: model, model: {args.out}}}")
    return 0
