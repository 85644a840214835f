"""Cooperative drafting with real models: every mix of drafters, fused, equals HF greedy.

A tiny random Llama target, two small random Llama drafters (disagreeing with it and
with each other), the n-gram and suffix drafters; the learned router lets every drafter
of a mix cooperate (``max_width`` = the mix's size) and the verifier fuses their
proposals. Greedy output must equal HF ``generate``; sampled output must equal what the
same seed gives without any drafter (keyed sampling depends only on prompt, parameters
and seed)."""

from __future__ import annotations

import itertools

import pytest
import torch

from specfleet.core.clock import ManualClock
from specfleet.core.types import SamplingParams
from specfleet.drafters.ngram import NgramDrafter
from specfleet.drafters.suffix_tree import SuffixTreeDrafter
from specfleet.engine.engine import SpecEngine
from specfleet.models.llama_runner import LlamaRunner
from specfleet.policy.draft_length import FixedDraftLength
from specfleet.policy.learned_routing import LearnedRouter
from specfleet.policy.routing import DrafterProfile
from specfleet.policy.speculation_width import SpeculationWidth
from specfleet.verifiers.verifier import Verifier
from tests.unit.test_engine_exact import PROMPTS, hf_greedy, model_drafter, tiny_llama

N = 14


@pytest.fixture(scope="module")
def models():
    return {"target": tiny_llama(0), "m1": tiny_llama(1), "m2": tiny_llama(2)}


def make_drafter(name, models):
    if name == "ngram":
        return NgramDrafter(name="ngram")
    if name == "suffix":
        return SuffixTreeDrafter(name="suffix")
    return model_drafter(models[name], name)


def cooperative_engine(models, mix):
    drafters = {name: make_drafter(name, models) for name in mix}
    router = LearnedRouter([DrafterProfile(n, "general") for n in mix], decode=lambda ids: "words",
                           cooperate_ratio=0.0)  # everyone cooperates: the hardest trees
    verifier = Verifier(LlamaRunner(models["target"], max_slots=8, max_seq_len=200))
    return SpecEngine(verifier, drafters, draft_policy=FixedDraftLength(4), router=router,
                      width=SpeculationWidth(max_width=len(mix), batch_node_budget=64),
                      max_batch_size=8, clock=ManualClock(1))


def run_routed(engine, prompts, params):
    ids = [engine.submit(p, params, route=True) for p in prompts]
    done = {}
    while engine.has_work:
        done.update((o.request_id, o) for o in engine.step())
    return [done[i] for i in ids]


MIXES = [mix for k in (2, 3, 4) for mix in itertools.combinations(("m1", "m2", "ngram", "suffix"), k)]


@pytest.mark.parametrize("mix", MIXES, ids=["+".join(m) for m in MIXES])
def test_fused_greedy_equals_hf_for_every_mix(models, mix):
    engine = cooperative_engine(models, mix)
    params = SamplingParams(max_new_tokens=N, ignore_eos=True)
    outs = run_routed(engine, PROMPTS, params)
    for prompt, out in zip(PROMPTS, outs):
        assert out.token_ids == hf_greedy(models["target"], prompt, N), (mix, prompt)
    # Fusion really happened: more than one drafter was credited within requests.
    assert any(len(o.stats.drafters) > 1 for o in outs), [o.stats.drafters for o in outs]


def test_fused_sampling_depends_only_on_the_seed(models):
    params = SamplingParams(max_new_tokens=N, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    fused = run_routed(cooperative_engine(models, ("m1", "m2", "ngram")), PROMPTS, params)
    plain_engine = SpecEngine(Verifier(LlamaRunner(models["target"], max_slots=8, max_seq_len=200)), {},
                              max_batch_size=8)
    plain = plain_engine.generate(PROMPTS, params)
    assert [o.token_ids for o in fused] == [o.token_ids for o in plain]
    assert any(len(o.stats.drafters) > 1 for o in fused)


torch.set_num_threads(1)


def test_per_step_cooperation_equals_hf_and_keeps_members_tokens(models):
    from specfleet.drafters.cooperative_step import StepCooperativeDrafter

    def run(members):
        coop = StepCooperativeDrafter(members)
        verifier = Verifier(LlamaRunner(models["target"], max_slots=8, max_seq_len=200))
        engine = SpecEngine(verifier, {"coop": coop}, draft_policy=FixedDraftLength(4), max_batch_size=8)
        outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=N, ignore_eos=True), drafter="coop")
        for prompt, out in zip(PROMPTS, outs):
            assert out.token_ids == hf_greedy(models["target"], prompt, N)
        return coop, sum(o.stats.accepted for o in outs) / sum(o.stats.drafted for o in outs)

    # Disagreeing random members: exact, whatever they propose.
    run({"m1": model_drafter(models["m1"], "m1"), "m2": model_drafter(models["m2"], "m2")})
    # Two copies of the target: every kept token is the target's, so chains are accepted
    # whole (the step-by-step feedback keeps both members on the chosen chain).
    coop, rate = run({"self": model_drafter(models["target"], "self"),
                      "self2": model_drafter(models["target"], "self2")})
    assert rate > 0.95 and coop.member_wins["self"] > 0 and coop.member_wins["self2"] > 0
