"""``specfleet top --server HOST:PORT``: a live view of a fleet from its metrics endpoint.

Where it sits: an operator's terminal, beside a running ``specfleet serve
--metrics-port``; the view itself is ``top.py``.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("top", help="live view of a server's metrics (requests, tokens/s, "
                                          "acceptance per drafter and domain)")
    p.add_argument("--server", required=True, metavar="HOST:PORT",
                   help="the metrics endpoint (server.metrics_port), or a full /metrics URL")
    p.add_argument("--interval", type=float, default=2.0, metavar="SECONDS",
                   help="seconds between scrapes (default: 2)")
    p.add_argument("--once", action="store_true", help="print one view and exit")
    p.set_defaults(handler=_top)


def _top(args) -> int:
    from specfleet.router.top import run

    try:
        return run(args.server, args.interval, once=args.once)
    except OSError as exc:  # connection refused, timeout, bad URL
        print(f"error: cannot scrape {args.server}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
