"""``specfleet serve --config FILE``: deploy a configuration and serve the gRPC API.

Where it sits: start-up of a frontend (on the Ray head, or any machine that can join
the cluster). With ``--backend ray`` (the default) it starts an embedded local Ray
(``--address local``, the default of configs/local.yaml) or joins one (``auto`` /
``HOST:PORT``), places every drafter and the verifier group as actors, and logs what
landed on which node; ``--backend inprocess`` runs the whole engine in this process
instead. Either way it serves ``specfleet.v1`` plus health and reflection and logs
``serving on HOST:PORT`` once ready; with ``--http-port`` (or ``server.http_port``)
also the OpenAI-compatible HTTP API, and with ``--metrics-port`` (or
``server.metrics_port``) Prometheus metrics, each announced on its own line. On SIGINT/SIGTERM: report NOT_SERVING, stop
taking calls, let in-flight requests finish (drain), then release every actor.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

logger = logging.getLogger(__name__)


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="deploy a configuration and serve the gRPC API "
                                            "(and the OpenAI-compatible HTTP API)")
    p.add_argument("--config", required=True, metavar="FILE", help="YAML configuration file")
    # Kinds are checked by server.make_backend (the one place that knows them), which
    # keeps grpc, Ray and the engine out of `--help`.
    p.add_argument("--backend", default="ray", metavar="KIND",
                   help="ray: drafter and verifier actors on a Ray cluster; inprocess: the "
                        "whole engine in this process (default: ray)")
    p.add_argument("--address", default=None, metavar="ADDR",
                   help="with --backend ray: local (start an embedded Ray), auto, or HOST:PORT "
                        "of a running cluster (default: cluster.address of the config)")
    p.add_argument("--port", type=int, default=None, metavar="N",
                   help="gRPC port (default: server.port of the config; 0 = any free)")
    p.add_argument("--http-port", type=int, default=None, metavar="N",
                   help="also serve the OpenAI-compatible HTTP API on this port (default: "
                        "server.http_port of the config; 0 = any free)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="N",
                   help="export Prometheus metrics on this port (default: server.metrics_port "
                        "of the config; 0 = any free)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on shutdown, how long in-flight requests may take to finish (default: 30)")
    p.set_defaults(handler=_serve)


def _serve(args) -> int:
    import asyncio

    from specfleet.core.config import ConfigError, load_config

    try:
        cfg = load_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.backend == "ray" and (args.address or cfg.cluster.address) == "local":
        # The embedded cluster is known before it starts: refuse a deployment that
        # cannot fit it now, instead of Ray waiting for resources that never come.
        from specfleet.core.placement import (
            PlacementError,
            check_fits,
            deployment_demands,
            embedded_cluster_nodes,
        )

        try:
            check_fits(deployment_demands(cfg), embedded_cluster_nodes(cfg))
        except PlacementError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    try:
        code = asyncio.run(_run(cfg, args))
    except (OSError, ValueError, RuntimeError) as exc:  # port, model path, TLS files, Ray start
        print(f"error: {exc}", file=sys.stderr)
        code = 1
    # Everything is released by now. Leave without interpreter finalisation: with
    # stdout on a pipe, Ray's and gRPC's C++ threads can abort (SIGABRT) during the
    # teardown of an already shut-down driver, turning a clean exit into -6.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _stop_ray() -> None:
    """Best effort: tear down the Ray this process started (its actors with it)."""
    try:
        import ray

        if ray.is_initialized():
            ray.shutdown()
    except Exception:  # interrupted mid-deploy: whatever state Ray is in, leave
        logger.debug("ray.shutdown after an interrupted deploy failed", exc_info=True)


async def _run(cfg, args) -> int:
    import asyncio
    import signal

    from specfleet.router.server import SpecFleetServer, load_tokenizer, make_backend

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def take_signals() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

    take_signals()
    # Deploying loads every model (in its actor): seconds to minutes, off the event loop,
    # and a SIGINT/SIGTERM meanwhile stops it instead of waiting for it.
    deploy = asyncio.ensure_future(asyncio.to_thread(make_backend, cfg, args.backend, args.address))
    interrupted = asyncio.ensure_future(stop.wait())
    await asyncio.wait({deploy, interrupted}, return_when=asyncio.FIRST_COMPLETED)
    if not deploy.done():
        print("specfleet: interrupted while deploying; stopping", file=sys.stderr, flush=True)
        _stop_ray()
        return 130
    interrupted.cancel()
    backend = deploy.result()
    # ray.init installs Ray's C++ failure-signal handler for SIGTERM, which dumps a
    # stack and then dies by the default action (exit 143, actors left behind). Take
    # the signals back so SIGTERM drains and releases everything.
    take_signals()
    runtime = getattr(backend, "runtime", None)  # the Ray backend logged its placements
    try:
        tokenizer = await asyncio.to_thread(load_tokenizer, cfg)
        server = SpecFleetServer(backend, tokenizer, cfg.server, port=args.port,
                                 http_port=args.http_port, metrics_port=args.metrics_port)
        await server.start()
        logger.info("serving on %s", server.address)
        print(f"specfleet: serving on {server.address}", flush=True)
        if server.http is not None:
            print(f"specfleet: OpenAI-compatible HTTP API on {server.http.url}/v1", flush=True)
        if server.metrics is not None:
            print(f"specfleet: metrics on {server.metrics.url}", flush=True)
        await stop.wait()
        logger.info("shutting down: draining %d in-flight request(s)", len(backend.active_request_ids()))
        # Stop taking calls; running streams may finish within the drain timeout.
        await server.stop(args.drain_timeout)
        left = backend.active_request_ids()
        if left:
            logger.warning("drain timed out; cancelling %d request(s)", len(left))
    finally:
        await backend.close()  # stops the engine thread; the Ray backend also frees every actor
        if runtime is not None:
            logger.info("released every actor and the verifier placement group")
    return 0
