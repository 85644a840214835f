"""Server assembly: the grpc.aio server with its interceptors, health and reflection.

Where it sits: ``specfleet serve`` builds a backend with ``make_backend(cfg, kind)``
(the one place that decides which ``GenerationBackend`` serves), loads the target's
tokenizer, and runs a ``SpecFleetServer``; tests run the same server on loopback
through ``ServerThread``. Per request, a call passes the interceptors in order:

1. ``BearerAuthInterceptor`` (only when ``server.auth_token`` is set): UNAUTHENTICATED
   without ``authorization: Bearer <token>`` metadata; health checks are exempt so
   load balancers and orchestrators can probe without the secret.
2. ``ExceptionInterceptor``: the one place that turns a handler's exception into a
   status code (``RequestError`` → its code, anything else → INTERNAL) and logs it,
   once (TGI style). A failing request never takes the server down or hangs.

Then ``SpecFleetServicer`` (``servicer.py``) does the work; the admin service
(``admin.py``: drafters joining and leaving) checks its own token first. With
``server.http_port`` set, the same servicer also serves the OpenAI-compatible HTTP
API (``http_api.py``) on the same event loop, and with ``server.metrics_port`` the
frontend exports Prometheus metrics of both (``metrics.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from specfleet.core.config import ServerConfig, SpecFleetConfig
from specfleet.core.serving import GenerationBackend
from specfleet.proto import specfleet_pb2_grpc as pb_grpc
from specfleet.router.admin import ADMIN_SERVICE_NAME, AdminServicer
from specfleet.router.servicer import SERVICE_NAME, RequestError, SpecFleetServicer, Tokenizer

logger = logging.getLogger(__name__)

# The backends ``make_backend`` can build; ``specfleet serve --backend`` offers these.
BACKENDS: tuple[str, ...] = ("ray", "inprocess")
HEALTH_METHODS = frozenset(
    {"/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch", "/grpc.health.v1.Health/List"}
)
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


# ---- backend and tokenizer from a config --------------------------------------------------
def make_backend(
    cfg: SpecFleetConfig, kind: str = "inprocess", address: str | None = None
) -> GenerationBackend:
    """The generation backend ``cfg`` describes.

    ``inprocess``: the whole engine (and the expertise router) on a thread of this
    process: single machine, tests. ``ray``: drafter and verifier actors on a Ray
    cluster, started embedded or joined at ``address`` (default: cluster.address).
    """
    if kind == "inprocess":
        from specfleet.engine.backend import EngineBackend

        return EngineBackend.from_config(cfg)
    if kind == "ray":
        from specfleet.cluster.runtime import RayBackend

        return RayBackend.from_config(cfg, address)
    raise ValueError(f"backend: unknown kind {kind!r} (known: {', '.join(BACKENDS)})")


def load_tokenizer(cfg: SpecFleetConfig):
    """The tokenizer text prompts are encoded with and outputs decoded with."""
    from specfleet.models.loading import load_tokenizer as load

    if cfg.models.tokenizer:
        return load(cfg.models.tokenizer, config_key="models.tokenizer")
    return load(cfg.models.target, config_key="models.target")


# ---- interceptors ---------------------------------------------------------------------------
@dataclass(frozen=True)
class _Malformed:
    """What a request body that does not parse becomes (instead of an exception inside
    gRPC, which would answer UNKNOWN and log a traceback per call)."""

    error: str


@dataclass(frozen=True)
class _Oversized:
    """A body larger than any request that can be served: refused without parsing it
    (parsing runs on the event loop and holds the GIL)."""

    size: int
    limit: int


def _lenient(deserializer: Callable | None, max_bytes: int | None = None) -> Callable | None:
    if deserializer is None:
        return None

    def parse(body: bytes):
        if max_bytes is not None and len(body) > max_bytes:
            return _Oversized(len(body), max_bytes)
        try:
            return deserializer(body)
        except Exception as exc:  # protobuf's DecodeError, or anything a bad body raises
            return _Malformed(type(exc).__name__)

    return parse


def _same_kind(handler: grpc.RpcMethodHandler, behavior: Callable, *,
               deserializer: Callable | None = None) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s kind (unary/stream in and out) running ``behavior``."""
    if handler.request_streaming and handler.response_streaming:
        make = grpc.stream_stream_rpc_method_handler
    elif handler.request_streaming:
        make = grpc.stream_unary_rpc_method_handler
    elif handler.response_streaming:
        make = grpc.unary_stream_rpc_method_handler
    else:
        make = grpc.unary_unary_rpc_method_handler
    return make(
        behavior,
        request_deserializer=deserializer or handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


class BearerAuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` (health checks exempt)."""

    def __init__(self, token: str, exempt: frozenset[str] = HEALTH_METHODS):
        self._expected = f"Bearer {token}".encode()
        self._exempt = exempt

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method in self._exempt:
            return handler
        given = next((v for k, v in details.invocation_metadata or () if k == "authorization"), None)
        if given is not None and hmac.compare_digest(
            given.encode() if isinstance(given, str) else given, self._expected
        ):
            return handler
        message = "missing bearer token" if given is None else "invalid bearer token"

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return _same_kind(handler, deny)


class ExceptionInterceptor(grpc.aio.ServerInterceptor):
    """Maps exceptions raised by SpecFleet's handlers to status codes; logs each once.
    Bodies over ``max_request_bytes`` are refused unparsed (INVALID_ARGUMENT)."""

    def __init__(self, max_request_bytes: int | None = None):
        self._max_bytes = max_request_bytes

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or not details.method.startswith((f"/{SERVICE_NAME}/", f"/{ADMIN_SERVICE_NAME}/")):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary(request, context):
                try:
                    _check_parsed(request)
                    return await behavior(request, context)
                except Exception as exc:
                    await _abort(context, method, exc)

            return _same_kind(handler, unary, deserializer=_lenient(handler.request_deserializer, self._max_bytes))
        if handler.unary_stream is not None:
            stream_behavior = handler.unary_stream

            async def stream(request, context):
                try:
                    _check_parsed(request)
                    async with contextlib.aclosing(stream_behavior(request, context)) as chunks:
                        async for chunk in chunks:
                            yield chunk
                except Exception as exc:
                    await _abort(context, method, exc)

            return _same_kind(handler, stream, deserializer=_lenient(handler.request_deserializer, self._max_bytes))
        return handler


def _check_parsed(request) -> None:
    if isinstance(request, _Oversized):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"request: {request.size} bytes, more than any request that fits the "
                           f"context can have (at most {request.limit} bytes)")
    if isinstance(request, _Malformed):
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT,
                           f"request: the body is not a valid message of this method ({request.error})")


async def _abort(context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
    if isinstance(exc, grpc.aio.AbortError):  # the handler already set the status
        raise exc
    if isinstance(exc, RequestError):
        logger.info("%s: %s: %s", method, exc.code.name, exc)
        await context.abort(exc.code, str(exc))
    # The client gets a short, stable line and an id; the details (traceback, node
    # addresses, paths) go to the server log once, under that id.
    error_id = uuid.uuid4().hex[:12]
    logger.error("%s failed [error %s]: %s: %s", method, error_id, type(exc).__name__, exc, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error [{error_id}]: {short_reason(exc)}")


def short_reason(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, at most ``limit`` characters."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---- the server --------------------------------------------------------------------------
def server_options(config: ServerConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
        # Ping idle connections every 60 s, drop them after 20 s without an answer, so
        # half-open connections of vanished clients do not pile up.
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 1),
        # Accept client keepalive pings down to every 10 s (the SDK pings every 30 s).
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_ping_strikes", 2),
        # Two servers must never silently share a port.
        ("grpc.so_reuseport", 0),
    ]


class SpecFleetServer:
    """One grpc.aio server: SpecFleet service, health, reflection; beside it, on the
    same servicer, the HTTP API and the metrics endpoint when their ports are set
    (arguments override the config's). Create and use it inside a running event loop;
    ``stop`` leaves the backend to its owner."""

    def __init__(self, backend: GenerationBackend, tokenizer: Tokenizer, config: ServerConfig,
                 *, port: int | None = None, http_port: int | None = None,
                 metrics_port: int | None = None):
        self.backend = backend
        self.config = config
        self.host = config.host
        self.port = config.port if port is None else port
        http_port = config.http_port if http_port is None else http_port
        metrics_port = config.metrics_port if metrics_port is None else metrics_port
        self.metrics = None
        if metrics_port is not None:
            from specfleet.router.metrics import Metrics

            self.metrics = Metrics(backend, port=metrics_port, host=config.host)
        self.servicer = SpecFleetServicer(backend, tokenizer, config, observer=self.metrics)
        self.http = None
        if http_port is not None:
            from specfleet.router.http_api import HttpServer  # FastAPI only when asked for

            self.http = HttpServer(self.servicer, config, port=http_port)
        self.health = health.aio.HealthServicer()
        interceptors: list[grpc.aio.ServerInterceptor] = []
        if config.auth_token:
            interceptors.append(BearerAuthInterceptor(config.auth_token))
        interceptors.append(ExceptionInterceptor(self.servicer.max_request_bytes))
        self._server = grpc.aio.server(interceptors=interceptors, options=server_options(config))
        pb_grpc.add_SpecFleetServicer_to_server(self.servicer, self._server)
        self.admin = AdminServicer(backend, config.admin_token)
        pb_grpc.add_SpecFleetAdminServicer_to_server(self.admin, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, ADMIN_SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server
        )

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (a free one for port 0)."""
        cfg = self.config
        address = self.address
        try:
            if cfg.tls_cert:
                credentials = grpc.ssl_server_credentials(
                    [(Path(cfg.tls_key).read_bytes(), Path(cfg.tls_cert).read_bytes())]
                )
                bound = self._server.add_secure_port(address, credentials)
            else:
                if self.host not in LOOPBACK:
                    logger.warning("serving without TLS on %s: traffic (and any bearer token) "
                                   "is readable on the network", self.host)
                bound = self._server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc raises when the port cannot be bound
            raise OSError(f"cannot listen on {address}: {exc}") from None
        if not bound:
            raise OSError(f"cannot listen on {address}")
        self.port = bound
        await self._server.start()
        if self.metrics is not None:
            self.metrics.start()
        if self.http is not None:
            await self.http.start()
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        logger.info("serving specfleet.v1 on %s (tls=%s, auth=%s)", self.address,
                    bool(cfg.tls_cert), bool(cfg.auth_token))
        return bound

    async def stop(self, grace: float | None = 5.0) -> None:
        """Report NOT_SERVING, stop accepting calls, let running ones finish for ``grace`` s."""
        await self.health.enter_graceful_shutdown()
        stops = [self._server.stop(grace)]
        if self.http is not None:
            stops.append(self.http.stop(grace))
        await asyncio.gather(*stops)
        if self.metrics is not None:
            self.metrics.stop()

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()


class ServerThread:
    """A ``SpecFleetServer`` on its own event-loop thread, for synchronous callers
    (tests, notebooks): ``with ServerThread(backend, tokenizer, cfg) as srv: srv.port``."""

    def __init__(self, backend: GenerationBackend, tokenizer: Tokenizer, config: ServerConfig,
                 *, port: int | None = None, http_port: int | None = None,
                 metrics_port: int | None = None):
        self._args = (backend, tokenizer, config)
        self._ports = dict(port=port, http_port=http_port, metrics_port=metrics_port)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="specfleet-grpc",
                                        daemon=True)
        self.server: SpecFleetServer | None = None

    def start(self) -> ServerThread:
        self._thread.start()
        self.run(self._start())
        return self

    async def _start(self) -> None:
        self.server = SpecFleetServer(*self._args, **self._ports)
        await self.server.start()

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def address(self) -> str:
        return self.server.address

    def run(self, coro, timeout: float | None = 60):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def stop(self, grace: float | None = 1.0) -> None:
        if self.server is not None:
            self.run(self.server.stop(grace))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
