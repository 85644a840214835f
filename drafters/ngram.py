"""Prompt-lookup (n-gram) drafter: propose what followed the last n committed tokens
the most recent time they occurred earlier in the same request.

Where it sits: the engine (in-process) or a drafter Ray actor on a plain CPU node
calls ``propose`` once per speculation round with each request's committed-token
delta; the verifier then checks the proposals. No model, no weights: it pays off on
requests that repeat their own context (code edits, extraction, summaries quoting
the prompt, retrieval-augmented answers).

Per request the drafter keeps the committed sequence and an n-gram index over it.
Rollback follows the ``Drafter`` contract: truncate to ``request.position``, then
append ``request.new_tokens``.

Confidences: ``confidences[i]`` is the drafter's conditional probability of draft
token i given the committed sequence and draft tokens 0..i-1, estimated as the
fraction of earlier occurrences of that context (the matched n-gram followed by the
previous draft tokens; the most recent ``_CONFIDENCE_OCCURRENCES`` occurrences of
the n-gram are considered) that continued with token i. This is the same meaning as
the model drafter's ``q(token)`` and the suffix drafter's child/parent count ratio,
so a router can fuse them; the probability that node i is accepted together with all
its ancestors is the product of confidences along the chain.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from specfleet.core.types import DraftProposal, DraftRequest
from specfleet.drafters.base import Drafter

# How many of the most recent earlier occurrences of the matched n-gram vote on the
# confidences. Bounded so a degenerate sequence (one token repeated 1000 times) keeps
# propose() O(window × this) instead of O(window × sequence length).
_CONFIDENCE_OCCURRENCES = 32


@dataclass
class _NgramIndex:
    """One request's committed tokens and, for every n in [min_n, max_n], a map from
    each n-gram to the end positions of its occurrences (ascending).

    An occurrence ending at ``e`` covers ``tokens[e-n:e]``; ``tokens[e]`` is what
    followed it. Why an incremental index rather than rescanning per round: a round
    adds one to a few tokens while sequences reach ~1000+ tokens and propose() runs
    every round for every request, so a rescan costs O(length × max_n) per round and an
    index O(new tokens × max_n). Positions are kept ascending, so the newest occurrence
    is always last: an append pushes, and truncation (rollback) pops exactly the
    entries the removed tokens pushed, from the back, in reverse order — the repair
    costs O(removed tokens × max_n) and never scans the sequence.
    """

    min_n: int
    max_n: int
    tokens: list[int] = field(default_factory=list)
    ends: dict[tuple[int, ...], list[int]] = field(default_factory=dict)

    def append(self, token: int) -> None:
        tokens = self.tokens
        tokens.append(token)
        end = len(tokens)
        for n in range(self.min_n, min(self.max_n, end) + 1):
            key = tuple(tokens[end - n :])
            positions = self.ends.get(key)
            if positions is None:
                self.ends[key] = [end]
            else:
                positions.append(end)

    def truncate(self, length: int) -> None:
        tokens = self.tokens
        while len(tokens) > length:
            end = len(tokens)
            for n in range(self.min_n, min(self.max_n, end) + 1):
                key = tuple(tokens[end - n :])
                positions = self.ends[key]
                positions.pop()  # == end: it is the newest occurrence of this n-gram
                if not positions:
                    del self.ends[key]
            tokens.pop()

    def earlier_ends(self, n: int, limit: int) -> list[int]:
        """End positions of the ``limit`` most recent earlier occurrences of the last
        n tokens, oldest first (the current occurrence, ending at len(tokens), excluded)."""
        if len(self.tokens) <= n:
            return []
        positions = self.ends.get(tuple(self.tokens[-n:]))
        return positions[-limit - 1 : -1] if positions else []


class NgramDrafter(Drafter):
    """Prompt-lookup decoding with an incremental n-gram index per request.

    For n from ``max_ngram`` down to ``min_ngram`` (a longer match is more specific,
    so it is tried first) it finds the most recent earlier occurrence of the last n
    committed tokens and proposes the tokens that followed it, at most
    ``min(request.num_draft_tokens, max_draft_tokens)``. Proposals are chains and
    deterministic (``draft_probs`` is None): verification treats them as one-hot.
    """

    can_sample = False

    def __init__(
        self,
        name: str = "ngram",
        max_ngram: int = 3,
        min_ngram: int = 1,
        max_draft_tokens: int = 8,
    ):
        if min_ngram < 1:
            raise ValueError(f"min_ngram: must be >= 1, got {min_ngram}")
        if max_ngram < min_ngram:
            raise ValueError(f"max_ngram: must be >= min_ngram ({min_ngram}), got {max_ngram}")
        if max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens: must be >= 1, got {max_draft_tokens}")
        self.name = name
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.max_draft_tokens = max_draft_tokens
        self._requests: dict[str, _NgramIndex] = {}

    # ------------------------------------------------------------------ Drafter API

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        proposals = []
        for req in requests:
            index = self._catch_up(req)
            window = min(req.num_draft_tokens, self.max_draft_tokens)
            tokens, confidences = self._lookup(index, window) if window > 0 else ([], [])
            proposals.append(
                DraftProposal(
                    request_id=req.request_id,
                    tokens=tokens,
                    parents=DraftProposal.chain_parents(len(tokens)),
                    confidences=confidences,
                    draft_probs=None,
                    drafter=self.name,
                )
            )
        return proposals

    def rollback(self, request_id: str, length: int) -> None:
        if length < 0:
            raise ValueError(f"{self.name}: rollback of {request_id!r} to negative length {length}")
        index = self._requests.get(request_id)
        if index is not None:  # unknown request: nothing held, nothing to forget
            index.truncate(length)

    def release(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    # ------------------------------------------------------------------ internals

    def held_tokens(self, request_id: str) -> int:
        """Committed tokens held for ``request_id`` (0 if unknown); for tests and stats."""
        index = self._requests.get(request_id)
        return len(index.tokens) if index is not None else 0

    def _catch_up(self, req: DraftRequest) -> _NgramIndex:
        index = self._requests.get(req.request_id)
        held = len(index.tokens) if index is not None else 0
        if req.position > held or req.position < 0:
            # The engine believes this drafter holds more than it does (or sent a
            # nonsense position): proposing from a wrong context would only waste the
            # verifier's time, and hiding it would hide an engine bug.
            raise ValueError(
                f"{self.name}: request {req.request_id!r} starts at position {req.position} "
                f"but this drafter holds {held} tokens for it"
            )
        if index is None:
            index = self._requests[req.request_id] = _NgramIndex(self.min_ngram, self.max_ngram)
        index.truncate(req.position)
        for token in req.new_tokens:
            index.append(int(token))
        return index

    def _lookup(self, index: _NgramIndex, window: int) -> tuple[list[int], list[float]]:
        tokens = index.tokens
        length = len(tokens)
        for n in range(self.max_ngram, self.min_ngram - 1, -1):
            earlier = index.earlier_ends(n, _CONFIDENCE_OCCURRENCES)
            if not earlier:
                continue
            source = earlier[-1]  # the most recent occurrence: recency predicts best
            # Copy what followed. When the copy reaches the end of the committed
            # sequence (the occurrence overlaps it: a period-p repetition), keep
            # copying from the draft itself, i.e. keep repeating the period — exactly
            # what the lookup would propose next round if these drafts were accepted.
            draft: list[int] = []
            for j in range(window):
                p = source + j
                draft.append(tokens[p] if p < length else draft[p - length])
            return draft, _confidences(tokens, earlier[:-1], draft)
        return [], []


def _confidences(tokens: list[int], others: list[int], draft: list[int]) -> list[float]:
    """Per draft token: among the earlier occurrences that agreed with the draft so far,
    the fraction whose next committed token equals it. The source occurrence always
    agrees (the draft is its copy) and counts once; ``others`` are the remaining
    occurrences (end positions). An occurrence whose next token is not committed yet
    has no vote from there on."""
    length = len(tokens)
    confidences = []
    alive = others
    for j, token in enumerate(draft):
        known = [e for e in alive if e + j < length]
        alive = [e for e in known if tokens[e + j] == token]
        confidences.append((len(alive) + 1) / (len(known) + 1))
    return confidences
