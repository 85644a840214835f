"""Confidence fusion (policy/fusion.py) and the verifier's fused path.

Unit cases pin the merge, the budget and the per-drafter credit; a property test
checks every fused tree is a valid, prefix-closed subtree of what was proposed; the
exactness test drives a real verifier round by round with fused trees of a good and a
bad drafter and compares the output with HF greedy decoding of the same target.
"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specfleet.core.types import ROOT, DraftProposal, SamplingParams
from specfleet.core.workers import DraftReply, FusionPlan, VerifyCall
from specfleet.models.llama_runner import LlamaRunner
from specfleet.policy.fusion import credit, fuse
from specfleet.verifiers.verifier import Verifier
from tests.unit.test_engine_exact import hf_greedy, tiny_llama


def chain(drafter: str, tokens: list[int], conf: float = 0.9) -> DraftProposal:
    return DraftProposal("r", tokens, DraftProposal.chain_parents(len(tokens)), [conf] * len(tokens),
                         None, drafter)


def paths(p: DraftProposal) -> set[tuple[int, ...]]:
    """Every root-to-node token path of a proposal."""
    out, prefix = set(), []
    for token, parent in zip(p.tokens, p.parents):
        prefix.append((() if parent == ROOT else prefix[parent]) + (token,))
        out.add(prefix[-1])
    return out


def test_shared_prefixes_merge_and_disagreements_become_siblings():
    plan = FusionPlan((("a", 0.9), ("b", 0.5)), max_nodes=16)
    fused = fuse("r", [chain("a", [5, 6, 7]), chain("b", [5, 6, 9])], plan)
    assert sorted(paths(fused)) == [(5,), (5, 6), (5, 6, 7), (5, 6, 9)]
    assert len(fused) == 4  # the shared prefix is verified once
    by_token = {fused.tokens[i]: fused.sources_of(i) for i in range(len(fused))}
    assert by_token[5] == ("a", "b") and by_token[7] == ("a",) and by_token[9] == ("b",)
    assert fused.drafter == "a"  # the most trusted drafter leads


def test_the_budget_keeps_the_trusted_drafters_spine():
    # Two disagreeing chains, room for three nodes: the trusted chain is kept whole.
    plan = FusionPlan((("good", 0.9), ("bad", 0.2)), max_nodes=3)
    fused = fuse("r", [chain("bad", [1, 2, 3]), chain("good", [4, 5, 6])], plan)
    assert paths(fused) == {(4,), (4, 5), (4, 5, 6)}
    plan = FusionPlan((("good", 0.9), ("bad", 0.2)), max_nodes=4)
    fused = fuse("r", [chain("bad", [1, 2, 3]), chain("good", [4, 5, 6])], plan)
    assert paths(fused) == {(4,), (4, 5), (4, 5, 6), (1,)}  # the other guess as a shallow sibling


def test_agreement_raises_confidence():
    plan = FusionPlan((("a", 0.5), ("b", 0.5)), max_nodes=8)
    fused = fuse("r", [chain("a", [3], 0.5), chain("b", [3], 0.5)], plan)
    assert fused.confidences == [pytest.approx(1 - 0.75 * 0.75)]  # noisy-or of two 0.25s


def test_credit_counts_each_drafters_accepted_run():
    plan = FusionPlan((("a", 0.9), ("b", 0.5)), max_nodes=16)
    fused = fuse("r", [chain("a", [5, 6, 7]), chain("b", [5, 6, 9, 10])], plan)
    accepted = [fused_index(fused, (5,)), fused_index(fused, (5, 6)), fused_index(fused, (5, 6, 9))]
    assert credit(fused, accepted) == {"a": (3, 2), "b": (4, 3)}
    assert credit(chain("a", [1, 2]), [0]) == {"a": (2, 1)}


def fused_index(p: DraftProposal, path: tuple[int, ...]) -> int:
    prefix = []
    for i, (token, parent) in enumerate(zip(p.tokens, p.parents)):
        prefix.append((() if parent == ROOT else prefix[parent]) + (token,))
        if prefix[-1] == path:
            return i
    raise KeyError(path)


@st.composite
def proposals(draw):
    out = []
    for d in range(draw(st.integers(1, 4))):
        n = draw(st.integers(0, 6))
        parents = [ROOT] + [draw(st.integers(ROOT, i - 1)) for i in range(1, n)] if n else []
        tokens = [draw(st.integers(0, 4)) for _ in range(n)]
        confs = [draw(st.floats(0.0, 1.0)) for _ in range(n)]
        out.append(DraftProposal("r", tokens, parents, confs, None, f"d{d}"))
    return out


@settings(max_examples=200, deadline=None, derandomize=True)
@given(proposals(), st.integers(0, 12), st.lists(st.floats(0.01, 1.0), min_size=4, max_size=4))
def test_a_fused_tree_is_a_valid_subtree_of_the_proposals(props, budget, weights):
    plan = FusionPlan(tuple((f"d{i}", w) for i, w in enumerate(weights)), budget)
    fused = fuse("r", props, plan)
    proposed = set().union(*(paths(p) for p in props))
    assert len(fused) <= budget
    assert all(p == ROOT or p < i for i, p in enumerate(fused.parents))  # parents first
    got = paths(fused)
    assert got <= proposed  # nothing invented
    assert len(got) == len(fused)  # siblings are distinct tokens (prefixes merged)
    assert len(fused) == min(budget, len(proposed))  # the budget is used when there is material
    for path in got:
        assert set(fused.sources_of(fused_index(fused, path))) == {
            p.drafter for p in props if path in paths(p)}


def test_fused_verification_equals_hf_greedy_and_beats_each_drafter_alone():
    """A real verifier checks fused trees of a good drafter (the target's own greedy
    continuation, wrong at its third token) and a bad one (right for one token, then
    random; every other round right for three); the output is HF greedy's, and each round accepts what the better of the
    two would have had accepted."""
    torch.manual_seed(0)
    target = tiny_llama(0)
    prompt, n = [3, 1, 4, 1, 5], 24
    ref = hf_greedy(target, prompt, n)
    verifier = Verifier(LlamaRunner(target, max_slots=2, max_seq_len=128))
    plan = FusionPlan((("good", 0.9), ("bad", 0.3)), max_nodes=8)
    rng = random.Random(0)
    committed, told, rounds = [], 0, 0
    sampling = SamplingParams(max_new_tokens=n)
    while len(committed) < n:
        k = len(committed)
        good = ref[k:k + 4]
        if len(good) > 2:
            good[2] = (good[2] + 1) % 97
        # Every other round the "bad" drafter is the better one: the tree must hold both.
        right = 3 if rounds % 2 else 1
        bad = ref[k:k + right] + [rng.randrange(97) for _ in range(4 - right)]
        drafts = [DraftReply([chain("good", good)]), DraftReply([chain("bad", bad)])]
        seq = prompt + committed
        call = VerifyCall("r", told, seq[told:], sampling, None, plan)
        told = len(seq)
        result = verifier.verify([call], drafts).results[0]
        best_alone = max(_agree(good, ref[k:]), _agree(bad, ref[k:]))
        assert result.num_accepted == best_alone
        assert result.credit["good"][1] == _agree(good, ref[k:])
        assert result.credit["bad"][1] == _agree(bad, ref[k:])
        committed += result.emitted
        rounds += 1
    assert committed[:n] == ref
    assert rounds < n  # speculation paid: fewer forwards than tokens


def _agree(draft: list[int], truth: list[int]) -> int:
    run = 0
    for a, b in zip(draft, truth):
        if a != b:
            break
        run += 1
    return run
