"""NgramDrafter: hand-built sequences with the expected proposals written down, plus
a property test of the incremental index against a brute-force scan."""

from __future__ import annotations

import random

import pytest

from specfleet.core.types import ROOT, DraftProposal, DraftRequest
from specfleet.drafters.ngram import NgramDrafter, _NgramIndex


def propose_one(drafter, rid, position, new_tokens, window=8):
    (proposal,) = drafter.propose([DraftRequest(rid, position, list(new_tokens), window)])
    assert proposal.request_id == rid
    assert proposal.drafter == drafter.name
    assert proposal.draft_probs is None
    assert proposal.parents == DraftProposal.chain_parents(len(proposal.tokens))
    assert len(proposal.confidences) == len(proposal.tokens)
    assert all(0.0 < c <= 1.0 for c in proposal.confidences)
    return proposal


def brute_force(tokens, window, max_n, min_n):
    """Rescan the whole sequence: the most recent earlier occurrence of the longest
    matching n-gram, its continuation copied (cyclically past the end)."""
    length = len(tokens)
    for n in range(max_n, min_n - 1, -1):
        if length <= n:
            continue
        suffix = tokens[length - n :]
        for end in range(length - 1, n - 1, -1):
            if tokens[end - n : end] == suffix:
                draft = []
                for j in range(window):
                    p = end + j
                    draft.append(tokens[p] if p < length else draft[p - length])
                return draft
    return []


def test_repeated_pattern_is_proposed():
    d = NgramDrafter()
    p = propose_one(d, "r", 0, [1, 2, 3, 4, 5, 1, 2, 3])
    # (1,2,3) last occurred ending at 3: copy 4 5 1 2 3, then keep repeating the period.
    assert p.tokens == [4, 5, 1, 2, 3, 4, 5, 1]
    assert p.parents == [ROOT, 0, 1, 2, 3, 4, 5, 6]
    assert p.confidences == [1.0] * 8  # one earlier occurrence, it agrees throughout


def test_longest_ngram_preferred():
    tokens = [1, 2, 3, 7, 9, 3, 8, 1, 2, 3]
    # The trigram (1,2,3) was followed by 7; the unigram (3) most recently by 8.
    assert propose_one(NgramDrafter(max_ngram=3), "r", 0, tokens, 1).tokens == [7]
    assert propose_one(NgramDrafter(max_ngram=1), "r", 0, tokens, 1).tokens == [8]
    # A bigram (2,3) is shared by both, its most recent occurrence is followed by 7.
    assert propose_one(NgramDrafter(max_ngram=2), "r", 0, tokens, 1).tokens == [7]


def test_most_recent_occurrence_and_confidences():
    d = NgramDrafter()
    p = propose_one(d, "r", 0, [5, 1, 7, 5, 1, 8, 5, 1], window=3)
    # (5,1) occurred twice before: followed by 7, then by 8 (most recent wins).
    assert p.tokens == [8, 5, 1]
    # Token 8: one of the two earlier occurrences continued with 8 → 1/2. After
    # (5,1,8) only the source occurrence remains → 1.
    assert p.confidences == [0.5, 1.0, 1.0]


def test_min_ngram_limits_fallback():
    tokens = [4, 9, 6, 1, 2, 3, 9]  # only the unigram (9) matches
    assert propose_one(NgramDrafter(min_ngram=1), "r", 0, tokens, 2).tokens == [6, 1]
    assert propose_one(NgramDrafter(min_ngram=2), "r", 0, tokens, 2).tokens == []


def test_no_match_is_empty():
    d = NgramDrafter()
    p = propose_one(d, "r", 0, [1, 2, 3, 4])
    assert p.tokens == [] and p.parents == [] and p.confidences == []
    assert propose_one(d, "empty", 0, []).tokens == []


def test_window_cap():
    tokens = [1, 2, 3, 4, 5, 6, 1, 2]
    assert propose_one(NgramDrafter(), "r", 0, tokens, window=3).tokens == [3, 4, 5]
    assert propose_one(NgramDrafter(max_draft_tokens=2), "r", 0, tokens, 8).tokens == [3, 4]


def test_zero_window_is_empty_but_state_advances():
    d = NgramDrafter()
    assert propose_one(d, "r", 0, [1, 2, 3, 1], window=0).tokens == []
    assert d.held_tokens("r") == 4
    assert propose_one(d, "r", 4, [2], window=2).tokens == [3, 1]


def test_rollback_via_position_truncation():
    d = NgramDrafter()
    assert propose_one(d, "r", 0, [7, 8, 9, 7, 8]).tokens[:3] == [9, 7, 8]
    # The engine rolls back to 3 committed tokens and appends a different one.
    p = propose_one(d, "r", 3, [5])
    assert d.held_tokens("r") == 4
    assert p.tokens == []  # (9,5), (5): never seen before
    # The index holds no stale n-gram of the removed tokens.
    fresh = _NgramIndex(1, 3)
    for t in [7, 8, 9, 5]:
        fresh.append(t)
    assert d._requests["r"].ends == fresh.ends


def test_explicit_rollback():
    d = NgramDrafter()
    propose_one(d, "r", 0, [1, 2, 3, 4, 1, 2, 3, 9])
    d.rollback("r", 7)
    assert d.held_tokens("r") == 7
    assert propose_one(d, "r", 7, []).tokens[:2] == [4, 1]
    d.rollback("r", 100)  # nothing at or after 100: no-op
    assert d.held_tokens("r") == 7
    d.rollback("unknown", 3)  # ignored
    with pytest.raises(ValueError, match="'r'"):
        d.rollback("r", -1)


def test_release_and_protocol_errors():
    d = NgramDrafter()
    propose_one(d, "r", 0, [1, 2, 1])
    with pytest.raises(ValueError, match="'r'.*position 5.*holds 3"):
        d.propose([DraftRequest("r", 5, [1], 4)])
    d.release("r")
    d.release("r")  # unknown now: ignored
    assert d.held_tokens("r") == 0
    with pytest.raises(ValueError, match="'r'"):
        d.propose([DraftRequest("r", 3, [2], 4)])
    with pytest.raises(ValueError, match="'new'"):
        d.propose([DraftRequest("new", 1, [2], 4)])
    assert propose_one(d, "r", 0, [4, 5, 4]).tokens[:1] == [5]  # fresh start works


def test_batched_requests_stay_independent():
    d = NgramDrafter()
    batch = [
        DraftRequest("a", 0, [1, 2, 3, 1, 2], 4),
        DraftRequest("b", 0, [1, 2, 7, 1, 2], 4),
        DraftRequest("c", 0, [1, 2], 4),
    ]
    pa, pb, pc = d.propose(batch)
    assert [p.request_id for p in (pa, pb, pc)] == ["a", "b", "c"]
    assert pa.tokens == [3, 1, 2, 3]
    assert pb.tokens == [7, 1, 2, 7]
    assert pc.tokens == []  # "c" does not see the others' history
    pa, pb = d.propose([DraftRequest("a", 5, [3, 4], 2), DraftRequest("b", 3, [9], 2)])
    assert pa.tokens == []  # a: 1 2 3 1 2 3 4 — (3,4) and (4) are new
    assert pb.tokens == []  # b: 1 2 7 9
    assert d.held_tokens("a") == 7 and d.held_tokens("b") == 4


def test_constructor_validation():
    with pytest.raises(ValueError, match="min_ngram"):
        NgramDrafter(min_ngram=0)
    with pytest.raises(ValueError, match="max_ngram"):
        NgramDrafter(max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError, match="max_draft_tokens"):
        NgramDrafter(max_draft_tokens=0)


def test_incremental_index_equals_brute_force_scan():
    rng = random.Random(1234)
    for trial in range(40):
        max_n = rng.randint(1, 4)
        min_n = rng.randint(1, max_n)
        d = NgramDrafter(max_ngram=max_n, min_ngram=min_n)
        rid = f"r{trial}"
        tokens: list[int] = []
        vocab = rng.randint(2, 6)  # small vocabularies repeat n-grams often
        for _ in range(30):
            position = rng.randint(max(0, len(tokens) - 6), len(tokens))
            if rng.random() < 0.3:  # an explicit rollback before the next call
                d.rollback(rid, position)
            new = [rng.randrange(vocab) for _ in range(rng.randint(0, 5))]
            tokens = tokens[:position] + new
            window = rng.randint(0, 10)
            (p,) = d.propose([DraftRequest(rid, position, new, window)])
            assert p.tokens == brute_force(tokens, min(window, 8), max_n, min_n)
        # The repaired index is exactly the one a single pass would build.
        fresh = _NgramIndex(min_n, max_n)
        for t in tokens:
            fresh.append(t)
        assert d._requests[rid].tokens == tokens
        assert d._requests[rid].ends == fresh.ends
