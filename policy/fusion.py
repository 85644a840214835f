"""Confidence fusion: several drafters' proposals for one request become one token tree.

Where it sits: the scheduler lets the top few drafters of a request cooperate in a
round and plans a ``FusionPlan`` (who, how much each is trusted, a node budget); the
verifier — where the drafter replies meet, directly from the drafters on Ray — calls
``fuse`` before its forward pass and credits every drafter with the accepted nodes it
proposed (``credit``). Fusion only decides *which tokens are tried*: the accept rule
walks whatever tree it gets and emits the target's own tokens, so no fused tree can
change the output (greedy or keyed sampling alike).

Policy (CoSine's confidence fusion, Goose's spine-and-branches shape):
1. Proposals are merged as a trie: a token proposed after the same prefix by several
   drafters is one node, so agreement costs no extra verify rows.
2. A node's confidence is ``1 - prod(1 - r_d * p_d)`` over the drafters ``d`` that
   proposed it (``p_d``: the drafter's probability of the token, ``r_d``: its learned
   reliability for the request's domain): agreement raises it, a trusted drafter's
   guess outweighs an untrusted one's. A path's confidence is the product down it.
3. Under the node budget the most confident paths are kept: nodes are ranked by path
   confidence (a child never outranks its parent), so the reliable drafter's chain
   becomes the deep spine and disagreeing continuations the shallow siblings.
Everything is plain Python over a few dozen nodes; ties break deterministically
(depth, then the order of the plan's drafters), so a fused tree depends only on the
proposals and the plan.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from specfleet.core.types import ROOT, DraftProposal
from specfleet.core.workers import FusionPlan

# A drafter with no confidence for a token (n-gram, suffix: they return 1.0 or a
# heuristic) still gets a little: a confidence of 0 would drop its nodes entirely.
_MIN_CONFIDENCE = 1e-3


def fuse(request_id: str, proposals: Sequence[DraftProposal], plan: FusionPlan) -> DraftProposal:
    """One tree of at most ``plan.max_nodes`` nodes from every non-empty proposal.

    Nodes keep their provenance in ``sources``; ``confidences`` hold the fused node
    confidences. Drafters missing from the plan are trusted at the lowest planned
    weight. Sampled proposals' ``draft_probs`` are dropped: fused trees are checked
    by the deterministic rules (greedy, position-keyed), which do not use them."""
    order = [name for name, _ in plan.reliability]
    weight: Mapping[str, float] = dict(plan.reliability)
    floor = min(weight.values(), default=1.0)
    rank = {name: i for i, name in enumerate(order)}
    ranked = sorted((p for p in proposals if len(p)), key=lambda p: rank.get(p.drafter, len(rank)))

    # Trie over (parent trie node, token); trie node 0 is the root (the last committed token).
    key_to_node: dict[tuple[int, int], int] = {}
    tokens: list[int] = []
    parents: list[int] = []  # trie index of the parent (0 = root)
    miss: list[float] = []  # prod(1 - r_d * p_d) so far
    sources: list[list[str]] = []
    first_seen: list[tuple[int, int]] = []  # (drafter rank, node index in its proposal): ties
    for pr, proposal in enumerate(ranked):
        r = min(1.0, max(weight.get(proposal.drafter, floor), _MIN_CONFIDENCE))
        mapped: list[int] = []  # proposal node → trie node
        for i, (token, parent) in enumerate(zip(proposal.tokens, proposal.parents)):
            parent_node = 0 if parent == ROOT else mapped[parent]
            node = key_to_node.get((parent_node, token))
            p = proposal.confidences[i] if i < len(proposal.confidences) else 1.0
            p = min(1.0, max(float(p), _MIN_CONFIDENCE))
            if node is None:
                node = len(tokens) + 1
                key_to_node[(parent_node, token)] = node
                tokens.append(token)
                parents.append(parent_node)
                miss.append(1.0)
                sources.append([])
                first_seen.append((pr, i))
            miss[node - 1] *= 1.0 - r * p
            if proposal.drafter not in sources[node - 1]:
                sources[node - 1].append(proposal.drafter)
            mapped.append(node)

    # Path confidence and depth, parents first (trie nodes are created parent first).
    path: list[float] = []
    depth: list[int] = []
    for n in range(len(tokens)):
        conf = 1.0 - miss[n]
        parent = parents[n]
        path.append(conf * (path[parent - 1] if parent else 1.0))
        depth.append(depth[parent - 1] + 1 if parent else 1)
    # A child's path confidence never exceeds its parent's and ties go to the shallower
    # node, so any prefix of this order is a tree.
    order_nodes = sorted(range(len(tokens)), key=lambda n: (-path[n], depth[n], first_seen[n]))
    kept = order_nodes[: max(0, plan.max_nodes)]
    kept.sort(key=lambda n: (depth[n], -path[n], first_seen[n]))  # parents before children
    index = {trie: i for i, trie in enumerate(n + 1 for n in kept)}
    return DraftProposal(
        request_id,
        [tokens[n] for n in kept],
        [ROOT if parents[n] == 0 else index[parents[n]] for n in kept],
        [1.0 - miss[n] for n in kept],
        None,
        ranked[0].drafter if ranked else "",
        [tuple(sources[n]) for n in kept],
    )


def credit(proposal: DraftProposal, accepted_nodes: Sequence[int]) -> dict[str, tuple[int, int]]:
    """drafter → (depth of its deepest node, accepted nodes it proposed) for a verified
    proposal. A drafter's nodes are closed under parents (it proposed every prefix of
    its own path), so what it got accepted is the run of accepted nodes it shares from
    the root."""
    deepest: dict[str, int] = {}
    depth: list[int] = []
    for node, parent in enumerate(proposal.parents):
        d = 1 if parent == ROOT else depth[parent] + 1
        depth.append(d)
        for name in proposal.sources_of(node):
            if d > deepest.get(name, 0):
                deepest[name] = d
    accepted: dict[str, int] = {}
    for name in deepest:
        run = 0
        for node in accepted_nodes:
            if name not in proposal.sources_of(node):
                break
            run += 1
        accepted[name] = run
    return {name: (deepest[name], accepted[name]) for name in deepest}
