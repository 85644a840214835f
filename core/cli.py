"""The ``specfleet`` command line.

Where it sits: the entry point users type. Each feature contributes one subcommand
group through a ``register(subparsers)`` function in its own ``cli_*`` module, which
keeps heavy imports (torch, Ray) inside the handlers so ``--help`` stays instant.
Handlers return a process exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Modules that each add subcommands; listed here so a new feature is one line.
SUBCOMMAND_MODULES = [
    "specfleet.core.cli_config",
    "specfleet.zoo.cli_zoo",
    "specfleet.zoo.cli_distill",
    "specfleet.benchmarks.cli_bench",
    "specfleet.benchmarks.cli_profile",
    "specfleet.sim.cli_sim",
    "specfleet.router.cli_generate",
    "specfleet.router.cli_serve",
    "specfleet.router.cli_top",
    "specfleet.router.cli_drafters",
]

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str) -> None:
    """Configure the root logger once, for the whole process."""
    logging.basicConfig(level=getattr(logging, level.upper()), format=LOG_FORMAT, force=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specfleet",
        description="SpecFleet: distributed, lossless speculative decoding.",
    )
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="logging verbosity (default: info)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for module_name in SUBCOMMAND_MODULES:
        importlib.import_module(module_name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
