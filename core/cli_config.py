"""``specfleet config validate|show``: check a configuration file before deploying it."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    config = subparsers.add_parser("config", help="validate or show a configuration file")
    sub = config.add_subparsers(dest="config_command", metavar="ACTION")
    sub.required = True

    validate = sub.add_parser("validate", help="check FILE; exit 0 if valid, 2 with the error")
    validate.add_argument("file", help="YAML configuration file")
    validate.add_argument("--cluster", action="store_true",
                          help="also check that every actor's resources fit the embedded cluster "
                               "(cluster.address: local) the config describes")
    validate.set_defaults(handler=_validate)

    show = sub.add_parser("show", help="print FILE resolved with every default, as YAML")
    show.add_argument("file", help="YAML configuration file")
    show.set_defaults(handler=_show)


def _load(path: str):
    from specfleet.core.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _validate(args) -> int:
    from specfleet.core.config import summarize

    cfg = _load(args.file)
    if cfg is None:
        return 2
    if args.cluster:
        from specfleet.core.placement import (
            PlacementError,
            check_fits,
            deployment_demands,
            embedded_cluster_nodes,
        )

        if cfg.cluster.address != "local":
            print(f"error: --cluster checks the embedded cluster; cluster.address is "
                  f"{cfg.cluster.address!r} (specfleet serve checks a joined cluster when it starts)",
                  file=sys.stderr)
            return 2
        try:
            check_fits(deployment_demands(cfg), embedded_cluster_nodes(cfg))
        except PlacementError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    print(f"{args.file}: valid: {summarize(cfg)}")
    return 0


def _show(args) -> int:
    import yaml

    from specfleet.core.typed_yaml import to_plain

    cfg = _load(args.file)
    if cfg is None:
        return 2
    sys.stdout.write(yaml.safe_dump(to_plain(cfg), sort_keys=False))
    return 0
