"""The OpenAI-compatible HTTP API, beside gRPC, on the same servicer and engine.

Where it sits: ``specfleet serve --http-port`` (or ``server.http_port``) runs an
``HttpServer`` (uvicorn, on the gRPC server's event loop) over the *same*
``SpecFleetServicer``: a request here is translated into a ``GenerateRequest``
(``openai_protocol.py``), validated by the servicer's ``prepare``, admitted under
the same concurrency limit, and served from the servicer's ``pieces`` stream — so
both APIs accept, refuse and generate exactly alike, and share the metrics.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both stream as
server-sent events with ``stream: true``), ``GET /v1/models[/{id}]`` and ``GET
/health``. With ``server.auth_token`` set, every route but ``/health`` needs
``Authorization: Bearer <token>`` — the gRPC token. Every error is OpenAI's JSON
(``{"error": {message, type, param, code}}``) with the matching HTTP status: 400 for
a bad argument (naming it in ``param``), 401 without the token, 404 for an unknown
model (``model_not_found``) or route, 413 for a body over ``server.max_message_bytes``,
429 at the concurrency limit, 503 when a worker cannot be brought back, 500 (with an
id in the server log) for a failure of the engine.

Cancellation, as in gRPC, is structural: a client that disconnects — from a stream or
while waiting for a whole completion — closes the servicer's stream, which cancels
the request in the engine and frees its KV caches.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import socket
import uuid
from collections.abc import AsyncIterator

import grpc
import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from specfleet.core.config import ServerConfig
from specfleet.router.chat import NoChatTemplate, render_chat
from specfleet.router.openai_protocol import (
    ChatRequest,
    CompletionRequest,
    OpenAIError,
    bad_request,
    completion_prompt,
    envelope,
    finish_reason,
    now_s,
    speculation_stats,
    to_generate_request,
    translate_invalid,
    usage,
)
from specfleet.router.server import short_reason
from specfleet.router.servicer import (
    INLINE_TOKENIZE_CHARS,
    Piece,
    Prepared,
    RequestError,
    SpecFleetServicer,
)

logger = logging.getLogger(__name__)

_STATUS = {  # gRPC status of a refused request -> (HTTP status, OpenAI error type, code)
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error", "rate_limit_exceeded"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "invalid_request_error", None),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable_error", None),
    grpc.StatusCode.UNAUTHENTICATED: (401, "invalid_request_error", "invalid_api_key"),
}


class _Api:
    """The routes' state: the servicer, the served model name, the token."""

    def __init__(self, servicer: SpecFleetServicer, config: ServerConfig):
        self.servicer = servicer
        self.config = config
        self.model = config.served_model_name or servicer.backend.info().target
        self.created = now_s()
        self._expected = f"Bearer {config.auth_token}".encode() if config.auth_token else None

    # ---- errors ------------------------------------------------------------------------------
    def as_openai(self, exc: BaseException, *, prompt_param: str = "prompt",
                  max_tokens_param: str = "max_tokens") -> OpenAIError:
        """Any exception of a request as the error its client gets (logged here, once)."""
        if isinstance(exc, OpenAIError):
            return exc
        if isinstance(exc, RequestError):
            if exc.code == grpc.StatusCode.INVALID_ARGUMENT:
                return translate_invalid(str(exc), prompt_param=prompt_param,
                                         max_tokens_param=max_tokens_param)
            status, kind, code = _STATUS.get(exc.code, (500, "server_error", None))
            logger.info("http: %s: %s", exc.code.name, exc)
            return OpenAIError(status, str(exc), type=kind, code=code)
        error_id = uuid.uuid4().hex[:12]
        logger.error("http request failed [error %s]: %s: %s", error_id, type(exc).__name__, exc,
                     exc_info=exc)
        return OpenAIError(500, f"internal error [{error_id}]: {short_reason(exc)}",
                           type="server_error")

    def check_auth(self, request: Request) -> None:
        if self._expected is None:
            return
        given = request.headers.get("authorization")
        if given is None:
            raise OpenAIError(401, "missing bearer token (Authorization: Bearer <token>)",
                              code="invalid_api_key")
        if not hmac.compare_digest(given.encode(), self._expected):
            raise OpenAIError(401, "invalid bearer token", code="invalid_api_key")

    def check_model(self, name: str) -> None:
        if name != self.model:
            raise OpenAIError(404, f"The model `{name[:128]}` does not exist (served: "
                              f"`{self.model}`)", param="model", code="model_not_found")

    # ---- one request ---------------------------------------------------------------------------
    async def prepare(self, req, prompt, max_tokens: int | None, request_id: str, *,
                      prompt_param: str, max_tokens_param: str) -> Prepared:
        req.check_supported()
        msg = to_generate_request(req, prompt, max_tokens, request_id)
        try:
            return await self.servicer.prepare(msg, api="http")
        except RequestError as exc:
            raise self.as_openai(exc, prompt_param=prompt_param,
                                 max_tokens_param=max_tokens_param) from None

    async def admitted_pieces(self, prepared: Prepared) -> AsyncIterator[Piece]:
        async with self.servicer.admitted(prepared):
            async with contextlib.aclosing(self.servicer.pieces(prepared)) as pieces:
                async for piece in pieces:
                    yield piece

    async def collect(self, prepared: Prepared) -> tuple[str, list[int], Piece]:
        """The whole output: text, tokens and the last piece (stats, usage)."""
        text: list[str] = []
        tokens: list[int] = []
        async with contextlib.aclosing(self.admitted_pieces(prepared)) as pieces:
            async for piece in pieces:
                text.append(piece.text)
                tokens.extend(piece.token_ids)
                if piece.finish_reason is not None:
                    return "".join(text), tokens, piece
        raise RuntimeError("the output stream ended without a finish reason")

    async def first_piece(self, prepared: Prepared) -> tuple[AsyncIterator[Piece], Piece]:
        """Start a stream and wait for its first piece, so that a refusal (limit,
        backend) is still an HTTP error rather than an event inside a 200 stream."""
        stream = self.admitted_pieces(prepared)
        try:
            return stream, await anext(stream)
        except BaseException:
            await stream.aclose()
            raise

    async def sse(self, stream: AsyncIterator[Piece], first: Piece, *, kind: str, rid: str,
                  include_usage: bool, token_ids: bool) -> AsyncIterator[str]:
        """Server-sent events of one streamed request (OpenAI's chunk objects)."""
        chat = kind == "chat.completion.chunk"

        def event(choice: dict, **extra) -> str:
            body = envelope(kind, rid, self.model, self.created, [{"index": 0, **choice}])
            return f"data: {json.dumps({**body, **extra})}\n\n"

        try:
            no_tokens = {"token_ids": []} if token_ids else {}
            if chat:
                yield event({"delta": {"role": "assistant", "content": ""}, **no_tokens,
                             "logprobs": None, "finish_reason": None})
            piece = first
            while True:
                if piece.text or (token_ids and piece.token_ids):
                    choice = ({"delta": {"content": piece.text}} if chat else {"text": piece.text})
                    if token_ids:
                        choice["token_ids"] = piece.token_ids
                    yield event({**choice, "logprobs": None, "finish_reason": None})
                if piece.finish_reason is not None:
                    last = {"delta": {}} if chat else {"text": ""}
                    extra = {"speculation": speculation_stats(piece.stats)}
                    if piece.seed is not None:
                        extra["seed"] = piece.seed
                    yield event({**last, **no_tokens, "logprobs": None,
                                 "finish_reason": finish_reason(piece.finish_reason)}, **extra)
                    if include_usage:
                        body = envelope(kind, rid, self.model, self.created, [])
                        body["usage"] = usage(piece.prompt_tokens, piece.completion_tokens)
                        yield f"data: {json.dumps(body)}\n\n"
                    break
                piece = await anext(stream)
        except Exception as exc:  # after the 200: the error goes in the stream, as OpenAI's does
            yield f"data: {json.dumps(self.as_openai(exc).body())}\n\n"
        finally:
            await stream.aclose()  # also on a disconnect: cancels the request in the engine
        yield "data: [DONE]\n\n"

    def respond(self, kind: str, rid: str, text: str, tokens: list[int], last: Piece,
                token_ids: bool) -> dict:
        if kind == "chat.completion":
            choice = {"message": {"role": "assistant", "content": text}}
        else:
            choice = {"text": text}
        if token_ids:
            choice["token_ids"] = tokens
        choice.update(logprobs=None, finish_reason=finish_reason(last.finish_reason))
        body = envelope(kind, rid, self.model, self.created, [{"index": 0, **choice}])
        body["usage"] = usage(last.prompt_tokens, last.completion_tokens)
        body["speculation"] = speculation_stats(last.stats)
        if last.seed is not None:
            body["seed"] = last.seed
        return body

    async def serve(self, request: Request, req, prompt, max_tokens: int | None, *, kind: str,
                    prompt_param: str, max_tokens_param: str):
        prefix = "chatcmpl" if kind == "chat.completion" else "cmpl"
        rid = f"{prefix}-{uuid.uuid4().hex}"
        prepared = await self.prepare(req, prompt, max_tokens, rid, prompt_param=prompt_param,
                                      max_tokens_param=max_tokens_param)
        errors = dict(prompt_param=prompt_param, max_tokens_param=max_tokens_param)
        if req.stream:
            try:
                # Until the first token the response has not started: watch for the client
                # going away here too (a request can wait long for a group, or hang).
                stream, first = await _unless_disconnected(request, self.first_piece(prepared))
            except _ClientGone:
                return JSONResponse({}, status_code=499)
            except Exception as exc:
                raise self.as_openai(exc, **errors) from None
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            events = self.sse(stream, first, kind=f"{kind}.chunk", rid=rid,
                              include_usage=include_usage, token_ids=req.return_token_ids)
            return StreamingResponse(events, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        try:
            text, tokens, last = await _unless_disconnected(request, self.collect(prepared))
        except _ClientGone:
            return JSONResponse({}, status_code=499)  # nobody reads it; the request is cancelled
        except Exception as exc:
            raise self.as_openai(exc, **errors) from None
        return JSONResponse(self.respond(kind, rid, text, tokens, last, req.return_token_ids))


def _most_telling(errors) -> dict:
    """Of pydantic's errors (one per member of a union such as ``prompt``'s), the one a
    client can act on: a broken constraint (``2**40`` is over int32) beats a type mismatch
    with another member (``not a string``), and the deepest location wins a tie."""
    if not errors:
        return {"loc": (), "msg": "invalid request"}
    return max(errors, key=lambda e: (not str(e.get("type", "")).endswith("_type"),
                                      len(e.get("loc", ()))))


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "dict", "list", "none"})


def _is_field(part) -> bool:
    """Whether a pydantic error location part names a field or index, not a union member
    (``prompt.str``, ``content.list[TextPart]``) — OpenAI's ``param`` has only those."""
    if isinstance(part, int):
        return True
    return part.isidentifier() and part.islower() and part not in _TYPE_TAGS


class _ClientGone(Exception):
    pass


async def _until_disconnect(request: Request) -> None:
    # The body has been read, so the next ASGI message is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(request: Request, work):
    """Await ``work``; cancel it (and raise _ClientGone) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:  # this handler was cancelled: so is the work
        task.cancel()
        gone.cancel()
        raise
    gone.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        raise _ClientGone()
    return task.result()


def build_app(servicer: SpecFleetServicer, config: ServerConfig) -> FastAPI:
    """The FastAPI app of the HTTP API over ``servicer``."""
    api = _Api(servicer, config)
    app = FastAPI(title="SpecFleet (OpenAI-compatible)", docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.api = api
    auth = [Depends(api.check_auth)]

    @app.exception_handler(OpenAIError)
    async def _openai_error(request: Request, exc: OpenAIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = _most_telling(exc.errors())
        loc = [str(p) for p in err.get("loc", ())[1:] if _is_field(p)]  # loc[0] is "body"
        param = ".".join(loc) or None
        if err.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        elif err.get("type") == "json_invalid" or not loc:
            message = f"the request body is not valid JSON of this endpoint: {err.get('msg')}"
            param = None
        else:
            message = f"{param}: {err.get('msg')}"
        return JSONResponse(bad_request(message[:600], param).body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        body = OpenAIError(exc.status_code, str(exc.detail)).body()
        return JSONResponse(body, status_code=exc.status_code)

    @app.middleware("http")
    async def _body_limit(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_message_bytes:
            error = OpenAIError(413, f"request body over {config.max_message_bytes} bytes")
            return JSONResponse(error.body(), status_code=413)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    def model_card() -> dict:
        return {"id": api.model, "object": "model", "created": api.created, "owned_by": "specfleet",
                "drafters": [d.name for d in servicer.backend.info().drafters]}

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model:path}", dependencies=auth)
    async def model(model: str):
        api.check_model(model)
        return model_card()

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request, req: CompletionRequest):
        api.check_model(req.model)
        return await api.serve(request, req, completion_prompt(req), req.max_tokens,
                               kind="text_completion", prompt_param="prompt",
                               max_tokens_param="max_tokens")

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request, req: ChatRequest):
        api.check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            if sum(len(m["content"]) for m in messages) > INLINE_TOKENIZE_CHARS:
                # As the servicer does for long text: keep the event loop (other streams) moving.
                prompt = await asyncio.to_thread(render_chat, servicer.tokenizer, messages)
            else:
                prompt = render_chat(servicer.tokenizer, messages)
        except NoChatTemplate as exc:
            raise bad_request(f"messages: {exc}", "messages") from None
        except ValueError as exc:
            raise bad_request(f"messages: {str(exc)[:400]}", "messages") from None
        if not prompt:
            raise bad_request("messages: render to an empty prompt", "messages")
        limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        return await api.serve(request, req, prompt, req.token_limit, kind="chat.completion",
                               prompt_param="messages", max_tokens_param=limit_param)

    return app


class _Uvicorn(uvicorn.Server):
    """uvicorn without its signal handling: the frontend's owner (``specfleet serve``)
    takes SIGINT/SIGTERM and stops both APIs in order."""

    def install_signal_handlers(self) -> None:  # uvicorn < 0.29
        pass

    @contextlib.contextmanager
    def capture_signals(self):  # uvicorn >= 0.29
        yield


class HttpServer:
    """The HTTP API on ``config.host``:``port``, served by uvicorn on the running loop."""

    def __init__(self, servicer: SpecFleetServicer, config: ServerConfig, *, port: int):
        self.config = config
        self.host = config.host
        self.port = port
        self.app = build_app(servicer, config)
        self._server: _Uvicorn | None = None
        self._task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.config.tls_cert else "http"
        return f"{scheme}://{host}:{self.port}"

    async def start(self) -> int:
        """Bind (raises OSError if the port is taken) and serve; returns the bound port."""
        # Bound here rather than by uvicorn, which answers a taken port with sys.exit.
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        # As uvicorn does: rebind at once after a restart (TIME_WAIT); on Linux this still
        # refuses a second listener on the port.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            raise OSError(f"cannot listen on {self.host}:{self.port} (HTTP API): {exc}") from None
        sock.listen(1024)
        self.port = sock.getsockname()[1]
        cfg = self.config
        config = uvicorn.Config(
            self.app, log_level="warning", access_log=False, lifespan="off",
            ssl_certfile=cfg.tls_cert, ssl_keyfile=cfg.tls_key, timeout_graceful_shutdown=5,
        )
        self._server = _Uvicorn(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        while not self._server.started:
            if self._task.done():  # failed while starting (e.g. TLS files)
                self._task.result()
                raise OSError(f"HTTP API on {self.url} did not start")
            await asyncio.sleep(0.01)
        logger.info("serving the OpenAI-compatible HTTP API on %s", self.url)
        return self.port

    async def stop(self, grace: float | None = 5.0) -> None:
        """Stop taking requests; running ones get ``grace`` seconds to finish."""
        if self._server is None or self._task is None:
            return
        self._server.config.timeout_graceful_shutdown = grace
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
