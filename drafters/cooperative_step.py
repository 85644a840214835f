"""CoSine's per-step cooperation: several drafters agree on every draft token in turn.

Where it sits: an in-process ``Drafter`` (configured like any other, so the scheduler
and verifier see one drafter) made of member drafters — usually small model drafters
of different specialities. Each draft step asks every member for its next token given
the chain so far, keeps the most confident one (confidence × the member's weight) and
feeds it back to all members before the next step; the chain it returns credits every
member that proposed a kept token (``DraftProposal.sources``).

Against the tree fusion of ``policy/fusion.py`` (members draft whole windows in
parallel, the verifier merges them): per-step cooperation keeps one chain whose every
token is the members' best, but costs ``window × members`` sequential one-token calls
instead of ``members`` parallel window calls — cheap in one process, a round trip per
call between Ray actors. ``benchmarks/cooperation_bench.py`` measures which pays.

Members use the position contract as the engine does: a member is told the chosen
tokens as if committed, and the next round's ``position`` rolls them back. Proposals
are deterministic (greedy chains), which every accept rule checks exactly.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from specfleet.core.types import DraftProposal, DraftRequest
from specfleet.drafters.base import Drafter


@dataclass
class _State:
    committed: list[int] = field(default_factory=list)
    told: dict[str, int] = field(default_factory=dict)  # member → tokens of ``context`` it was sent
    context: list[int] = field(default_factory=list)  # committed + this round's chosen drafts


class StepCooperativeDrafter(Drafter):
    can_sample = False

    def __init__(self, members: Mapping[str, Drafter], *, weights: Mapping[str, float] | None = None,
                 name: str = "cooperative", max_draft_tokens: int = 8):
        if len(members) < 2:
            raise ValueError("per-step cooperation needs at least two member drafters")
        self.members = dict(members)
        self.weights = dict(weights or {})
        self.name = name
        self.max_draft_tokens = max_draft_tokens
        self._states: dict[str, _State] = {}
        self.member_wins: Counter = Counter()  # member → draft tokens of its that were kept

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        windows: dict[str, int] = {}
        for req in requests:
            state = self._states.setdefault(req.request_id, _State())
            del state.committed[req.position:]
            state.committed.extend(req.new_tokens)
            state.context = list(state.committed)
            for member in state.told:  # nothing past the committed tokens is valid any more
                state.told[member] = min(state.told[member], len(state.committed))
            windows[req.request_id] = min(req.num_draft_tokens, self.max_draft_tokens)
        chains: dict[str, list[int]] = {rid: [] for rid in windows}
        confidences: dict[str, list[float]] = {rid: [] for rid in windows}
        by_id = {req.request_id: req for req in requests}
        for step in range(max(windows.values(), default=0)):
            active = [rid for rid, w in windows.items() if w > step]
            guesses: dict[str, list[tuple[str, int, float]]] = {rid: [] for rid in active}
            for name, member in self.members.items():
                calls = []
                for rid in active:
                    state = self._states[rid]
                    told = state.told.get(name, 0)
                    calls.append(DraftRequest(rid, told, state.context[told:], 1, by_id[rid].sampling))
                    state.told[name] = len(state.context)
                for rid, proposal in zip(active, member.propose(calls)):
                    if len(proposal):
                        guesses[rid].append((name, proposal.tokens[0], float(proposal.confidences[0])))
            for rid in active:
                if not guesses[rid]:
                    windows[rid] = step  # no member has a guess: the chain ends here
                    continue
                best = max(guesses[rid], key=lambda g: g[2] * self.weights.get(g[0], 1.0))
                token = best[1]
                chains[rid].append(token)
                confidences[rid].append(best[2])
                self.member_wins.update(n for n, t, _ in guesses[rid] if t == token)
                self._states[rid].context.append(token)
        out = []
        for req in requests:
            rid = req.request_id
            tokens = chains.get(rid, [])
            out.append(DraftProposal(rid, tokens, DraftProposal.chain_parents(len(tokens)),
                                     confidences.get(rid, []), None, self.name))
        return out

    def rollback(self, request_id: str, length: int) -> None:
        state = self._states.get(request_id)
        if state is not None:
            del state.committed[length:]

    def release(self, request_id: str) -> None:
        self._states.pop(request_id, None)
        for member in self.members.values():
            member.release(request_id)

    def observe_output(self, tokens: Sequence[int]) -> None:
        for member in self.members.values():
            member.observe_output(tokens)
