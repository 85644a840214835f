"""The types between the frontends (gRPC, HTTP) and the engine.

Where it sits: ``router/servicer.py`` turns each RPC into a ``GenerationRequest`` and
consumes ``GenerationChunk``s from a ``GenerationBackend`` — ``EngineBackend``
(``engine/backend.py``) over the in-process or the Ray engine driver; the servicer
never knows which. The scheduler builds a ``GenerationOutput`` when a request ends.
Plain, typed data: it crosses threads, never processes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol

from specfleet.core.stats import RequestStats
from specfleet.core.types import FinishReason, SamplingParams


@dataclass
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    drafter: str | None = None  # preference; None lets the router choose
    speculate: bool = True  # False: plain autoregressive decoding
    max_draft_length: int | None = None  # cap on the window; None = the scheduler's choice


class ErrorCode(str, Enum):
    INVALID_ARGUMENT = "invalid_argument"  # the request cannot be served as asked
    INTERNAL = "internal"  # the engine failed it (logged server-side)
    UNAVAILABLE = "unavailable"  # a worker it needed could not be brought back; retry later


@dataclass(frozen=True)
class ChunkError:
    code: ErrorCode
    message: str  # short, for the client: no tracebacks, paths or node addresses


@dataclass
class GenerationChunk:
    request_id: str
    token_ids: list[int]  # tokens committed since the previous chunk
    finish_reason: FinishReason | None = None  # set on the last chunk only
    stats: RequestStats | None = None  # on the last chunk
    error: ChunkError | None = None  # the request failed (this is its last chunk)
    seed: int | None = None  # on the last chunk of a sampled request: resend it to reproduce


@dataclass
class GenerationOutput:
    """A finished request, as the engine returns it."""

    request_id: str
    prompt: list[int]
    token_ids: list[int]  # generated tokens only
    finish_reason: FinishReason
    stats: RequestStats
    seed: int | None = None  # the sampling seed used (drawn at submit if none was given)
    error: str | None = None  # with FinishReason.ERROR: why this request failed (client-safe)


@dataclass(frozen=True)
class DrafterInfo:
    name: str
    kind: str  # model, ngram, suffix
    domain: str  # configured specialisation


@dataclass(frozen=True)
class VerifierGroupInfo:
    index: int  # the group's number (stats label, ``RequestStats.verifier_group``)
    tp_size: int
    device: str
    dtype: str


@dataclass
class BackendInfo:
    target: str
    tokenizer: str
    vocab_size: int
    max_seq_len: int
    drafters: list[DrafterInfo] = field(default_factory=list)
    verifier_groups: list[VerifierGroupInfo] = field(default_factory=list)


class GenerationBackend(Protocol):
    def info(self) -> BackendInfo: ...

    def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Chunks until one has ``finish_reason`` or ``error``. Closing the iterator
        early (client cancel, deadline) cancels the request and frees its KV caches."""
        ...

    def active_request_ids(self) -> list[str]: ...

    async def close(self) -> None: ...
