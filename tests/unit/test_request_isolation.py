"""No valid request can fail its neighbours: extreme sampling values are well defined,
and a failure while verifying one request ends that request alone.

Tiny random Llama models, no zoo, no Ray.
"""

from __future__ import annotations

import pytest
import torch

from specfleet.core.sampling import processed_probs
from specfleet.core.types import FinishReason, SamplingParams
from specfleet.engine.engine import SpecEngine
from specfleet.models.llama_runner import LlamaRunner
from specfleet.policy.draft_length import FixedDraftLength
from specfleet.verifiers.verifier import Verifier
from tests.unit.test_engine_exact import PROMPTS, hf_greedy, model_drafter, tiny_llama

torch.set_num_threads(1)
NEW = 12


@pytest.mark.parametrize("kwargs", [dict(temperature=1e-40), dict(temperature=1e-300),
                                    dict(temperature=1.0, top_p=5e-324),
                                    dict(temperature=1e-300, top_k=1, top_p=5e-324)])
def test_extreme_sampling_values_are_the_argmax(kwargs):
    logits = torch.tensor([[0.5, 3.0, -1.0, 2.9], [1e4, -1e4, 0.0, 1e4 - 1]])
    probs = processed_probs(logits, **kwargs)
    assert torch.equal(probs, torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))


def test_extreme_values_in_a_batch_decode_greedily_and_fail_nobody():
    target = tiny_llama(0)
    engine = SpecEngine(Verifier(LlamaRunner(target, max_slots=8, max_seq_len=200)),
                        {"d": model_drafter(tiny_llama(7, layers=1), "d")},
                        draft_policy=FixedDraftLength(3), max_batch_size=8)
    extreme = [SamplingParams(temperature=1e-300, max_new_tokens=NEW, seed=1),
               SamplingParams(temperature=1e-40, max_new_tokens=NEW, seed=2),
               SamplingParams(temperature=1.0, top_p=5e-324, max_new_tokens=NEW, seed=3)]
    normal = [SamplingParams(max_new_tokens=NEW)] * 5
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    outs = engine.generate(prompts, extreme + normal, drafter="d")
    assert [o.token_ids for o in outs] == [hf_greedy(target, p, NEW) for p in prompts]
    assert all(o.finish_reason == FinishReason.LENGTH for o in outs)


class FailsOneRequest(Verifier):
    """Raises inside the accept rule for one request (say, a numerical bug)."""

    victim = "bad"

    def _accept(self, req, logits, proposal):
        if any(r is req for rid, r in self._requests.items() if rid == self.victim):
            raise FloatingPointError("injected")
        return super()._accept(req, logits, proposal)


def test_a_failure_verifying_one_request_ends_it_alone():
    target = tiny_llama(0)
    engine = SpecEngine(FailsOneRequest(LlamaRunner(target, max_slots=8, max_seq_len=200)),
                        {"d": model_drafter(tiny_llama(7, layers=1), "d")},
                        draft_policy=FixedDraftLength(3), max_batch_size=8)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
    ids = [engine.submit(p, SamplingParams(max_new_tokens=NEW), drafter="d",
                         request_id="bad" if i == 3 else None) for i, p in enumerate(prompts)]
    done = {}
    while engine.has_work:
        done.update((o.request_id, o) for o in engine.step())
    bad = done["bad"]
    assert bad.finish_reason == FinishReason.ERROR and bad.token_ids == []
    assert bad.error == "verification failed (FloatingPointError)"  # short: no traceback, no paths
    for i, rid in enumerate(ids):
        if rid != "bad":
            assert done[rid].token_ids == hf_greedy(target, prompts[i], NEW)
    assert engine.verifier.active == [] and engine.verifier.runner.active_requests == []
