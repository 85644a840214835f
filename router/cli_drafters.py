"""``specfleet drafters list|add|remove``: change a running fleet's drafters.

Where it sits: the command-line face of ``proto/admin_client.AdminClient`` (the
``SpecFleetAdmin`` service, ``router/admin.py``); it imports nothing heavier than grpc.
The admin token comes from ``--admin-token`` or ``$SPECFLEET_ADMIN_TOKEN`` (so it stays
out of shell history); the server must have ``server.admin_token`` set.

    specfleet drafters list --server 127.0.0.1:50051
    specfleet drafters add --server 127.0.0.1:50051 '{name: ngram2, kind: ngram}'
    specfleet drafters add --server 127.0.0.1:50051 --file drafter.yaml
    specfleet drafters remove --server 127.0.0.1:50051 ngram2

Exit codes as ``specfleet generate``: 0 done; 1 the server refused; 2 invalid input;
3 no server reachable; 4 authentication failed.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from specfleet.router.cli_generate import EXIT_INVALID, exit_code


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("drafters", help="list, add or remove the drafters of a running server")
    sub = p.add_subparsers(dest="drafters_command", metavar="ACTION")
    sub.required = True
    for name, help_text in (("list", "print the deployed drafters"),
                            ("add", "start a drafter from a config entry (YAML or JSON)"),
                            ("remove", "stop a drafter; its requests go on")):
        q = sub.add_parser(name, help=help_text)
        q.add_argument("--server", default="127.0.0.1:50051", metavar="HOST:PORT",
                       help="server address (default: 127.0.0.1:50051)")
        q.add_argument("--admin-token", default=None,
                       help="the server's admin token (default: $SPECFLEET_ADMIN_TOKEN)")
        q.add_argument("--token", default=None, help="bearer token, when the server requires one")
        if name == "add":
            q.add_argument("config", nargs="?", help="one drafters: entry, e.g. '{name: ng, kind: ngram}'")
            q.add_argument("--file", help="read the entry from this YAML/JSON file instead")
        if name == "remove":
            q.add_argument("name", help="the drafter to stop")
        q.set_defaults(handler=_drafters)


def _drafters(args) -> int:
    from specfleet.proto.admin_client import AdminClient
    from specfleet.proto.client import SpecFleetError

    token = args.admin_token or os.environ.get("SPECFLEET_ADMIN_TOKEN")
    if not token:
        print("error: no admin token: pass --admin-token or set SPECFLEET_ADMIN_TOKEN", file=sys.stderr)
        return EXIT_INVALID
    config = None
    if args.drafters_command == "add":
        if (args.config is None) == (args.file is None):
            print("error: give the drafter entry inline or with --file (one of them)", file=sys.stderr)
            return EXIT_INVALID
        try:
            config = args.config if args.file is None else Path(args.file).read_text()
        except OSError as exc:
            print(f"error: --file: {exc.strerror}: {args.file}", file=sys.stderr)
            return EXIT_INVALID
    try:
        with AdminClient(args.server, admin_token=token, token=args.token) as admin:
            if args.drafters_command == "add":
                drafters = admin.add_drafter(config)
            elif args.drafters_command == "remove":
                drafters = admin.remove_drafter(args.name)
            else:
                drafters = admin.drafters()
    except SpecFleetError as exc:
        print(f"error: {exc.code.name}: {exc.message}", file=sys.stderr)
        return exit_code(exc)
    width = max((len(d.name) for d in drafters), default=4)
    for d in drafters:
        print(f"{d.name:<{width}}  {d.kind:<6}  {d.domain}")
    return 0
