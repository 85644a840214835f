"""The few data types that cross component, actor and process boundaries.

A request's path: the router turns an API request into ``SamplingParams``; each
speculation round sends drafters a ``DraftRequest`` (only the committed-token delta
travels, drafters keep their own per-request state), gets back a ``DraftProposal``,
and the verifier answers with a ``VerifyResult``. Everything here is plain Python /
numpy so it pickles cheaply across Ray actors; torch tensors never cross.

Vocabulary (vLLM's): *accepted* draft tokens; the *recovered* token sampled at the
first rejection; the *bonus* token sampled when every draft token passed. Mean
acceptance length counts the recovered/bonus token, so it is >= 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import Enum

import numpy as np

ROOT = -1  # parent index of a draft token that follows the last committed token


class FinishReason(str, Enum):
    LENGTH = "length"  # max_new_tokens reached
    STOP = "stop"  # a stop sequence matched (it is not part of the output)
    EOS = "eos"  # the target emitted its end-of-sequence token
    CANCELLED = "cancelled"  # the client went away or its deadline expired
    ERROR = "error"  # this request alone failed (``GenerationOutput.error`` says why)


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded. ``temperature == 0`` means greedy."""

    temperature: float = 0.0
    top_k: int = 0  # 0 disables top-k
    top_p: float = 1.0  # 1.0 disables nucleus filtering
    max_new_tokens: int = 64
    stop: tuple[str, ...] = ()  # stop sequences, matched on decoded text
    # Sampling seed (uint64): the same (prompt, parameters, seed) gives the same tokens,
    # with or without speculation. None: one is drawn at submit and returned.
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks decode a fixed length

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise ValueError naming the field for anything the engine cannot honour."""
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature: must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k: must be >= 0 (0 disables it), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0) or not math.isfinite(self.top_p):
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens: must be > 0, got {self.max_new_tokens}")
        if self.seed is not None and not 0 <= self.seed < 2**64:
            raise ValueError(f"seed: must be in [0, 2**64), got {self.seed}")


@dataclass
class DraftRequest:
    """One request's part of a drafting call.

    ``new_tokens`` are the tokens committed since this drafter last saw the request
    (the whole prompt on the first call). ``position`` is where they start in the
    committed sequence: a drafter first truncates its own state to ``position``
    (this is how rejected speculative state is rolled back, gpt-fast style) and
    then appends them.
    """

    request_id: str
    position: int  # length of the committed sequence before new_tokens
    new_tokens: list[int]  # committed-token delta
    num_draft_tokens: int  # how many tokens to propose (the window); 0 = none
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class DraftProposal:
    """A drafter's proposal for one request: a chain or a small token tree.

    Node i proposes ``tokens[i]`` as the child of node ``parents[i]`` (``ROOT`` for a
    child of the last committed token). Parents always precede children. A chain of
    n tokens has parents ``[-1, 0, 1, ..., n-2]``.
    """

    request_id: str
    tokens: list[int]  # [N]
    parents: list[int]  # [N], ROOT or an index < i
    confidences: list[float]  # [N], the drafter's probability of each token (for routing/fusion)
    # [N, V] float32, only when the draft was *sampled*: the drafter's processed
    # distribution that node i was drawn from. None means every node is deterministic
    # (one-hot q); an all-NaN row marks one deterministic node in a mixed (fused) tree.
    draft_probs: np.ndarray | None = None
    drafter: str = ""  # which drafter produced it (stats)
    # Per node, every drafter that proposed it (a fused tree, ``policy/fusion.py``);
    # None: all of them are ``drafter``'s. The verifier credits each drafter with the
    # accepted nodes it proposed, which is what the router learns from.
    sources: list[tuple[str, ...]] | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    def sources_of(self, node: int) -> tuple[str, ...]:
        return self.sources[node] if self.sources is not None else (self.drafter,)

    @staticmethod
    def chain_parents(n: int) -> list[int]:
        return [ROOT] + list(range(n - 1)) if n else []

    @classmethod
    def empty(cls, request_id: str, drafter: str = "") -> DraftProposal:
        return cls(request_id, [], [], [], None, drafter)


@dataclass
class VerifyResult:
    """What the accept rule emitted for one request in one round (the scheduler
    decides how much of it is committed: a stop or the length cap may cut it)."""

    request_id: str
    emitted: list[int]  # accepted draft tokens then one recovered/bonus token; [] if not verified
    num_accepted: int  # draft tokens accepted (excludes the recovered/bonus token)
    num_drafted: int  # draft tokens proposed along the longest path considered
    accepted_nodes: list[int]  # indices into the proposal's nodes, root to leaf
    forward_ns: int = 0  # time of the target forward pass this round (shared by the batch)
    queue_ns: int = 0  # time since the request's previous verification
    # Set when verifying this request alone failed (the rest of the batch is unaffected):
    # a short, client-safe reason; nothing was emitted.
    error: str | None = None
    # drafter → (tokens it drafted on its deepest path, how many of them were accepted):
    # one entry per drafter whose nodes were in the proposal (several for a fused tree).
    credit: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def unverified(cls, request_id: str) -> VerifyResult:
        """The result of a request the verifier could not check this round."""
        return cls(request_id, [], 0, 0, [])
