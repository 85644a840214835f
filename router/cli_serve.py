"""``specfleet serve --config FILE``: run the gRPC API server until SIGINT/SIGTERM.

Where it sits: start-up of a frontend. It loads the config, builds the backend
with ``server.make_backend(cfg, kind)`` (the only place that knows backend kinds),
loads the target's tokenizer and serves ``specfleet.v1`` plus health and reflection.
On a signal it reports NOT_SERVING, lets running requests finish for a few seconds,
then closes the backend.
"""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="run the gRPC API server for a configuration")
    p.add_argument("--config", required=True, metavar="FILE", help="YAML configuration file")
    p.add_argument("--port", type=int, default=None, metavar="N",
                   help="port to listen on (default: server.port of the config; 0 = any free)")
    # Kinds are checked by server.make_backend (the one place that knows them), which
    # keeps grpc and the engine out of `--help`.
    p.add_argument("--backend", default="inprocess", metavar="KIND",
                   help="what runs generation: inprocess = the engine in this process "
                        "(default: inprocess)")
    p.add_argument("--grace", type=float, default=5.0, metavar="SECONDS",
                   help="on shutdown, how long running requests may finish (default: 5)")
    p.set_defaults(handler=_serve)


def _serve(args) -> int:
    import asyncio

    from specfleet.core.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(cfg, args))
    except (OSError, ValueError) as exc:  # unusable port, model path, TLS files, ...
        print(f"error: {exc}", file=sys.stderr)
        return 1


async def _run(cfg, args) -> int:
    import asyncio
    import logging
    import signal

    from specfleet.router.server import SpecFleetServer, load_tokenizer, make_backend

    log = logging.getLogger("specfleet.serve")
    # Model loading takes seconds to minutes; keep the event loop free meanwhile.
    backend = await asyncio.to_thread(make_backend, cfg, args.backend)
    try:
        tokenizer = await asyncio.to_thread(load_tokenizer, cfg)
        server = SpecFleetServer(backend, tokenizer, cfg.server, port=args.port)
        await server.start()
        print(f"specfleet: serving on {server.address}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down (grace %.1f s)", args.grace)
        await server.stop(args.grace)
    finally:
        await backend.close()
    return 0
