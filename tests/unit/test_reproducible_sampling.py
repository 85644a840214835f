"""Seeded sampling is a function of (prompt, parameters, seed) alone, and exact.

Position-keyed noise (``core/sampling.py``) and the keyed accept rule
(``verifiers/acceptance.py``): the same seed gives the same tokens with speculation off,
with every drafter, window and batch; the output distribution is the target's
(chi-square against the model's own softmax), and deliberately wrong rules fail the
same tests. Tiny random Llama models, no zoo, no Ray.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from specfleet.core.sampling import keyed_choice, position_key, processed_probs
from specfleet.core.types import SamplingParams
from specfleet.drafters.ngram import NgramDrafter
from specfleet.drafters.suffix_tree import SuffixTreeDrafter
from specfleet.engine.engine import SpecEngine
from specfleet.models.llama_runner import LlamaRunner
from specfleet.policy.draft_length import AdaptiveDraftLength, FixedDraftLength
from specfleet.verifiers.acceptance import Acceptance, tree_children, walk_tree
from specfleet.verifiers.verifier import Verifier
from tests.unit.test_engine_exact import (
    PROMPTS,
    SMALL_VOCAB,
    FixedTreeDrafter,
    exact_two_token_marginals,
    model_drafter,
    tiny_llama,
)

torch.set_num_threads(1)
CRITICAL = {5: 25.7, 35: 70.0}  # chi-square critical values at p < 1e-4, by degrees of freedom


def chi_square(counts: Counter, probs: np.ndarray, n: int) -> float:
    return sum((counts.get(i, 0) - n * p) ** 2 / (n * p) for i, p in enumerate(probs) if p > 0)


# ---- the keyed draw itself -------------------------------------------------------------------
def test_keyed_choice_draws_from_p_and_is_a_pure_function():
    p = torch.tensor([0.05, 0.4, 0.0, 0.25, 0.2, 0.1])
    n = 4000
    by_seed = Counter(keyed_choice(p, seed, 17) for seed in range(n))
    by_position = Counter(keyed_choice(p, 2**64 - 1, pos) for pos in range(n))
    assert by_seed[2] == by_position[2] == 0  # zero probability never wins
    assert chi_square(by_seed, p.numpy(), n) < CRITICAL[5]
    assert chi_square(by_position, p.numpy(), n) < CRITICAL[5]
    assert keyed_choice(p, 12345, 3) == keyed_choice(p.double() * 7, 12345, 3)  # scale-free
    assert [keyed_choice(p, 9, t) for t in range(20)] == [keyed_choice(p, 9, t) for t in range(20)]
    # Keys use all 64 bits of the seed and never overflow.
    assert position_key(0, 0) != position_key(2**63, 0) and 0 <= position_key(2**64 - 1, 2**40) < 2**63


# ---- exactness through the engine ---------------------------------------------------------------
def make_engine(target, drafters, *, window=3, batch=32, verifier_cls=Verifier, policy=None, groups=1):
    verifiers = [verifier_cls(LlamaRunner(target, max_slots=batch, max_seq_len=200)) for _ in range(groups)]
    return SpecEngine(verifiers, drafters, draft_policy=policy or FixedDraftLength(window),
                      max_batch_size=batch)


def joint_probs(model, prompt, temperature) -> np.ndarray:
    """p(x1, x2) over SMALL_VOCAB², flattened x1 * V + x2, from the model directly."""
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        rows = [torch.softmax(model(torch.tensor([prompt + [x]])).logits[0, -1] / temperature, -1)
                for x in range(SMALL_VOCAB)]
    return torch.stack([p1[x] * rows[x] for x in range(SMALL_VOCAB)]).flatten().numpy()


def keyed_walk(logits, proposal, sampling, seed, position_of) -> Acceptance:
    """The keyed accept rule with the noise position chosen by ``position_of(depth)``."""

    def choose(row: int, depth: int) -> int:
        p = processed_probs(logits[row], sampling.temperature, sampling.top_k, sampling.top_p)
        return keyed_choice(p, seed, position_of(depth))

    return walk_tree(proposal.tokens, tree_children(proposal.parents), choose)


class UnkeyedVerifier(Verifier):
    """Wrong on purpose: the same noise at every position (keyed by the seed only)."""

    def _accept(self, req, logits, proposal) -> Acceptance:
        return keyed_walk(logits, proposal, req.sampling, req.seed, lambda depth: 0)


class AcceptFirstDraftVerifier(Verifier):
    """Wrong on purpose: keeps the first draft token whatever the target says."""

    def _accept(self, req, logits, proposal) -> Acceptance:
        right = super()._accept(req, logits, proposal)
        if not proposal.tokens or right.accepted_nodes[:1] == [0]:
            return right
        return Acceptance([0], [proposal.tokens[0], right.emitted[-1]])


RULES = {"keyed": Verifier, "unkeyed": UnkeyedVerifier, "accept-first": AcceptFirstDraftVerifier}


@pytest.mark.parametrize("rule,drafter", [
    ("keyed", None), ("keyed", "model"), ("keyed", "tree"),  # plain, chain, tree of candidates
    ("unkeyed", None), ("unkeyed", "model"), ("unkeyed", "tree"),  # wrong: must fail
    ("accept-first", "model"), ("accept-first", "tree"),  # wrong: must fail
])
def test_sampled_two_token_joint_is_the_targets(rule, drafter):
    target = tiny_llama(3, vocab=SMALL_VOCAB)
    prompt, temperature = [1, 4, 2], 1.1
    drafters = {"model": model_drafter(tiny_llama(11, layers=1, vocab=SMALL_VOCAB), "model", slots=64),
                "tree": FixedTreeDrafter()}
    verifier_cls = RULES[rule]
    engine = make_engine(target, drafters, window=3, batch=64, verifier_cls=verifier_cls)
    n = 2000
    params = [SamplingParams(temperature=temperature, max_new_tokens=2, seed=s) for s in range(n)]
    outs = engine.generate([prompt] * n, params, drafter=drafter)
    joint = Counter(o.token_ids[0] * SMALL_VOCAB + o.token_ids[1] for o in outs)
    stat = chi_square(joint, joint_probs(target, prompt, temperature), n)
    p1, _ = exact_two_token_marginals(target, prompt, temperature)
    first = chi_square(Counter(o.token_ids[0] for o in outs), p1, n)  # vs the HF model's softmax
    if rule != "keyed":
        assert stat > CRITICAL[35] or first > CRITICAL[5], f"a wrong rule passed the test ({stat}, {first})"
        return
    assert stat < CRITICAL[35] and first < CRITICAL[5], (stat, first)
    if drafter is not None:
        assert sum(o.stats.accepted for o in outs) > 0  # drafts were really accepted sometimes


# ---- the same seed, whatever served it ------------------------------------------------------------
SERVED_BY = ["plain", "model-w1", "model-w3", "model-w8", "model-adaptive", "ngram", "suffix", "tree",
             "batch-of-32", "two-groups"]


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.7, max_new_tokens=24, seed=2**64 - 1),
    SamplingParams(temperature=1.0, top_k=12, top_p=0.9, max_new_tokens=24, seed=77),
], ids=["t0.7-max-seed", "t1.0-topk-topp"])
def test_same_seed_same_tokens_whatever_served_it(params):
    target = tiny_llama(0)
    draft_model = tiny_llama(7, layers=1)
    results = {}
    for how in SERVED_BY:
        drafters = {"model": model_drafter(draft_model, "model", slots=64), "ngram": NgramDrafter(name="ngram"),
                    "suffix": SuffixTreeDrafter(name="suffix"), "tree": FixedTreeDrafter()}
        window = int(how.split("-w")[1]) if "-w" in how else 3
        policy = AdaptiveDraftLength(max_length=6) if how == "model-adaptive" else None
        engine = make_engine(target, drafters, window=window, policy=policy,
                             groups=2 if how == "two-groups" else 1)
        drafter = {"plain": None, "ngram": "ngram", "suffix": "suffix", "tree": "tree"}.get(how, "model")
        ids = [engine.submit(p, params, drafter=drafter) for p in PROMPTS]
        if how == "batch-of-32":  # others' requests share every forward pass
            noise = SamplingParams(temperature=1.0, max_new_tokens=24)
            for k in list(range(4)) * 7:
                engine.submit(PROMPTS[k], noise, drafter="model")
        done = {}
        while engine.has_work:
            done.update((o.request_id, o) for o in engine.step())
        results[how] = [done[i].token_ids for i in ids]
        assert all(done[i].seed == params.seed for i in ids)
    reference = results["plain"]
    assert all(len(t) == 24 for t in reference)
    for how, tokens in results.items():
        assert tokens == reference, how


def test_unseeded_requests_get_a_seed_that_reproduces_them():
    target = tiny_llama(0)
    engine = make_engine(target, {"model": model_drafter(tiny_llama(7, layers=1), "model")})
    params = SamplingParams(temperature=0.9, max_new_tokens=16)
    first = engine.generate(PROMPTS, params, drafter="model")
    assert all(o.seed is not None for o in first) and len({o.seed for o in first}) == len(PROMPTS)
    again = engine.generate(PROMPTS, [SamplingParams(temperature=0.9, max_new_tokens=16, seed=o.seed)
                                      for o in first])
    assert [o.token_ids for o in again] == [o.token_ids for o in first]
    greedy = engine.generate(PROMPTS[:1], SamplingParams(max_new_tokens=4))
    assert greedy[0].seed is None
    with pytest.raises(ValueError, match="seed"):
        engine.submit([1, 2], SamplingParams(temperature=1.0, seed=2**64))
