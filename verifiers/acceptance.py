"""Lossless acceptance: which draft tokens a request keeps, and the one token after them.

Where it sits: the verifier runs one target forward pass over each request's committed
context plus every node of its ``DraftProposal`` (tree attention), then, per request,
hands that request's logits to ``accept_greedy`` or ``accept_sampled``. Row 0 of
``target_logits`` ``[N+1, V]`` is the target's distribution for a child of the last
committed token (``ROOT``); row ``i + 1`` is its distribution for a child of node ``i``.
The returned ``Acceptance`` names the accepted nodes (the verifier keeps their KV
entries; the rest are overwritten next round) and the tokens to emit. In a
tensor-parallel group only rank 0 calls this and broadcasts the result.

The rule is ARCHITECTURE.md's "Lossless verification", and nothing upstream (routing,
fusion, pipelining, draft length) may change it:

- Greedy: follow the target's argmax down the tree; emit the argmax where no child
  matches (recovered) or where the path ends (bonus).
- Sampled, position-keyed (``accept_keyed``, what the verifier runs): the target's
  token at absolute sequence position ``L`` is ``keyed_choice(p_L, seed, L)``
  (``core/sampling.py``: an exponential race on noise keyed by (seed, L) alone).
  Walk down the tree: a child is accepted iff its token equals the target's keyed
  choice at its depth; at the first node with no such child the keyed choice is
  emitted (recovered), at a leaf it is the bonus. Exactness: given the committed
  prefix up to ``L``, the noise at ``L`` is fresh (it was never used for an earlier
  position) and independent of the prefix, which is a function of the noise at
  positions ``< L`` only; so the token at ``L`` is distributed as ``p_L`` given the
  prefix, exactly the target's own sampling. Drafts only decide how many positions
  one forward pass settles, never which token wins, so the output is the same
  function of (prompt, parameters, seed) with or without speculation, whatever
  drafter, window, batch, group or restart served it. One-hot drafts are accepted
  with probability ``p(x)`` (the race picks ``x`` that often); a sampling drafter
  that draws with the same keyed noise on its ``q`` matches the target with
  probability at least ``(1 - TV) / (1 + TV)`` (drafter-invariant coupling).
- Sampled, rejection rule (``accept_sampled``, kept as the reference the coupled rule
  is measured against; no request path uses it): SpecInfer multi-step speculative
  sampling. At each node, with ``p`` the
  target's processed distribution, test the children in index order: a child drawn
  from ``q`` is accepted with probability ``min(1, p(x) / q(x))``, and a rejection
  replaces ``p`` by ``norm(max(0, p - q))``. A deterministic child (greedy drafter,
  n-gram, suffix tree, fused tree) has a one-hot ``q``: accepted with probability
  ``p(x)``, and a rejection zeroes ``p(x)``. If no child passes, the recovered token is
  sampled from what is left of ``p``; a node without children gives the bonus token
  from ``p``. The output is then distributed exactly as the target's own sampling.

Vocabulary is vLLM's: *accepted* draft tokens, the *recovered* token at the first
rejection, the *bonus* token when the path ran out of draft.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from specfleet.core.sampling import keyed_choice, processed_probs, sample
from specfleet.core.types import ROOT, SamplingParams

# Per-node draft distributions for ``accept_sampled``; see its docstring.
DraftProbs = torch.Tensor | Sequence[torch.Tensor | None] | None


@dataclass
class Acceptance:
    """The outcome of verifying one request's proposal in one round."""

    # Proposal node indices, root to leaf, each a child of the one before. The verifier
    # keeps exactly these nodes' KV entries.
    accepted_nodes: list[int]
    # Tokens of accepted_nodes, then one recovered/bonus token from the target, so a
    # round always makes progress: len(emitted) == len(accepted_nodes) + 1.
    emitted: list[int]


def tree_children(parents: Sequence[int]) -> list[list[int]]:
    """Children of every logits row: ``result[0]`` is the root's, ``result[i + 1]`` node i's.

    Indexed like ``target_logits`` rows so callers never translate between the two.
    Children are listed in node-index order, the order in which they are tested.
    Raises ValueError unless each parent is ``ROOT`` or an earlier node.
    """
    children: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for node, parent in enumerate(parents):
        if not (parent == ROOT or 0 <= parent < node):
            raise ValueError(
                f"parents[{node}] = {parent}: must be ROOT ({ROOT}) or an earlier node index"
            )
        children[parent + 1].append(node)
    return children


def walk_tree(
    tokens: Sequence[int],
    children: Sequence[Sequence[int]],
    choose: Callable[[int, int], int],
) -> Acceptance:
    """The walk every deterministic accept rule shares: from the root, ``choose(row,
    depth)`` names the token the target emits at logits row ``row`` (``node + 1``) and
    tree depth ``depth``; the first child (in index order) carrying it is accepted and
    the walk goes on from there, else the chosen token is emitted and the walk stops.
    ``children[row]`` lists the child nodes of row ``row`` (ROOT's at row 0)."""
    accepted: list[int] = []
    emitted: list[int] = []
    node = ROOT
    while True:
        choice = choose(node + 1, len(emitted))
        emitted.append(choice)
        match = next((c for c in children[node + 1] if tokens[c] == choice), None)
        if match is None:
            return Acceptance(accepted, emitted)
        accepted.append(match)
        node = match


def accept_greedy(
    target_logits: torch.Tensor, tokens: Sequence[int], parents: Sequence[int]
) -> Acceptance:
    """Greedy verification: keep the draft path the target's argmax follows.

    ``target_logits``: ``[N+1, V]``; ``tokens``, ``parents``: ``[N]`` (``DraftProposal``
    fields). From the root, ``t = argmax(row)``; the first child (in index order) whose
    token is ``t`` is accepted and the walk continues from it; otherwise ``t`` is
    emitted and the walk stops. Argmax ties go to the lowest token id (``torch.argmax``
    returns the first maximal index), which is what the target's own greedy decoding
    does, so the output matches it token for token.
    """
    children = _validated_children(target_logits, tokens, parents)
    # One device->host copy for every row: the walk itself is a few list lookups.
    argmax = target_logits.argmax(dim=-1).tolist()  # [N+1]
    return walk_tree(tokens, children, lambda row, depth: argmax[row])


def accept_keyed(
    target_logits: torch.Tensor,
    tokens: Sequence[int],
    parents: Sequence[int],
    sampling: SamplingParams,
    seed: int,
    position: int,
) -> Acceptance:
    """Position-keyed sampled verification (see the module docstring).

    ``target_logits``: ``[N+1, V]`` raw target logits, processed here with the
    request's temperature/top_k/top_p; ``position``: the absolute sequence index of
    the first token this round emits (the committed length). Node ``i`` at depth
    ``d`` (a child of ROOT has depth 0) is accepted iff it is the first child, in
    index order, whose token equals ``keyed_choice(p, seed, position + d)``.
    """
    if sampling.greedy:
        raise ValueError("sampling.temperature is 0: greedy requests use accept_greedy")
    children = _validated_children(target_logits, tokens, parents)

    def choose(row: int, depth: int) -> int:
        p = processed_probs(
            target_logits[row], sampling.temperature, sampling.top_k, sampling.top_p
        )  # [V]
        return keyed_choice(p, seed, position + depth)

    return walk_tree(tokens, children, choose)


def accept_sampled(
    target_logits: torch.Tensor,
    tokens: Sequence[int],
    parents: Sequence[int],
    sampling: SamplingParams,
    generator: torch.Generator,
    draft_probs: DraftProbs = None,
) -> Acceptance:
    """Sampled verification (SpecInfer multi-step speculative sampling, see module doc).

    ``target_logits``: ``[N+1, V]`` raw target logits; they are processed here with the
    request's temperature/top_k/top_p via ``processed_probs``.

    ``draft_probs`` says, per node, which distribution ``q`` the node's token was drawn
    from; each ``q`` must be the drafter's *processed* distribution (``processed_probs``
    with the same ``sampling``), so that ``p`` and ``q`` match in kind:

    - ``None``: every node is deterministic (one-hot ``q``).
    - a tensor ``[N, V]`` (``DraftProposal.draft_probs`` as a tensor): row ``i`` is node
      i's ``q``; a row that is entirely NaN marks node i as deterministic, so one array
      can carry a fused tree that mixes sampled and deterministic nodes.
    - a sequence of ``N`` entries, each a ``[V]`` tensor (sampled node) or ``None``
      (deterministic node); all-NaN rows count as ``None`` here too.

    Exactness needs each child's ``q`` to be the distribution it was drawn from *given
    the siblings before it*: independent draws (one or several drafters) just use their
    drafter's ``q``; a deterministic pick may depend on earlier siblings (its ``q`` is
    one-hot whatever it is). Never pass a fused or averaged confidence as ``q``.

    Randomness: one ``torch.rand`` draw from ``generator`` per child tested and one per
    sampled recovered/bonus token, so a fixed seed replays the same output.
    Raises ValueError on a malformed tree, for ``temperature == 0`` (use
    ``accept_greedy``), and when ``q(x) <= 0`` for a sampled child's own token ``x``
    (the drafter could not have produced it: its ``q`` is not the one it sampled from).
    """
    if sampling.greedy:
        raise ValueError("sampling.temperature is 0: greedy requests use accept_greedy")
    children = _validated_children(target_logits, tokens, parents)
    q_rows = _draft_rows(draft_probs, len(tokens), target_logits)

    accepted: list[int] = []
    emitted: list[int] = []
    node = ROOT
    while True:
        p = processed_probs(
            target_logits[node + 1], sampling.temperature, sampling.top_k, sampling.top_p
        )  # [V]
        chosen = None
        for child in children[node + 1]:
            q = q_rows[child]  # [V] or None (one-hot)
            if _passes(p, tokens[child], q, child, generator):
                chosen = child
                break
            p = _residual(p, tokens[child], q)
        if chosen is None:
            # Recovered token after rejecting every child, or bonus token at a leaf.
            emitted.append(sample(p, generator))
            return Acceptance(accepted, emitted)
        accepted.append(chosen)
        emitted.append(tokens[chosen])
        node = chosen


def _passes(
    p: torch.Tensor, token: int, q: torch.Tensor | None, node: int, generator: torch.Generator
) -> bool:
    """One accept test: ``u < p(x) / q(x)`` with ``q(x) = 1`` for a deterministic child.

    ``u`` is always drawn, even when the outcome is certain, so the generator's stream
    does not depend on the probabilities (easier to replay and to reason about).
    """
    # p: [V] float32, the current (possibly residual) target distribution
    u = float(torch.rand((), generator=generator, dtype=torch.float64, device=generator.device))
    if q is None:
        return u < float(p[token])
    p_x, q_x = torch.stack([p[token], q[token]]).tolist()  # one device->host copy
    if not q_x > 0:  # also catches NaN
        raise ValueError(
            f"draft_probs for node {node} gives its own token {token} probability {q_x}: "
            "the drafter could not have sampled it (pass the q it was drawn from)"
        )
    # Division, not u * q_x < p_x: when p_x >= q_x the quotient rounds to >= 1 > u, so a
    # token the target likes at least as much as the drafter is always accepted.
    return u < p_x / q_x


def _residual(p: torch.Tensor, token: int, q: torch.Tensor | None) -> torch.Tensor:
    """The distribution to continue with after rejecting ``token``: ``norm(max(0, p - q))``.

    For a one-hot ``q`` that is ``p`` with ``p(token)`` zeroed and renormalised.
    """
    if q is None:
        residual = p.clone()  # [V]
        residual[token] = 0.0
    else:
        residual = (p - q).clamp_min(0.0)  # [V]
    mass = float(residual.sum())
    if not mass > 0:
        # In exact arithmetic the rejection probability equals this mass, so a rejection
        # with nothing left (p == q, or p one-hot on token) only comes from rounding.
        # Keeping p changes the output by at most that rounding and never divides by 0.
        return p
    return residual / mass


def _validated_children(
    target_logits: torch.Tensor, tokens: Sequence[int], parents: Sequence[int]
) -> list[list[int]]:
    if len(tokens) != len(parents):
        raise ValueError(f"tokens has {len(tokens)} entries but parents has {len(parents)}")
    if target_logits.dim() != 2 or target_logits.shape[0] != len(tokens) + 1:
        raise ValueError(
            f"target_logits: expected shape [N+1, V] = [{len(tokens) + 1}, V], "
            f"got {tuple(target_logits.shape)}"
        )
    vocab = target_logits.shape[1]
    for node, token in enumerate(tokens):
        if not 0 <= token < vocab:
            raise ValueError(f"tokens[{node}] = {token}: outside the vocabulary [0, {vocab})")
    return tree_children(parents)


def _draft_rows(
    draft_probs: DraftProbs, num_nodes: int, target_logits: torch.Tensor
) -> list[torch.Tensor | None]:
    """One ``[V]`` float32 row on the target's device, or None (deterministic), per node.

    Converting once here keeps device copies out of the per-test path. All-NaN rows
    become None; a row with only some NaN is rejected, since it would silently turn
    the residual into NaN.
    """
    vocab = target_logits.shape[1]
    device = target_logits.device
    if draft_probs is None:
        return [None] * num_nodes
    if isinstance(draft_probs, torch.Tensor):
        if tuple(draft_probs.shape) != (num_nodes, vocab):
            raise ValueError(
                f"draft_probs: expected shape [N, V] = [{num_nodes}, {vocab}], "
                f"got {tuple(draft_probs.shape)}"
            )
        stacked = draft_probs.to(device=device, dtype=torch.float32)  # [N, V]
        rows: list[torch.Tensor | None] = list(stacked.unbind(0))
        sampled = list(range(num_nodes))
    else:
        if len(draft_probs) != num_nodes:
            raise ValueError(f"draft_probs: expected {num_nodes} entries, got {len(draft_probs)}")
        rows = []
        for node, row in enumerate(draft_probs):
            if row is not None:
                if tuple(row.shape) != (vocab,):
                    raise ValueError(
                        f"draft_probs[{node}]: expected shape [V] = [{vocab}], "
                        f"got {tuple(row.shape)}"
                    )
                row = row.to(device=device, dtype=torch.float32)
            rows.append(row)
        sampled = [node for node, row in enumerate(rows) if row is not None]
        if not sampled:
            return rows
        stacked = torch.stack([rows[node] for node in sampled])  # [S, V]
    nan = torch.isnan(stacked)  # [S, V]
    all_nan, any_nan = nan.all(dim=1).tolist(), nan.any(dim=1).tolist()  # one host copy
    for node, deterministic, broken in zip(sampled, all_nan, any_nan):
        if deterministic:
            rows[node] = None
        elif broken:
            raise ValueError(
                f"draft_probs[{node}]: contains NaN; an all-NaN row marks a deterministic "
                "node, a partly-NaN row is not a distribution"
            )
    return rows
