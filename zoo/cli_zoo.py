"""``specfleet zoo build|path|info``: build SpecFleet's model zoo, find it, describe it."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    zoo = subparsers.add_parser("zoo", help="build, locate or describe the built-in model zoo")
    sub = zoo.add_subparsers(dest="zoo_command", metavar="ACTION")
    sub.required = True

    build = sub.add_parser("build", help="train the zoo of SIZE (a cache hit if already built)")
    _common(build)
    build.add_argument("--no-progress", action="store_true", help="no progress bars")
    build.set_defaults(handler=_build)

    path = sub.add_parser("path", help="print the zoo's directory; exit 1 if it is not built")
    _common(path)
    path.set_defaults(handler=_path)

    info = sub.add_parser("info", help="print a built zoo's manifest as tables")
    _common(info, size_required=False)
    info.set_defaults(handler=_info)


def _common(parser: argparse.ArgumentParser, size_required: bool = True) -> None:
    from specfleet.zoo.presets import SIZES

    parser.add_argument("--size", choices=SIZES, required=size_required,
                        help="tiny: tests, under a minute; small: demo and benchmarks"
                        + ("" if size_required else " (default: every built size)"))
    parser.add_argument("--out", default=None, metavar="DIR",
                        help="cache root (default: $XDG_CACHE_HOME/specfleet/zoo, "
                        "else ~/.cache/specfleet/zoo)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (default: 0)")


def _build(args) -> int:
    from specfleet.zoo.presets import read_manifest, zoo_dir

    directory = zoo_dir(args.size, args.seed, args.out)
    if read_manifest(directory) is None:  # checked first: a cache hit need not import torch
        from specfleet.zoo.build import build_zoo

        directory = build_zoo(args.size, out_dir=args.out, seed=args.seed,
                              progress=not args.no_progress)
    print(directory)
    return 0


def _path(args) -> int:
    from specfleet.zoo.presets import read_manifest, zoo_dir

    directory = zoo_dir(args.size, args.seed, args.out)
    print(directory)
    if read_manifest(directory) is None:
        print(f"error: the {args.size} zoo (seed {args.seed}) is not built there; "
              f"run `specfleet zoo build --size {args.size}`", file=sys.stderr)
        return 1
    return 0


def _info(args) -> int:
    from specfleet.zoo.presets import SIZES, read_manifest, zoo_dir

    sizes = [args.size] if args.size else list(SIZES)
    shown = 0
    for size in sizes:
        directory = zoo_dir(size, args.seed, args.out)
        manifest = read_manifest(directory)
        if manifest is None:
            if args.size:
                print(f"error: the {size} zoo (seed {args.seed}) is not built at {directory}",
                      file=sys.stderr)
            continue
        if shown:
            print()
        print(format_manifest(manifest, directory))
        shown += 1
    if not shown and not args.size:
        print("no zoo is built; run `specfleet zoo build --size tiny` (or small)", file=sys.stderr)
    return 0 if shown else 1


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(x).ljust(w) for x, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def format_manifest(m: dict, directory) -> str:
    """A zoo manifest as plain-text tables (what ``specfleet zoo info`` prints)."""
    domains = m["domains"]
    settings = m.get("settings_hash", "?")
    out = [f"zoo {m['size']} (seed {m['seed']}, settings {settings}): {directory}",
           f"built {m['created_utc']} in {m['build_wall_s']:.0f} s "
           f"(python {m['environment']['python']}, torch {m['environment']['torch']})", ""]
    cost = m["cost"]
    rows = []
    for name, e in m["models"].items():
        a = e["arch"]
        loss = e.get("heldout_loss") or {}
        rows.append([name, e["domain"], f"{e['params'] / 1e6:.2f}M",
                     f"{a['layers']}x{a['hidden']} (mlp {a['intermediate']})",
                     str(e.get("train", {}).get("steps", "-")),
                     _num(e.get("train", {}).get("wall_s"), ".0f"),
                     *[_num(loss.get(d), ".3f") for d in domains],
                     _num(cost["decode_ms"].get(name), ".2f")])
    out.append(_table(["model", "domain", "params", "layers x hidden", "steps", "train s",
                       *[f"loss {d}" for d in domains], "decode ms"], rows))
    out.append("")
    window = m["recipe"]["evaluation"]["window"]
    rows = []
    for name, per in m["acceptance"].items():
        cells = [f"{per[d]['greedy_acceptance']:.3f} / {per[d][f'mean_accepted_w{window}']:.2f}"
                 for d in domains]
        rows.append([name, *cells,
                     f"{cost['c_vs_target'][name]:.3f}", f"{cost['c_vs_target_xl'][name]:.4f}"])
    out.append(_table(["drafter", *[f"{d}: acc / w{window}" for d in domains],
                       "c (target)", "c (target-xl)"], rows))
    check = m["target_xl_check"]
    out.append("")
    out.append(f"target-xl vs target: greedy tokens identical = {check['greedy_tokens_identical']} "
               f"on {check['prompts']} prompts x {check['new_tokens_per_prompt']} tokens; "
               f"max |logit diff| on the prompts = {check['max_abs_logit_diff_on_prompts']:.3g}")
    return "\n".join(out)
