"""Small-LM drafter: a Llama-family checkpoint proposing a chain of tokens per request.

Where it sits: each speculation round the engine (or this drafter's Ray actor) calls
``propose`` for a batch of requests; the drafter catches its KV cache up with the
committed-token delta, then decodes ``num_draft_tokens`` tokens autoregressively,
all requests of the batch together (ragged, through ``LlamaRunner``).

Greedy requests get argmax drafts. Sampled requests get drafts drawn from the
drafter's processed distribution q (same temperature/top-k/top-p as the target)
with the *same position-keyed noise* the verifier uses for p (``keyed_choice`` in
``core/sampling.py``): where q is close to p the drafter picks the very token the
target will, so drafts are accepted about as often as with the rejection rule, and
the verifier needs no q (nothing but token ids travels). The output never depends
on the drafts: it is the target's keyed choice at every position.

Cache reuse: tokens the drafter itself proposed and the verifier accepted are
already in its cache; only the part of the committed delta it has not seen (at
least the verifier's recovered/bonus token) is fed again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from specfleet.core.sampling import draw_seed, keyed_choice, processed_probs
from specfleet.core.types import DraftProposal, DraftRequest
from specfleet.drafters.base import Drafter
from specfleet.models.llama_runner import ForwardItem, LlamaRunner


@dataclass
class _State:
    committed: list[int] = field(default_factory=list)  # the committed sequence as last told
    cached: list[int] = field(default_factory=list)  # tokens whose K/V are in the runner
    seed: int | None = None  # the request's sampling seed (sampled requests)


class ModelDrafter(Drafter):
    can_sample = True
    #: attach each sampled node's q to the proposal (only a rejection-rule verifier
    #: uses it; the keyed rule does not, so by default nothing but ids travels)
    ships_q = False

    def __init__(self, runner: LlamaRunner, *, name: str = "model", max_draft_tokens: int = 8):
        self.runner = runner
        self.name = name
        self.max_draft_tokens = max_draft_tokens
        self._states: dict[str, _State] = {}

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        windows, feeds = {}, []
        for req in requests:
            state = self._catch_up(req)
            window = min(req.num_draft_tokens, self.max_draft_tokens)
            if window <= 0:
                continue
            # Feed what the cache lacks; always at least the last committed token,
            # whose logits give the first draft.
            # Below req.position both lists hold the same committed tokens.
            common = _common_prefix(state.cached, state.committed, min(req.position, len(state.cached)))
            common = min(common, len(state.committed) - 1)
            self.runner.truncate(req.request_id, common)
            state.cached = state.committed[:common]
            feed = state.committed[common:]
            feeds.append(ForwardItem(req.request_id, feed, logit_rows=[len(feed) - 1]))
            state.cached = state.cached + feed
            windows[req.request_id] = window
            if not req.sampling.greedy and state.seed is None:
                # Engines seed every sampled request at the edge; without one, these
                # drafts cannot match the verifier's noise, which costs speed only.
                state.seed = draw_seed() if req.sampling.seed is None else req.sampling.seed

        by_id = {req.request_id: req for req in requests}
        drafts: dict[str, list[int]] = {rid: [] for rid in windows}
        confidences: dict[str, list[float]] = {rid: [] for rid in windows}
        qs: dict[str, list[np.ndarray]] = {rid: [] for rid in windows}
        items = feeds
        while items:
            logits = self.runner.forward(items)
            next_items = []
            for item, row in zip(items, logits):
                rid = item.request_id
                sampling = by_id[rid].sampling
                state = self._states[rid]
                if sampling.greedy:
                    probs = torch.softmax(row[-1], dim=-1)
                    token = int(torch.argmax(row[-1]))
                else:
                    probs = processed_probs(row[-1], sampling.temperature, sampling.top_k, sampling.top_p)
                    # The draft's absolute position: committed length + drafts so far.
                    token = self.draw(probs, state.seed, len(state.committed) + len(drafts[rid]))
                    if self.ships_q:
                        qs[rid].append(probs.numpy())
                drafts[rid].append(token)
                confidences[rid].append(float(probs[token]))
                if len(drafts[rid]) < windows[rid]:
                    next_items.append(ForwardItem(rid, [token]))
                    self._states[rid].cached.append(token)
            items = next_items

        proposals = []
        for req in requests:
            rid = req.request_id
            if rid not in drafts:
                proposals.append(DraftProposal.empty(rid, self.name))
                continue
            tokens = drafts[rid]
            proposals.append(
                DraftProposal(
                    request_id=rid,
                    tokens=tokens,
                    parents=DraftProposal.chain_parents(len(tokens)),
                    confidences=confidences[rid],
                    draft_probs=np.stack(qs[rid]) if qs[rid] else None,
                    drafter=self.name,
                )
            )
        return proposals

    def draw(self, probs: torch.Tensor, seed: int, position: int) -> int:
        """A sampled request's draft token at absolute ``position``."""
        return keyed_choice(probs, seed, position)

    def _catch_up(self, req: DraftRequest) -> _State:
        state = self._states.get(req.request_id)
        if state is None:
            if req.position != 0:
                raise ValueError(
                    f"{self.name}: request {req.request_id!r} is unknown but starts at "
                    f"position {req.position}; send the whole sequence first"
                )
            state = self._states[req.request_id] = _State()
            self.runner.allocate(req.request_id)
        if req.position > len(state.committed):
            raise ValueError(
                f"{self.name}: request {req.request_id!r} position {req.position} is beyond "
                f"the {len(state.committed)} tokens this drafter holds"
            )
        state.committed = state.committed[: req.position] + list(req.new_tokens)
        return state

    def rollback(self, request_id: str, length: int) -> None:
        state = self._states.get(request_id)
        if state is None:
            return
        state.committed = state.committed[:length]
        keep = min(length, len(state.cached))
        state.cached = state.cached[:keep]
        self.runner.truncate(request_id, keep)

    def release(self, request_id: str) -> None:
        if self._states.pop(request_id, None) is not None:
            self.runner.free(request_id)


def _common_prefix(a: list[int], b: list[int], start: int = 0) -> int:
    n = min(len(a), len(b))
    for i in range(start, n):
        if a[i] != b[i]:
            return i
    return n
