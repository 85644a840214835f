"""Routing inside the engine: chosen at admission, learned from every round, exact output.

Tiny random Llama target (no zoo, no Ray) and real drafters; the engine runs on a
``ManualClock`` so the times policies are told are the test's, not the wall's.
"""

from __future__ import annotations

import pytest
import torch

from specfleet.core.clock import ManualClock
from specfleet.core.types import SamplingParams
from specfleet.drafters.ngram import NgramDrafter
from specfleet.drafters.suffix_tree import SuffixTreeDrafter
from specfleet.engine.engine import SpecEngine
from specfleet.models.llama_runner import LlamaRunner
from specfleet.policy.draft_length import FixedDraftLength
from specfleet.policy.routing import DrafterProfile, ExpertiseRouter
from specfleet.verifiers.verifier import Verifier
from tests.unit.test_engine_exact import PROMPTS, hf_greedy, tiny_llama

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def target():
    return tiny_llama(0)


class RecordingPolicy(FixedDraftLength):
    """Fixed window that records the times and loads it is told."""

    def __init__(self, length):
        super().__init__(length)
        self.told: list[tuple[int, int]] = []  # (now_ns, running requests)

    def window(self, request_id, *, now_ns=0, load=None):
        self.told.append((now_ns, load.running))
        return self.length


def engine_with_router(target, policy, exploration=0.0):
    router = ExpertiseRouter([DrafterProfile("ngram", "general"), DrafterProfile("suffix", "code")],
                             exploration=exploration, decode=lambda ids: "plain words only")
    verifier = Verifier(LlamaRunner(target, max_slots=4, max_seq_len=200))
    drafters = {"ngram": NgramDrafter(name="ngram"), "suffix": SuffixTreeDrafter(name="suffix")}
    clock = ManualClock(1_000)
    engine = SpecEngine(verifier, drafters, draft_policy=policy, router=router, clock=clock,
                        max_batch_size=4)
    return engine, router, clock


def test_routed_requests_are_exact_and_teach_the_router_every_round(target):
    policy = RecordingPolicy(3)
    engine, router, clock = engine_with_router(target, policy)
    prior = router.table()["prose"]["ngram"]
    ids = [engine.submit(p, SamplingParams(max_new_tokens=12), route=True) for p in PROMPTS]
    clock.advance(500)
    done = {}
    while engine.has_work:
        for out in engine.step():
            done[out.request_id] = out
        clock.advance(1_000)
    for rid, prompt in zip(ids, PROMPTS):
        out = done[rid]
        assert out.token_ids == hf_greedy(target, prompt, 12)
        assert out.stats.domain == "prose"
        assert out.stats.verifier_group == 0
        assert out.stats.queue_ns == 500  # submit at 1000, admitted at 1500 on the manual clock
        assert set(out.stats.drafters) <= {"ngram"}  # the general drafter wins prose by prior
    # The table moved off its prior during the run, not only at the end of requests.
    assert router.table()["prose"]["ngram"] != prior
    rounds_with_drafts = sum(o.stats.position_drafted[:1][0] if o.stats.position_drafted else 0
                             for o in done.values())
    assert rounds_with_drafts > 0
    assert router._count[("prose", "ngram")] == rounds_with_drafts
    # Policies were told the manual clock's time and the batch's load.
    assert {now for now, _ in policy.told} <= {1_500 + 1_000 * k for k in range(100)}
    assert max(running for _, running in policy.told) == len(PROMPTS)


def test_without_router_route_uses_the_default_drafter(target):
    verifier = Verifier(LlamaRunner(target, max_slots=2, max_seq_len=200))
    engine = SpecEngine(verifier, {"ngram": NgramDrafter(name="ngram")}, draft_policy=FixedDraftLength(2))
    rid = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=6), route=True)
    plain = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=6))  # no route: no drafts
    outs = {}
    while engine.has_work:
        for o in engine.step():
            outs[o.request_id] = o
    assert outs[rid].token_ids == outs[plain].token_ids == hf_greedy(target, PROMPTS[0], 6)
    assert outs[rid].stats.drafted > 0 and outs[plain].stats.drafted == 0
    assert outs[rid].stats.domain is None
