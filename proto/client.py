"""The SpecFleet Python client SDK: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

Where it sits: the user's side of ``proto/specfleet.proto``. It imports only grpc and
the generated stubs, so ``pip install specfleet`` users who only call a server never
import torch, Ray or transformers through it (a test checks ``sys.modules``).

    from specfleet.client import Client

    with Client("127.0.0.1:50051") as client:
        result = client.generate("def fib(n):", max_new_tokens=32)
        print(result.text, result.finish_reason, result.stats.mean_acceptance_length)
        for chunk in client.stream("Once upon a time", max_new_tokens=32):
            print(chunk.text, end="", flush=True)

Every failure raises ``SpecFleetError`` carrying the gRPC status code. Calls are
retried with exponential backoff only on UNAVAILABLE (server not up yet, connection
dropped) and, for streams, only before the first chunk arrived, so a retry never
duplicates output. ``timeout`` bounds a whole call, retries included.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from specfleet.proto import specfleet_pb2 as pb
from specfleet.proto import specfleet_pb2_grpc as pb_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
_FINISH_PREFIX = "FINISH_REASON_"


class SpecFleetError(Exception):
    """Any failed call. ``code`` is the ``grpc.StatusCode``; ``message`` the server's detail."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.message = message

    @classmethod
    def from_rpc_error(cls, error: grpc.RpcError) -> SpecFleetError:
        code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
        details = error.details() if hasattr(error, "details") else str(error)
        return cls(code or grpc.StatusCode.UNKNOWN, details or "")


# ---- results ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class SpeculationStats:
    drafted: int  # draft tokens proposed
    accepted: int  # draft tokens accepted
    rounds: int  # verification rounds (target forward passes) after prefill
    mean_acceptance_length: float  # tokens per round, counting the recovered/bonus token
    drafters: dict[str, int] = field(default_factory=dict)  # drafter name -> rounds served
    accepted_by: dict[str, int] = field(default_factory=dict)  # drafter -> accepted tokens it proposed
    domain: str = ""  # the router's classification of the prompt ("" when not routed)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


@dataclass(frozen=True)
class Timings:
    total_ns: int  # server: request received -> last token
    first_token_ns: int  # server: request received -> first token


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    text: str  # generated text, cut before a matched stop sequence
    token_ids: list[int]  # generated tokens (EOS / the stop's last token included)
    finish_reason: str  # "length" | "stop" | "eos" | "cancelled"
    usage: Usage
    stats: SpeculationStats
    timings: Timings
    seed: int | None = None  # the sampling seed used (sampled requests): resend to reproduce


@dataclass(frozen=True)
class StreamChunk:
    request_id: str
    text: str  # new stable text (may be empty while a character or stop is pending)
    token_ids: list[int]  # tokens committed since the previous chunk
    finish_reason: str | None = None  # set on the last chunk only, with the fields below
    usage: Usage | None = None
    stats: SpeculationStats | None = None
    timings: Timings | None = None
    seed: int | None = None  # last chunk of a sampled request: the seed used


@dataclass(frozen=True)
class DrafterInfo:
    name: str
    kind: str
    domain: str


@dataclass(frozen=True)
class VerifierGroupInfo:
    tp_size: int
    device: str
    dtype: str


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int
    default_max_new_tokens: int
    max_concurrent_requests: int
    max_seq_len: int
    max_message_bytes: int


@dataclass(frozen=True)
class ServerInfo:
    target: str
    tokenizer: str
    vocab_size: int
    drafters: list[DrafterInfo]
    verifier_groups: list[VerifierGroupInfo]
    limits: Limits
    server_version: str


# ---- proto <-> dataclasses ------------------------------------------------------------------
Message = Mapping[str, str]  # one chat turn: {"role": ..., "content": ...}


def _is_chat(prompt) -> bool:
    """A list of {role, content} turns rather than token ids."""
    return isinstance(prompt, Sequence) and len(prompt) > 0 and isinstance(prompt[0], Mapping)


def build_request(
    prompt: str | Sequence[int] | Sequence[Message],
    *,
    max_new_tokens: int | None = None,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop: str | Sequence[str] | None = None,
    drafter: str | None = None,
    speculate: bool = True,
    max_draft_length: int | None = None,
    request_id: str | None = None,
) -> pb.GenerateRequest:
    """The wire request; values the wire cannot carry raise ``SpecFleetError(INVALID_ARGUMENT)``.
    Everything else is validated by the server, which names the offending field."""
    try:
        sampling = pb.SamplingParameters(
            temperature=float(temperature),
            top_k=top_k or 0,
            stop=[stop] if isinstance(stop, str) else list(stop or ()),
        )
        if top_p is not None:
            sampling.top_p = float(top_p)
        if seed is not None:
            sampling.seed = seed
        if max_new_tokens is not None:
            sampling.max_new_tokens = max_new_tokens
        speculation = pb.SpeculationOptions(disable=not speculate, drafter=drafter or "")
        if max_draft_length is not None:
            speculation.max_draft_length = max_draft_length
        request = pb.GenerateRequest(
            sampling=sampling, speculation=speculation, request_id=request_id or ""
        )
        if isinstance(prompt, str):
            request.text = prompt
        elif _is_chat(prompt):
            for turn in prompt:
                request.chat.messages.add(role=str(turn["role"]), content=str(turn["content"]))
            request.chat.SetInParent()
        else:
            request.token_ids.ids.extend(prompt)
            request.token_ids.SetInParent()  # an empty list is still "token ids", not "no prompt"
    except (TypeError, ValueError) as exc:
        raise SpecFleetError(grpc.StatusCode.INVALID_ARGUMENT, f"invalid request: {exc}") from None
    return request


def _finish_reason(value: int) -> str | None:
    if value == pb.FINISH_REASON_UNSPECIFIED:
        return None
    return pb.FinishReason.Name(value).removeprefix(_FINISH_PREFIX).lower()


def _usage(msg: pb.Usage) -> Usage:
    return Usage(msg.prompt_tokens, msg.completion_tokens)


def _stats(msg: pb.SpeculationStats) -> SpeculationStats:
    return SpeculationStats(
        msg.drafted, msg.accepted, msg.rounds, msg.mean_acceptance_length, dict(msg.drafters),
        dict(msg.accepted_by), msg.domain,
    )


def _timings(msg: pb.Timings) -> Timings:
    return Timings(msg.total_ns, msg.first_token_ns)


def result_from_proto(msg: pb.GenerateResponse) -> GenerationResult:
    return GenerationResult(
        request_id=msg.request_id,
        text=msg.text,
        token_ids=list(msg.token_ids),
        finish_reason=_finish_reason(msg.finish_reason) or "",
        usage=_usage(msg.usage),
        stats=_stats(msg.stats),
        timings=_timings(msg.timings),
        seed=msg.seed if msg.HasField("seed") else None,
    )


def chunk_from_proto(msg: pb.GenerateChunk) -> StreamChunk:
    reason = _finish_reason(msg.finish_reason)
    last = reason is not None
    return StreamChunk(
        request_id=msg.request_id,
        text=msg.text,
        token_ids=list(msg.token_ids),
        finish_reason=reason,
        usage=_usage(msg.usage) if last else None,
        stats=_stats(msg.stats) if last else None,
        timings=_timings(msg.timings) if last else None,
        seed=msg.seed if last and msg.HasField("seed") else None,
    )


def info_from_proto(msg: pb.InfoResponse) -> ServerInfo:
    lim = msg.limits
    return ServerInfo(
        target=msg.target,
        tokenizer=msg.tokenizer,
        vocab_size=msg.vocab_size,
        drafters=[DrafterInfo(d.name, d.kind, d.domain) for d in msg.drafters],
        verifier_groups=[VerifierGroupInfo(v.tp_size, v.device, v.dtype) for v in msg.verifier_groups],
        limits=Limits(lim.max_new_tokens, lim.default_max_new_tokens,
                      lim.max_concurrent_requests, lim.max_seq_len, lim.max_message_bytes),
        server_version=msg.server_version,
    )


# ---- connection details shared by both clients ---------------------------------------------
@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff on UNAVAILABLE: initial, initial*multiplier, ... capped, with jitter."""

    attempts: int = 4  # total tries, the first included
    initial_backoff: float = 0.1  # seconds
    multiplier: float = 2.0
    max_backoff: float = 2.0

    def delays(self) -> Iterator[float]:
        delay = self.initial_backoff
        for _ in range(self.attempts - 1):
            yield delay * random.uniform(0.5, 1.0)  # jitter keeps reconnecting clients apart
            delay = min(delay * self.multiplier, self.max_backoff)


def _channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
        # Keep long streams alive through idle proxies; the server accepts pings >= 10 s apart.
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.keepalive_timeout_ms", 10_000),
    ]


def _credentials(tls: bool, root_certs: bytes | str | Path | None) -> grpc.ChannelCredentials | None:
    if root_certs is None and not tls:
        return None
    if isinstance(root_certs, (str, Path)):
        try:
            root_certs = Path(root_certs).read_bytes()
        except OSError as exc:
            raise SpecFleetError(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"root_certs: cannot read {exc.filename}: {exc.strerror}") from None
    return grpc.ssl_channel_credentials(root_certificates=root_certs)


class _Base:
    def __init__(
        self,
        target: str,
        *,
        token: str | None,
        timeout: float | None,
        tls: bool,
        root_certs: bytes | str | Path | None,
        retry: RetryPolicy | None,
        max_message_bytes: int,
    ):
        self.target = target
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        self._credentials = _credentials(tls, root_certs)
        self._options = _channel_options(max_message_bytes)

    def _deadline(self, timeout: float | None) -> float | None:
        timeout = self.timeout if timeout is None else timeout
        return None if timeout is None else time.monotonic() + timeout

    @staticmethod
    def _remaining(deadline: float | None) -> float | None:
        if deadline is None:
            return None
        left = deadline - time.monotonic()
        if left <= 0:
            raise SpecFleetError(grpc.StatusCode.DEADLINE_EXCEEDED, "deadline exceeded")
        return left


def _retryable(error: grpc.RpcError) -> bool:
    return getattr(error, "code", lambda: None)() == grpc.StatusCode.UNAVAILABLE


# ---- the blocking client ---------------------------------------------------------------
class Client(_Base):
    """Blocking client. ``token``: bearer token; ``timeout``: default seconds per call
    (retries included); ``tls``/``root_certs``: TLS (root_certs as PEM bytes or a path)."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        timeout: float | None = None,
        tls: bool = False,
        root_certs: bytes | str | Path | None = None,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
    ):
        super().__init__(target, token=token, timeout=timeout, tls=tls, root_certs=root_certs,
                         retry=retry, max_message_bytes=max_message_bytes)
        if self._credentials is None:
            self._channel = grpc.insecure_channel(target, options=self._options)
        else:
            self._channel = grpc.secure_channel(target, self._credentials, options=self._options)
        self._stub = pb_grpc.SpecFleetStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, fn: Callable, request, timeout: float | None):
        deadline = self._deadline(timeout)
        delays = self.retry.delays()
        while True:
            try:
                return fn(request, timeout=self._remaining(deadline), metadata=self._metadata)
            except grpc.RpcError as exc:
                delay = next(delays, None) if _retryable(exc) else None
                if delay is None:
                    raise SpecFleetError.from_rpc_error(exc) from None
                time.sleep(delay)

    def generate(
        self,
        prompt: str | Sequence[int] | Sequence[Message],
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        drafter: str | None = None,
        speculate: bool = True,
        max_draft_length: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> GenerationResult:
        """Generate a completion of ``prompt`` (text, token ids of the target's vocabulary,
        or chat messages — see ``chat``).

        ``max_new_tokens=None`` uses the server's default; ``temperature=0`` is greedy;
        ``stop``: strings that end generation (the text ends before them); ``drafter``:
        preferred drafter name; ``speculate=False`` decodes without drafts (same output);
        ``max_draft_length`` caps the draft window; ``timeout`` in seconds.
        """
        request = build_request(
            prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stop=stop, drafter=drafter, speculate=speculate,
            max_draft_length=max_draft_length, request_id=request_id,
        )
        return result_from_proto(self._call(self._stub.Generate, request, timeout))

    def chat(self, messages: Sequence[Message], **kwargs) -> GenerationResult:
        """The assistant's reply to ``messages`` ({"role", "content"} dicts), rendered
        server-side with the model's chat template; keyword arguments as ``generate``."""
        if not _is_chat(messages):
            raise SpecFleetError(grpc.StatusCode.INVALID_ARGUMENT,
                                 "messages: a non-empty list of {'role', 'content'} dicts")
        return self.generate(messages, **kwargs)

    def stream(
        self,
        prompt: str | Sequence[int] | Sequence[Message],
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        drafter: str | None = None,
        speculate: bool = True,
        max_draft_length: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> Iterator[StreamChunk]:
        """Yield chunks as tokens are verified (arguments as ``generate``); the last one
        has ``finish_reason``. Leaving the loop early cancels the request on the server."""
        request = build_request(
            prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stop=stop, drafter=drafter, speculate=speculate,
            max_draft_length=max_draft_length, request_id=request_id,
        )
        deadline = self._deadline(timeout)
        delays = self.retry.delays()
        received = False
        while True:
            call = self._stub.GenerateStream(
                request, timeout=self._remaining(deadline), metadata=self._metadata
            )
            try:
                for msg in call:
                    received = True
                    yield chunk_from_proto(msg)
                return
            except grpc.RpcError as exc:
                delay = next(delays, None) if _retryable(exc) and not received else None
                if delay is None:
                    raise SpecFleetError.from_rpc_error(exc) from None
            finally:
                call.cancel()  # no-op once finished; frees the server's work when abandoned
            time.sleep(delay)

    def info(self, *, timeout: float | None = None) -> ServerInfo:
        return info_from_proto(self._call(self._stub.Info, pb.InfoRequest(), timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The server's health status name: "SERVING", "NOT_SERVING", ... (no auth needed)."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        reply = self._call(stub.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


# ---- the asyncio client ----------------------------------------------------------------------
class AsyncClient(_Base):
    """``Client`` for asyncio code: the same methods, awaitable; ``stream`` is an async iterator."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        token: str | None = None,
        timeout: float | None = None,
        tls: bool = False,
        root_certs: bytes | str | Path | None = None,
        retry: RetryPolicy | None = None,
        max_message_bytes: int = 4 * 1024 * 1024,
    ):
        super().__init__(target, token=token, timeout=timeout, tls=tls, root_certs=root_certs,
                         retry=retry, max_message_bytes=max_message_bytes)
        if self._credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=self._options)
        else:
            self._channel = grpc.aio.secure_channel(target, self._credentials, options=self._options)
        self._stub = pb_grpc.SpecFleetStub(self._channel)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, fn: Callable, request, timeout: float | None):
        deadline = self._deadline(timeout)
        delays = self.retry.delays()
        while True:
            try:
                return await fn(request, timeout=self._remaining(deadline), metadata=self._metadata)
            except grpc.RpcError as exc:
                delay = next(delays, None) if _retryable(exc) else None
                if delay is None:
                    raise SpecFleetError.from_rpc_error(exc) from None
                await asyncio.sleep(delay)

    async def generate(
        self,
        prompt: str | Sequence[int] | Sequence[Message],
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        drafter: str | None = None,
        speculate: bool = True,
        max_draft_length: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> GenerationResult:
        """See ``Client.generate``."""
        request = build_request(
            prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stop=stop, drafter=drafter, speculate=speculate,
            max_draft_length=max_draft_length, request_id=request_id,
        )
        return result_from_proto(await self._call(self._stub.Generate, request, timeout))

    async def chat(self, messages: Sequence[Message], **kwargs) -> GenerationResult:
        """See ``Client.chat``."""
        if not _is_chat(messages):
            raise SpecFleetError(grpc.StatusCode.INVALID_ARGUMENT,
                                 "messages: a non-empty list of {'role', 'content'} dicts")
        return await self.generate(messages, **kwargs)

    async def stream(
        self,
        prompt: str | Sequence[int] | Sequence[Message],
        *,
        max_new_tokens: int | None = None,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        drafter: str | None = None,
        speculate: bool = True,
        max_draft_length: int | None = None,
        request_id: str | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[StreamChunk]:
        """See ``Client.stream``; an async iterator."""
        request = build_request(
            prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
            top_p=top_p, seed=seed, stop=stop, drafter=drafter, speculate=speculate,
            max_draft_length=max_draft_length, request_id=request_id,
        )
        deadline = self._deadline(timeout)
        delays = self.retry.delays()
        received = False
        while True:
            call = self._stub.GenerateStream(
                request, timeout=self._remaining(deadline), metadata=self._metadata
            )
            try:
                async for msg in call:
                    received = True
                    yield chunk_from_proto(msg)
                return
            except grpc.RpcError as exc:
                delay = next(delays, None) if _retryable(exc) and not received else None
                if delay is None:
                    raise SpecFleetError.from_rpc_error(exc) from None
            finally:
                call.cancel()
            await asyncio.sleep(delay)

    async def info(self, *, timeout: float | None = None) -> ServerInfo:
        return info_from_proto(await self._call(self._stub.Info, pb.InfoRequest(), timeout))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        stub = health_pb2_grpc.HealthStub(self._channel)
        reply = await self._call(stub.Check, health_pb2.HealthCheckRequest(service=service), timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


__all__ = [
    "AsyncClient",
    "Client",
    "DrafterInfo",
    "GenerationResult",
    "Limits",
    "RetryPolicy",
    "ServerInfo",
    "SpecFleetError",
    "SpeculationStats",
    "StreamChunk",
    "Timings",
    "Usage",
    "VerifierGroupInfo",
    "build_request",
]
