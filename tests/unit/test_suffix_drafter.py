"""SuffixTreeDrafter: hand-built sequences with the expected proposals written down,
plus property tests of the tries (counts, suffix links, tails) against brute force."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from specfleet.core.types import ROOT, DraftRequest
from specfleet.drafters.suffix_tree import SuffixTreeDrafter, _RequestState, _SuffixTrie

# Four finished sequences sharing the context 1 2 3: it was followed by 4 twice (then 5
# once, 6 once), by 7 once and by 9 once.
BRANCHING = [[1, 2, 3, 4, 5], [1, 2, 3, 4, 6], [1, 2, 3, 7, 8], [1, 2, 3, 9, 10]]


def propose_one(drafter, rid, position, new_tokens, window=8):
    (p,) = drafter.propose([DraftRequest(rid, position, list(new_tokens), window)])
    check_proposal(p, rid, drafter.name, window)
    return p


def check_proposal(p, rid, name, window):
    assert p.request_id == rid and p.drafter == name
    assert p.draft_probs is None
    assert len(p.tokens) == len(p.parents) == len(p.confidences) <= window
    for i, parent in enumerate(p.parents):
        assert parent == ROOT or 0 <= parent < i  # parents precede children
    assert all(0.0 < c <= 1.0 for c in p.confidences)
    siblings = Counter((parent, tok) for parent, tok in zip(p.parents, p.tokens))
    assert max(siblings.values(), default=1) == 1  # no duplicate child under one parent


def test_proposes_from_the_requests_own_history():
    d = SuffixTreeDrafter()
    p = propose_one(d, "r", 0, [1, 2, 3, 4, 5, 1, 2, 3])
    # Longest earlier match: 1 2 3 (ending at 3); its one occurrence continued with
    # 4 5 1 2 3, then reaches the end of what has been committed.
    assert p.tokens == [4, 5, 1, 2, 3]
    assert p.parents == [ROOT, 0, 1, 2, 3]
    assert p.confidences == [1.0] * 5
    assert propose_one(d, "fresh", 0, [1, 2, 3, 4]).tokens == []  # nothing repeats


def test_empirical_probabilities_and_threshold_on_own_history():
    # The context 8 was followed by 1 twice and by 2 once.
    tokens = [8, 1, 5, 8, 1, 6, 8, 2, 7, 8]
    p = propose_one(SuffixTreeDrafter(min_probability=0.5), "r", 0, tokens, 3)
    assert p.tokens == [1]  # path 2/3, then 5 or 6 at 1/2: path 1/3 < 0.5
    assert p.confidences == [pytest.approx(2 / 3)]
    p = propose_one(SuffixTreeDrafter(min_probability=0.1), "r", 0, tokens, 3)
    assert p.tokens == [1, 5, 8]  # 5 and 6 tie: the first seen wins
    assert p.confidences == [pytest.approx(2 / 3), 0.5, 1.0]


def test_global_trie_gives_a_second_request_long_proposals():
    d = SuffixTreeDrafter()
    content = list(range(100, 140))
    assert propose_one(d, "a", 0, content[:6]).tokens == []
    d.observe_output(content)
    d.release("a")
    p = propose_one(d, "b", 0, content[:6])
    assert p.tokens == content[6:14]
    assert p.confidences == [1.0] * 8
    # Next round: the committed delta is what was accepted plus a bonus token.
    p = propose_one(d, "b", 6, content[6:11])
    assert p.tokens == content[11:19]


def test_threshold_shortens_ambiguous_continuations():
    def drafter(min_probability):
        d = SuffixTreeDrafter(min_probability=min_probability)
        for seq in BRANCHING:
            d.observe_output(seq)
        return d

    # 1 2 3 → 4 with 2/4; then 5 or 6 with 1/2 each: path 1/4.
    p = propose_one(drafter(0.3), "r", 0, [0, 1, 2, 3])
    assert (p.tokens, p.confidences) == ([4], [0.5])
    p = propose_one(drafter(0.2), "r", 0, [0, 1, 2, 3])
    assert (p.tokens, p.confidences) == ([4, 5], [0.5, 0.5])
    assert propose_one(drafter(0.6), "r", 0, [0, 1, 2, 3]).tokens == []


def test_tree_proposals():
    d = SuffixTreeDrafter(min_probability=0.2, tree_width=2)
    for seq in BRANCHING:
        d.observe_output(seq)
    p = propose_one(d, "r", 0, [0, 1, 2, 3])
    # Best-first by path probability: 4 (1/2), 7 (1/4; 9 is not among the top 2),
    # 5 and 6 under 4 (1/4 each), 8 under 7 (1/4 × 1).
    assert p.tokens == [4, 7, 5, 6, 8]
    assert p.parents == [ROOT, ROOT, 0, 0, 1]
    assert p.confidences == [0.5, 0.25, 0.5, 0.5, 1.0]
    # The node budget is the window.
    p = propose_one(d, "s", 0, [0, 1, 2, 3], window=3)
    assert (p.tokens, p.parents) == ([4, 7, 5], [ROOT, ROOT, 0])


def test_longer_match_wins_between_request_and_global():
    d = SuffixTreeDrafter()
    d.observe_output([5, 6, 7, 8, 9, 40, 41])
    # The request's own history matches "7" (followed by 1); the global trie matches
    # "5 6 7" (followed by 8): the longer match wins.
    p = propose_one(d, "r", 0, [7, 1, 5, 6, 7], window=2)
    assert p.tokens == [8, 9]
    # With its own longer match (2 5 6 7 seen before), the request's history wins.
    p = propose_one(d, "s", 0, [2, 5, 6, 7, 3, 2, 5, 6, 7], window=2)
    assert p.tokens == [3, 2]


def test_memory_bound_evicts_oldest_sequences():
    d = SuffixTreeDrafter(max_global_tokens=10)
    d.observe_output([1, 2, 3, 4])
    d.observe_output([5, 6, 7, 8])
    assert d.global_tokens == 8
    assert propose_one(d, "a", 0, [0, 1, 2], 2).tokens == [3, 4]
    d.observe_output([9, 10, 11, 12])  # 12 > 10: the first sequence goes
    assert d.global_tokens == 8
    assert propose_one(d, "b", 0, [0, 1, 2], 2).tokens == []
    assert propose_one(d, "c", 0, [0, 5, 6], 2).tokens == [7, 8]
    # The trie is exactly the one built from what remains.
    rebuilt = SuffixTreeDrafter(max_global_tokens=10)
    rebuilt.observe_output([5, 6, 7, 8])
    rebuilt.observe_output([9, 10, 11, 12])
    assert trie_paths(d._global) == trie_paths(rebuilt._global)
    assert d.global_nodes == rebuilt.global_nodes
    # One sequence longer than the budget keeps its last tokens.
    d.observe_output(list(range(20, 35)))
    assert d.global_tokens == 10
    assert trie_paths(d._global) == window_counts([list(range(25, 35))], d.max_depth)
    SuffixTreeDrafter(max_global_tokens=0).observe_output([1, 2, 3])  # disabled: no-op


def test_rollback_release_and_protocol_errors():
    d = SuffixTreeDrafter()
    assert propose_one(d, "r", 0, [7, 8, 9, 7, 8]).tokens == [9, 7, 8]
    p = propose_one(d, "r", 3, [5])  # rolled back to 7 8 9, then 5
    assert p.tokens == [] and d.held_tokens("r") == 4
    d.rollback("r", 2)
    assert propose_one(d, "r", 2, [9, 7, 8]).tokens == [9, 7, 8]
    d.rollback("r", 99)  # nothing at or after 99: no-op
    d.rollback("unknown", 1)
    with pytest.raises(ValueError, match="'r'"):
        d.rollback("r", -1)
    with pytest.raises(ValueError, match="'r'.*position 9.*holds 5"):
        d.propose([DraftRequest("r", 9, [1], 4)])
    d.release("r")
    d.release("r")
    with pytest.raises(ValueError, match="'r'"):
        d.propose([DraftRequest("r", 5, [1], 4)])
    assert propose_one(d, "r", 0, [1, 1], 0).tokens == []  # zero window: empty
    assert d.held_tokens("r") == 2


def test_batched_requests_stay_independent():
    d = SuffixTreeDrafter()
    pa, pb, pc = d.propose(
        [
            DraftRequest("a", 0, [1, 2, 3, 1, 2], 4),
            DraftRequest("b", 0, [1, 2, 7, 1, 2], 4),
            DraftRequest("c", 0, [1, 2], 4),
        ]
    )
    assert (pa.tokens, pb.tokens, pc.tokens) == ([3, 1, 2], [7, 1, 2], [])


def test_constructor_validation():
    for kwargs in (
        {"max_depth": 1},
        {"min_probability": 1.5},
        {"max_draft_tokens": 0},
        {"max_global_tokens": -1},
        {"tree_width": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            SuffixTreeDrafter(**kwargs)


# ---------------------------------------------------------------- trie properties


def window_counts(sequences, max_depth):
    """Brute force: every prefix of every window, counted."""
    counts = Counter()
    for seq in sequences:
        for s in range(len(seq)):
            for k in range(1, min(max_depth, len(seq) - s) + 1):
                counts[tuple(seq[s : s + k])] += 1
    return dict(counts)


def trie_paths(trie: _SuffixTrie, check: bool = True):
    """Every path of the trie with its count, tails expanded; checks the invariants."""
    out, nodes = {}, {(): trie.root}

    def visit(node, path):
        assert node.cont == sum(c.count for c in node.children.values())
        if node.top is not None:  # the cached most frequent child
            assert node.children[node.top].count == max(c.count for c in node.children.values())
        for token, child in node.children.items():
            p = path + (token,)
            assert child.depth == len(p)
            if child.children is None:  # a tail: one occurrence, continuation in seq
                assert child.count == 1
                out[p] = 1
                cont = child.seq[child.pos : child.pos + trie.tail_length(child)]
                for j in range(len(cont)):
                    out[p + tuple(cont[: j + 1])] = 1
            else:
                assert child.count >= 2 or not check
                out[p] = child.count
                nodes[p] = child
                visit(child, p)

    visit(trie.root, ())
    for path, node in nodes.items():  # suffix links point at path[1:]
        if path:
            assert node.link is nodes[path[1:]]
    assert trie.num_nodes == 1 + sum(1 for _ in _all_nodes(trie.root)), "node accounting"
    return out


def _all_nodes(node):
    for child in node.children.values():
        yield child
        if child.children is not None:
            yield from _all_nodes(child)


def test_request_trie_matches_brute_force_under_appends_and_pops():
    rng = random.Random(7)
    for _ in range(60):
        depth = rng.randint(2, 6)
        state = _RequestState(_SuffixTrie(depth))
        vocab = rng.randint(1, 4)
        tokens: list[int] = []
        for _ in range(25):
            if tokens and rng.random() < 0.35:
                keep = rng.randint(0, len(tokens))
                state.truncate(keep)
                tokens = tokens[:keep]
            else:
                for _ in range(rng.randint(1, 4)):
                    t = rng.randrange(vocab)
                    state.append(t)
                    tokens.append(t)
            assert state.tokens == tokens
            assert trie_paths(state.trie) == window_counts([tokens], depth)
            # tops[i] is the deepest repeated suffix of tokens[: i + 1].
            for i, top in enumerate(state.tops):
                counts = window_counts([tokens[: i + 1]], depth)
                longest = max(
                    (
                        k
                        for k in range(1, min(depth, i + 1) + 1)
                        if counts[tuple(tokens[i + 1 - k : i + 1])] >= 2
                    ),
                    default=0,
                )
                assert top.depth == longest


def test_global_trie_matches_brute_force_under_insert_and_evict():
    rng = random.Random(11)
    for _ in range(20):
        depth = rng.randint(2, 6)
        budget = rng.randint(5, 40)
        d = SuffixTreeDrafter(max_depth=depth, max_global_tokens=budget)
        kept: list[list[int]] = []
        for _ in range(12):
            seq = [rng.randrange(3) for _ in range(rng.randint(1, 12))][-budget:]
            while sum(map(len, kept)) + len(seq) > budget:
                kept.pop(0)
            kept.append(seq)
            d.observe_output(seq)
            assert d.global_tokens == sum(map(len, kept)) <= budget
            assert trie_paths(d._global) == window_counts(kept, depth)


def test_proposals_match_brute_force_statistics():
    """Chains from the global trie follow the most frequent continuation, with
    conditional probabilities equal to brute-force window counts."""
    rng = random.Random(3)
    depth = 6
    d = SuffixTreeDrafter(max_depth=depth, min_probability=0.0, max_draft_tokens=3)
    corpus = [[rng.randrange(3) for _ in range(15)] for _ in range(6)]
    for seq in corpus:
        d.observe_output(seq)
    counts = window_counts(corpus, depth)
    for trial in range(30):
        context = [rng.randrange(3) for _ in range(rng.randint(1, 4))]
        p = propose_one(d, f"q{trial}", 0, [7] + context, 3)  # 7: never in the corpus
        if not p.tokens:
            continue
        # The match is the longest suffix of the context (<= depth - 3 tokens) that
        # some occurrence continued.
        match = next(
            context[-k:]
            for k in range(min(len(context), depth - 3), 0, -1)
            if any(counts.get(tuple(context[-k:]) + (t,), 0) for t in range(3))
        )
        path = tuple(match)
        for token, conf in zip(p.tokens, p.confidences):
            following = {t: counts.get(path + (t,), 0) for t in range(3)}
            assert following[token] == max(following.values())
            assert conf == pytest.approx(following[token] / sum(following.values()))
            path += (token,)
