"""The gRPC servicer: ``specfleet.v1.SpecFleet`` over any ``GenerationBackend``.

Where it sits: between the wire and the backend. For each RPC it validates the
request (INVALID_ARGUMENT naming the field), tokenizes a text prompt, admits the
request under ``server.max_concurrent_requests`` (else RESOURCE_EXHAUSTED), streams
``GenerationChunk``s from the backend and turns them into responses, detokenizing
incrementally (``text_stream.py``) and cutting the text before a stop sequence.

The OpenAI-compatible HTTP API (``http_api.py``) goes through the same three steps
— ``prepare`` (validation), ``admitted`` (the concurrency limit), ``pieces`` (the
transport-neutral output stream) — by translating its JSON into a ``GenerateRequest``
first, so both APIs refuse and serve exactly the same requests. ``pieces`` also
reports every finished request to the frontend's ``RequestObserver`` (Prometheus,
``metrics.py``), whichever API it came through.

Errors are raised, never reported by hand: ``RequestError`` carries its status
code, anything else is a bug or a backend failure; the exception interceptor in
``server.py`` maps both to a status and logs once. Cancellation is structural: the
backend stream is always closed (``aclosing``) when the handler exits for any reason
(gRPC cancels the handler on a client cancel or an expired deadline; errors), and
closing it cancels the request in the backend and frees its KV caches.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

import grpc

from specfleet import __version__
from specfleet.core.config import ServerConfig
from specfleet.core.serving import ErrorCode, GenerationBackend, GenerationRequest
from specfleet.core.stats import RequestStats
from specfleet.core.types import FinishReason, SamplingParams
from specfleet.proto import specfleet_pb2 as pb
from specfleet.proto import specfleet_pb2_grpc as pb_grpc
from specfleet.router.chat import render_chat
from specfleet.router.text_stream import TextStream

logger = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["SpecFleet"].full_name  # "specfleet.v1.SpecFleet"
DEFAULT_MAX_NEW_TOKENS = 64  # when a request leaves max_new_tokens unset (capped by the limit)
MAX_REQUEST_ID_CHARS = 128
INLINE_TOKENIZE_CHARS = 4096  # longer prompts are tokenized on a worker thread
MAX_STOP_SEQUENCES = 16  # stop strings per request (each is matched every round)
MAX_STOP_CHARS = 256  # characters per stop string
MAX_NAME_CHARS = 128  # drafter names, and how much of a bad value an error echoes
PARSE_ALWAYS_BYTES = 256 * 1024  # bodies up to this size are always parsed (~6 ms at most)


def encode_text(tokenizer, text: str) -> list[int]:
    """A text prompt's ids. A text that already starts with the tokenizer's BOS string
    (copied from a chat template, say) is encoded without the automatic special tokens,
    so it never starts with two BOS tokens."""
    bos = getattr(tokenizer, "bos_token", None)
    if bos and text.startswith(bos):
        return list(tokenizer.encode(text, add_special_tokens=False))
    return list(tokenizer.encode(text))


def longest_token_chars(tokenizer) -> int | None:
    """Characters of the longest vocabulary entry: no token covers more text than that
    (byte-level BPE, SentencePiece and WordPiece entries are at least as long as their
    text), so a text over ``context * this`` characters cannot fit and is refused
    before tokenizing. None when the tokenizer lists no vocabulary (no such bound)."""
    vocab = getattr(tokenizer, "get_vocab", None)
    if vocab is None:
        return None
    try:
        return max((len(t) for t in vocab()), default=None)
    except Exception:  # a tokenizer whose vocabulary cannot be listed: no bound
        return None

_FINISH = {
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.EOS: pb.FINISH_REASON_EOS,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
}


class Tokenizer(Protocol):
    """What the servicer needs of a tokenizer (a Hugging Face tokenizer fits)."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, token_ids: list[int], skip_special_tokens: bool = ...) -> str: ...


class RequestError(Exception):
    """A request the server refuses; the interceptor answers with ``code`` and the message."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


def invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


class BackendFailure(Exception):
    """The backend failed a request (it reported an error chunk): INTERNAL."""


@dataclass
class Prepared:
    """A validated, tokenized request, ready for ``admitted`` and ``pieces``."""

    request: GenerationRequest
    received_ns: int  # perf_counter_ns when the frontend got it (latencies start here)
    api: str = "grpc"  # which API it came through (a metrics label)


@dataclass
class Piece:
    """One step of a request's output, before any wire format (gRPC and HTTP build from it)."""

    token_ids: list[int]  # tokens committed since the previous piece
    text: str  # their text (held back while it might still become a stop sequence)
    finish_reason: FinishReason | None = None  # set on the last piece only
    # The last piece only:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    stats: RequestStats | None = None  # the engine's per-request speculation statistics
    total_ns: int = 0  # received -> last token
    first_token_ns: int = 0  # received -> first token
    seed: int | None = None  # a sampled request's seed: resend it to reproduce


@dataclass
class RequestRecord:
    """What a ``RequestObserver`` learns of one request that ended (served or failed)."""

    api: str
    finish_reason: str  # a FinishReason value, or "error" for a failed request
    prompt_tokens: int
    completion_tokens: int
    stats: RequestStats | None  # None when the request failed
    total_ns: int  # received -> end
    first_token_ns: int | None  # received -> first token; None if none came
    # (gap since the previous piece's tokens, tokens in this piece) for every piece after
    # the first with tokens: the output cadence a streaming client sees (measured the
    # same way for whole responses).
    token_gaps: list[tuple[int, int]]


class RequestObserver(Protocol):
    """Told of each request as it ends (``metrics.Metrics`` implements it). Runs on the
    event loop, so it must be quick and must not raise."""

    def observe_request(self, record: RequestRecord) -> None: ...


class SpecFleetServicer(pb_grpc.SpecFleetServicer):
    def __init__(self, backend: GenerationBackend, tokenizer: Tokenizer, config: ServerConfig,
                 *, observer: RequestObserver | None = None):
        self.backend = backend
        self.tokenizer = tokenizer
        self.config = config
        self.observer = observer
        self.default_max_new_tokens = min(DEFAULT_MAX_NEW_TOKENS, config.max_new_tokens_limit)
        self._in_flight: set[str] = set()
        # Work per request on the event loop must stay small whatever a client sends
        # (health checks and every other stream share the loop): prompts that cannot
        # fit are refused from their size alone, before anything proportional to it.
        token_chars = longest_token_chars(tokenizer)
        self._max_text_chars = None if token_chars is None else self._info.max_seq_len * token_chars
        self.max_request_bytes = _max_request_bytes(self._info.max_seq_len, self._max_text_chars)

    @property
    def _info(self):
        """Read per call: drafters join and leave at run time (the admin API)."""
        return self.backend.info()

    @property
    def _drafters(self) -> list[str]:
        return [d.name for d in self.backend.info().drafters]

    # ---- RPCs ------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        prepared = await self.prepare(request)
        response = pb.GenerateResponse(request_id=prepared.request.request_id)
        text: list[str] = []
        async with self.admitted(prepared):
            async with contextlib.aclosing(self._run(prepared)) as chunks:
                async for chunk in chunks:
                    text.append(chunk.text)
                    response.token_ids.extend(chunk.token_ids)
                    if chunk.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                        response.finish_reason = chunk.finish_reason
                        response.usage.CopyFrom(chunk.usage)
                        response.stats.CopyFrom(chunk.stats)
                        response.timings.CopyFrom(chunk.timings)
                        if chunk.HasField("seed"):
                            response.seed = chunk.seed
        response.text = "".join(text)
        return response

    async def GenerateStream(
        self, request: pb.GenerateRequest, context
    ) -> AsyncIterator[pb.GenerateChunk]:
        prepared = await self.prepare(request)
        async with self.admitted(prepared):
            async with contextlib.aclosing(self._run(prepared)) as chunks:
                async for chunk in chunks:
                    yield chunk

    async def Info(self, request: pb.InfoRequest, context) -> pb.InfoResponse:
        info = self._info
        return pb.InfoResponse(
            target=info.target,
            tokenizer=info.tokenizer,
            vocab_size=info.vocab_size,
            drafters=[
                pb.DrafterInfo(name=d.name, kind=d.kind, domain=d.domain)
                for d in info.drafters
            ],
            verifier_groups=[
                pb.VerifierGroupInfo(tp_size=v.tp_size, device=v.device, dtype=v.dtype)
                for v in info.verifier_groups
            ],
            limits=pb.Limits(
                max_new_tokens=self.config.max_new_tokens_limit,
                default_max_new_tokens=self.default_max_new_tokens,
                max_concurrent_requests=self.config.max_concurrent_requests,
                max_seq_len=info.max_seq_len,
                max_message_bytes=self.config.max_message_bytes,
            ),
            server_version=__version__,
        )

    # ---- one request -------------------------------------------------------------------
    async def _run(self, prepared: Prepared) -> AsyncIterator[pb.GenerateChunk]:
        """Pieces → wire chunks; the last carries finish reason, usage, stats."""
        rid = prepared.request.request_id
        async with contextlib.aclosing(self.pieces(prepared)) as pieces:
            async for piece in pieces:
                out = pb.GenerateChunk(request_id=rid, token_ids=piece.token_ids, text=piece.text)
                if piece.finish_reason is not None:
                    out.finish_reason = _FINISH[piece.finish_reason]
                    out.usage.prompt_tokens = piece.prompt_tokens
                    out.usage.completion_tokens = piece.completion_tokens
                    _fill_stats(out.stats, piece.stats)
                    out.timings.total_ns = piece.total_ns
                    out.timings.first_token_ns = piece.first_token_ns
                    if piece.seed is not None:
                        out.seed = piece.seed
                yield out

    async def pieces(self, prepared: Prepared) -> AsyncIterator[Piece]:
        """The request's output from the backend, detokenized and cut at a stop sequence;
        the last piece has ``finish_reason``. Raises ``RequestError``/``BackendFailure``."""
        req = prepared.request
        text = TextStream(self._decode, req.sampling.stop)
        completion_tokens = 0
        first_token_ns = 0
        last_tokens_ns = 0
        gaps: list[tuple[int, int]] = []
        finished = False
        try:
            async with contextlib.aclosing(self.backend.stream(req)) as chunks:
                async for chunk in chunks:
                    if chunk.error is not None:
                        if chunk.error.code == ErrorCode.INVALID_ARGUMENT:
                            raise invalid(chunk.error.message)
                        if chunk.error.code == ErrorCode.UNAVAILABLE:
                            raise RequestError(grpc.StatusCode.UNAVAILABLE, chunk.error.message)
                        raise BackendFailure(f"request {req.request_id}: {chunk.error.message}")
                    if chunk.token_ids:
                        now = time.perf_counter_ns()
                        if not first_token_ns:
                            first_token_ns = now - prepared.received_ns
                        else:
                            gaps.append((now - last_tokens_ns, len(chunk.token_ids)))
                        last_tokens_ns = now
                    completion_tokens += len(chunk.token_ids)
                    piece = Piece(list(chunk.token_ids), text.push(chunk.token_ids))
                    if chunk.finish_reason is not None:
                        piece.text += text.finish()
                        piece.finish_reason = FinishReason(chunk.finish_reason)
                        piece.prompt_tokens = len(req.prompt_token_ids)
                        piece.completion_tokens = completion_tokens
                        piece.stats = chunk.stats
                        piece.total_ns = time.perf_counter_ns() - prepared.received_ns
                        piece.first_token_ns = first_token_ns
                        piece.seed = chunk.seed
                        finished = True
                        self._observe(prepared, piece.finish_reason.value, completion_tokens,
                                      chunk.stats, first_token_ns, gaps)
                        yield piece
                        return
                    yield piece
            raise BackendFailure(f"request {req.request_id}: the backend ended the stream unfinished")
        except (GeneratorExit, asyncio.CancelledError):  # the client went away (or its deadline)
            if not finished:
                self._observe(prepared, FinishReason.CANCELLED.value, completion_tokens, None,
                              first_token_ns, gaps)
            raise
        except Exception:
            if not finished:
                self._observe(prepared, FinishReason.ERROR.value, completion_tokens, None,
                              first_token_ns, gaps)
            raise

    def _observe(self, prepared: Prepared, reason: str, completion_tokens: int,
                 stats: RequestStats | None, first_token_ns: int,
                 gaps: list[tuple[int, int]]) -> None:
        if self.observer is None:
            return
        record = RequestRecord(
            api=prepared.api, finish_reason=reason,
            prompt_tokens=len(prepared.request.prompt_token_ids),
            completion_tokens=completion_tokens, stats=stats,
            total_ns=time.perf_counter_ns() - prepared.received_ns,
            first_token_ns=first_token_ns or None, token_gaps=gaps,
        )
        try:
            self.observer.observe_request(record)
        except Exception:  # metrics must never fail a request
            logger.exception("request observer failed")

    def _decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    @contextlib.asynccontextmanager
    async def admitted(self, prepared: Prepared):
        """Hold one of ``server.max_concurrent_requests`` slots (else RESOURCE_EXHAUSTED)."""
        rid = prepared.request.request_id
        if len(self._in_flight) >= self.config.max_concurrent_requests:
            raise RequestError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"server is at its limit of {self.config.max_concurrent_requests} concurrent "
                "requests; retry later",
            )
        if rid in self._in_flight:
            raise RequestError(grpc.StatusCode.ALREADY_EXISTS,
                               f"request_id: {rid!r} is already in flight")
        self._in_flight.add(rid)
        try:
            yield
        finally:
            self._in_flight.discard(rid)

    # ---- validation ----------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet ended, through either API."""
        return len(self._in_flight)

    async def prepare(self, request: pb.GenerateRequest, *, api: str = "grpc") -> Prepared:
        """Validate and tokenize; raises ``RequestError`` naming the offending field."""
        received_ns = time.perf_counter_ns()
        sampling = self._sampling(request.sampling)
        prompt = await self._prompt(request, sampling.max_new_tokens)
        spec = request.speculation
        drafter = spec.drafter or None
        if drafter is not None and drafter not in self._drafters:
            known = ", ".join(self._drafters) or "none"
            raise invalid(f"speculation.drafter: unknown drafter {_clip(drafter)!r} (known: {known})")
        request_id = request.request_id or uuid.uuid4().hex
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise invalid(f"request_id: longer than {MAX_REQUEST_ID_CHARS} characters")
        return Prepared(
            GenerationRequest(
                request_id=request_id,
                prompt_token_ids=prompt,
                sampling=sampling,
                drafter=drafter,
                speculate=not spec.disable,
                max_draft_length=spec.max_draft_length if spec.HasField("max_draft_length") else None,
            ),
            received_ns,
            api,
        )

    async def _prompt(self, request: pb.GenerateRequest, max_new_tokens: int) -> list[int]:
        context = self._info.max_seq_len

        def check_fits(n_tokens: int) -> None:
            if n_tokens + max_new_tokens > context:
                raise invalid(f"prompt: {n_tokens} tokens + max_new_tokens {max_new_tokens} "
                              f"exceed the context of {context} tokens")

        kind = request.WhichOneof("prompt")
        if kind == "text":
            text = request.text
            if not text:
                raise invalid("prompt.text: must not be empty")
            if self._max_text_chars is not None and len(text) > self._max_text_chars:
                raise invalid(f"prompt.text: {len(text)} characters cannot fit the context of "
                              f"{context} tokens (at most {self._max_text_chars} characters)")
            if len(text) > INLINE_TOKENIZE_CHARS:  # keep the event loop (other streams) moving
                ids = await asyncio.to_thread(encode_text, self.tokenizer, text)
            else:
                ids = encode_text(self.tokenizer, text)
            if not ids:
                raise invalid("prompt.text: tokenizes to no tokens")
            check_fits(len(ids))
            return ids
        if kind == "token_ids":
            field = request.token_ids.ids
            if not field:
                raise invalid("prompt.token_ids: must not be empty")
            check_fits(len(field))  # before copying or scanning: bounded by the context below
            ids = list(field)
            vocab = self._info.vocab_size
            for pos, token in enumerate(ids):
                if not 0 <= token < vocab:
                    raise invalid(
                        f"prompt.token_ids: id {token} at position {pos} is outside the "
                        f"vocabulary [0, {vocab})"
                    )
            return ids
        if kind == "chat":
            ids = await self._chat_prompt(request.chat.messages)
            check_fits(len(ids))
            return ids
        raise invalid("prompt: must not be empty (set text, token_ids or chat)")

    async def _chat_prompt(self, messages) -> list[int]:
        if not messages:
            raise invalid("prompt.chat.messages: must not be empty")
        chars = sum(len(m.content) + len(m.role) for m in messages)
        if self._max_text_chars is not None and chars > self._max_text_chars:
            raise invalid(f"prompt.chat: {chars} characters cannot fit the context of "
                          f"{self._info.max_seq_len} tokens")
        for i, m in enumerate(messages):
            if not m.role:
                raise invalid(f"prompt.chat.messages[{i}].role: must not be empty")
        turns = [{"role": m.role, "content": m.content} for m in messages]
        try:  # a template renders on a worker thread: long conversations must not stall the loop
            ids = await asyncio.to_thread(render_chat, self.tokenizer, turns)
        except ValueError as exc:  # NoChatTemplate, or the template refused the messages
            raise invalid(f"prompt.chat: {_clip(str(exc))}") from None
        if not ids:
            raise invalid("prompt.chat: renders to no tokens")
        return ids

    def _sampling(self, msg: pb.SamplingParameters) -> SamplingParams:
        limit = self.config.max_new_tokens_limit
        max_new = msg.max_new_tokens if msg.HasField("max_new_tokens") else self.default_max_new_tokens
        if not 0 < max_new <= limit:
            raise invalid(f"sampling.max_new_tokens: must be in [1, {limit}], got {max_new}")
        if not math.isfinite(msg.temperature) or msg.temperature < 0:
            raise invalid(f"sampling.temperature: must be a finite number >= 0, got {msg.temperature}")
        if any(not s for s in msg.stop):
            raise invalid("sampling.stop: stop sequences must not be empty strings")
        if len(msg.stop) > MAX_STOP_SEQUENCES:
            raise invalid(f"sampling.stop: at most {MAX_STOP_SEQUENCES} stop sequences, got {len(msg.stop)}")
        if any(len(s) > MAX_STOP_CHARS for s in msg.stop):
            raise invalid(f"sampling.stop: each stop sequence must be at most {MAX_STOP_CHARS} characters")
        params = SamplingParams(
            temperature=msg.temperature,
            top_k=msg.top_k,
            top_p=msg.top_p if msg.HasField("top_p") else 1.0,
            max_new_tokens=max_new,
            stop=tuple(msg.stop),
            seed=msg.seed if msg.HasField("seed") else None,
        )
        try:
            params.validate()
        except ValueError as exc:  # its messages start with the field name
            raise invalid(f"sampling.{exc}") from None
        return params


def _max_request_bytes(context: int, max_text_chars: int | None) -> int | None:
    """The largest body a request that can be served may have: a prompt filling the
    context (10 bytes per token id at most, or 4 per character of the longest text
    that can fit), the longest stop list, id and drafter name, and room for the
    scalars; never below ``PARSE_ALWAYS_BYTES``, which parse in a few ms (so such bodies
    still get an error naming their field). The server refuses larger bodies unparsed:
    decoding a 4 MiB message of token ids takes ~90 ms and holds the GIL, and the
    event loop with it (None: no text bound, so no such limit)."""
    if max_text_chars is None:
        return None
    prompt = max(10 * context, 4 * max_text_chars)
    stops = MAX_STOP_SEQUENCES * (4 * MAX_STOP_CHARS + 3)
    return max(PARSE_ALWAYS_BYTES, prompt + stops + 4 * (MAX_REQUEST_ID_CHARS + MAX_NAME_CHARS) + 1024)


def _clip(value: str) -> str:
    """A client's value as an error may echo it: never unbounded."""
    return value if len(value) <= MAX_NAME_CHARS else value[:MAX_NAME_CHARS] + "…"


def _fill_stats(stats: pb.SpeculationStats, s: RequestStats | None) -> None:
    if s is None:
        return
    stats.drafted = s.drafted
    stats.accepted = s.accepted
    stats.rounds = s.rounds
    stats.mean_acceptance_length = s.mean_acceptance_length
    for name, rounds in s.drafters.items():
        stats.drafters[name] = int(rounds)
    for name, accepted in s.accepted_by.items():
        stats.accepted_by[name] = int(accepted)
    stats.domain = s.domain or ""
