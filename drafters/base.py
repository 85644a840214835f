"""The ``Drafter`` interface every drafter implements.

Where it sits: the engine (in-process) or a drafter Ray actor (distributed) calls
``propose`` once per speculation round for a batch of requests; the verifier then
checks the proposals. A drafter keeps its own per-request state (a KV cache, an
n-gram index) keyed by request id, so only committed-token deltas travel.

Contract:
- ``propose`` gets one ``DraftRequest`` per request. The drafter first truncates its
  state for that request to ``request.position`` committed tokens (rolling back
  whatever speculative state the last round left), appends ``request.new_tokens``,
  and proposes up to ``request.num_draft_tokens`` tokens. Proposing fewer, or none,
  is always allowed: verification stays exact whatever is proposed.
- ``rollback(request_id, length)`` truncates the committed view explicitly.
- ``release(request_id)`` frees everything held for the request; unknown ids are ignored.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from specfleet.core.types import DraftProposal, DraftRequest


class Drafter(ABC):
    #: short name used in configs, stats and routing tables
    name: str = "drafter"
    #: False for drafters that only ever make deterministic (one-hot) proposals
    can_sample: bool = False

    @abstractmethod
    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        """Return one proposal per request, in the same order."""

    @abstractmethod
    def rollback(self, request_id: str, length: int) -> None:
        """Forget every token of ``request_id`` at or after position ``length``."""

    @abstractmethod
    def release(self, request_id: str) -> None:
        """Drop all state for ``request_id``."""

    def observe_output(self, tokens: Sequence[int]) -> None:  # noqa: B027 - optional hook
        """Called with a finished request's full sequence; drafters that learn across
        requests (suffix tree) index it, the others ignore it."""
