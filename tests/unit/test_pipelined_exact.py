"""Pipelined speculation (``engine/pipeline.py``) changes no output token.

In process, on tiny random Llamas: every drafter kind, greedy against HF ``generate``
and seeded sampling against the lockstep engine; windows rejected at their first and
last positions (a drafter that is right except where told to be wrong), EOS and the
length cap inside a pre-drafted window, a cancel while a window is drafted ahead, a
drafter that fails its ahead call. The overlap itself needs separate processes: the
Ray test is ``tests/integration/test_ray_pipelined.py``.
"""

from __future__ import annotations

import pytest
import torch

from specfleet.core.types import DraftProposal, FinishReason, SamplingParams
from specfleet.drafters.base import Drafter
from specfleet.drafters.ngram import NgramDrafter
from specfleet.drafters.suffix_tree import SuffixTreeDrafter
from specfleet.engine.engine import SpecEngine
from specfleet.models.llama_runner import LlamaRunner
from specfleet.policy.draft_length import AdaptiveDraftLength, FixedDraftLength
from specfleet.verifiers.verifier import Verifier
from tests.unit.test_engine_exact import PROMPTS, VOCAB, hf_greedy, model_drafter, tiny_llama

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def target():
    return tiny_llama(0)


def make_engine(target, drafters, *, eos=(), window=4, policy=None, batch=8, pipelined=True, first_window=1):
    """``first_window=1`` by default: PEARL's pre-verify, the most pipelined schedule."""
    verifier = Verifier(LlamaRunner(target, max_slots=batch, max_seq_len=200), eos_token_ids=eos)
    return SpecEngine(verifier, drafters, draft_policy=policy or FixedDraftLength(window),
                      max_batch_size=batch, pipelined=pipelined, first_window=first_window)


class ScriptedDrafter(Drafter):
    """Test double: knows the target's continuation of each prompt and proposes it,
    except that the draft token at each generated position in ``wrong_at`` is
    replaced by a wrong one — so a window can be made to fail at its first or last
    position, in a cold round or in a pre-drafted one."""

    name = "scripted"

    def __init__(self, truth: dict[tuple, list[int]], wrong_at: set[int], fail_ahead_after: int | None = None):
        self.truth, self.wrong_at = truth, wrong_at
        self.seq: dict[str, list[int]] = {}
        self.calls = 0
        self.fail_after = fail_ahead_after

    def propose(self, requests):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after and self.calls % 3 == 0:
            raise RuntimeError("scripted failure")
        out = []
        for r in requests:
            seq = self.seq.setdefault(r.request_id, [])
            assert r.position <= len(seq), "position contract: beyond what was sent"
            del seq[r.position:]
            seq.extend(r.new_tokens)
            prompt = next(k for k in self.truth if tuple(seq[: len(k)]) == k)
            done = len(seq) - len(prompt)
            truth = self.truth[prompt]
            tokens = []
            for i in range(r.num_draft_tokens):
                at = done + i
                if at >= len(truth):
                    break
                if seq[len(prompt):] + tokens != truth[:at]:  # the context itself is off-path
                    tokens.append(3)
                    continue
                tokens.append((truth[at] + 1) % VOCAB if at in self.wrong_at else truth[at])
            out.append(DraftProposal(r.request_id, tokens, DraftProposal.chain_parents(len(tokens)),
                                     [0.9] * len(tokens), None, self.name))
        return out

    def rollback(self, request_id, length):
        del self.seq[request_id][length:]

    def release(self, request_id):
        self.seq.pop(request_id, None)


@pytest.mark.parametrize("drafter_kind", ["self", "random", "ngram", "suffix"])
@pytest.mark.parametrize("first_window", [0, 1, 3])
def test_pipelined_greedy_equals_hf_generate(target, drafter_kind, first_window):
    expected = [hf_greedy(target, p, 24) for p in PROMPTS]
    drafter = {
        "self": lambda: model_drafter(target, "d"),
        "random": lambda: model_drafter(tiny_llama(7, layers=1), "d"),
        "ngram": lambda: NgramDrafter(name="d"),
        "suffix": lambda: SuffixTreeDrafter(name="d"),
    }[drafter_kind]()
    engine = make_engine(target, {"d": drafter}, first_window=first_window)
    outputs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=24), drafter="d")
    assert [o.token_ids for o in outputs] == expected
    assert all(o.finish_reason == FinishReason.LENGTH for o in outputs)
    assert not any(engine.stats.draft_failures.values())  # the position contract held throughout
    scheduler = engine.scheduler
    assert scheduler.pipeline_rounds > 0
    if drafter_kind == "self":  # always right: after the first, every round was drafted ahead
        assert scheduler.pipeline_hits >= scheduler.pipeline_rounds - 2 * len(PROMPTS)
        assert all(o.stats.mean_acceptance_length > 3.0 for o in outputs)


@pytest.mark.parametrize("wrong_at", [{0}, {4}, {5}, {3, 8, 9, 13}, set(range(0, 24, 4))],
                         ids=["first", "last-of-ahead", "first-of-warm", "mixed", "every-4th"])
def test_rejections_anywhere_in_a_window(target, wrong_at):
    expected = [hf_greedy(target, p, 20) for p in PROMPTS]
    drafter = ScriptedDrafter({tuple(p): e for p, e in zip(PROMPTS, expected)}, wrong_at)
    engine = make_engine(target, {"scripted": drafter}, window=4)
    outputs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=20), drafter="scripted")
    assert [o.token_ids for o in outputs] == expected
    assert engine.scheduler.pipeline_hits > 0  # windows after the wrong ones were drafted ahead
    assert not any(engine.stats.draft_failures.values())
    for out in outputs:
        assert out.stats.drafted > out.stats.accepted  # the wrong tokens were drafted and rejected


def test_eos_and_length_cap_inside_a_predrafted_window(target):
    reference = hf_greedy(target, PROMPTS[0], 16)
    eos = reference[9]  # emitted inside the third window: a pre-drafted one
    expected = hf_greedy(target, PROMPTS[0], 16, eos=eos)
    engine = make_engine(target, {"d": model_drafter(target, "d")}, eos=[eos], window=4)
    (out,) = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=16), drafter="d")
    assert out.token_ids == expected and out.finish_reason == FinishReason.EOS
    assert engine.scheduler.pipeline_hits > 0
    for cap in (1, 2, 5, 7, 11):
        outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=cap), drafter="d")
        assert [o.token_ids for o in outs] == [hf_greedy(target, p, cap, eos=eos) for p in PROMPTS], cap
    assert not any(engine.stats.draft_failures.values())


def test_stop_string_inside_a_predrafted_window(target):
    decode = lambda ids: " ".join(map(str, ids))  # noqa: E731 - the verifier's text view
    reference = hf_greedy(target, PROMPTS[2], 20)
    stop = f"{reference[10]} {reference[11]}"
    outputs = {}
    for pipelined in (False, True):
        verifier = Verifier(LlamaRunner(target, max_slots=4, max_seq_len=200), decode=decode)
        engine = SpecEngine(verifier, {"d": model_drafter(target, "d")}, draft_policy=FixedDraftLength(4),
                            pipelined=pipelined)
        (out,) = engine.generate([PROMPTS[2]], SamplingParams(max_new_tokens=20, stop=[stop]), drafter="d")
        assert out.finish_reason == FinishReason.STOP
        outputs[pipelined] = out.token_ids
    assert outputs[True] == outputs[False] == reference[:12]


def test_cancel_while_a_window_is_drafted_ahead(target):
    engine = make_engine(target, {"d": model_drafter(target, "d")})
    keep = engine.submit(PROMPTS[1], SamplingParams(max_new_tokens=20), drafter="d")
    gone = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=50), drafter="d")
    engine.step()
    engine.step()
    assert engine.scheduler._pending  # a window was drafted ahead, not yet verified
    assert engine.cancel(gone)
    done = {}
    while engine.has_work:
        done.update((o.request_id, o) for o in engine.step())
    assert done[gone].finish_reason == FinishReason.CANCELLED
    assert done[keep].token_ids == hf_greedy(target, PROMPTS[1], 20)
    assert engine.verifier.runner.active_requests == []
    assert engine.drafters["d"].runner.active_requests == []
    assert not engine.scheduler._pending and not engine.scheduler._spec


def test_failing_drafter_calls_cost_drafts_only(target):
    expected = [hf_greedy(target, p, 20) for p in PROMPTS]
    drafter = ScriptedDrafter({tuple(p): e for p, e in zip(PROMPTS, expected)}, {7}, fail_ahead_after=2)
    engine = make_engine(target, {"scripted": drafter})
    outputs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=20), drafter="scripted")
    assert [o.token_ids for o in outputs] == expected
    assert engine.stats.draft_failures["scripted"] > 0


def test_adaptive_window_and_sampling_match_lockstep(target):
    """Seeded sampling: the same tokens pipelined or not (the keyed sampler)."""
    draft_model = tiny_llama(7, layers=1)
    params = [SamplingParams(temperature=0.8, max_new_tokens=20, seed=11 + i) for i in range(len(PROMPTS))]
    results = []
    for pipelined in (False, True):
        engine = make_engine(target, {"d": model_drafter(draft_model, "d")}, pipelined=pipelined,
                             policy=AdaptiveDraftLength(max_length=5))
        results.append([o.token_ids for o in engine.generate(PROMPTS, params, drafter="d")])
    assert results[0] == results[1]
    assert all(len(t) == 20 for t in results[0])


def test_self_drafter_sampled_pipeline_hits(target):
    """A drafter that is the target samples the target's tokens (same keyed noise):
    pre-drafted windows hold in sampled mode too."""
    params = SamplingParams(temperature=1.0, max_new_tokens=24, seed=5)
    plain = make_engine(target, {}, pipelined=False).generate([PROMPTS[0]], params)[0].token_ids
    engine = make_engine(target, {"d": model_drafter(target, "d")})
    (out,) = engine.generate([PROMPTS[0]], params, drafter="d")
    assert out.token_ids == plain
    assert engine.scheduler.pipeline_hits > 0


def test_a_failed_step_leaves_no_ahead_bookkeeping_and_loses_nothing(target):
    engine = make_engine(target, {"d": model_drafter(target, "d")})
    rid = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=20), drafter="d")
    engine.step()
    engine.step()
    worker = engine.executor.verifiers[0]
    real = worker.verify

    def fail_once(calls, drafts):
        worker.verify = real
        raise RuntimeError("verifier bug")

    worker.verify = fail_once
    with pytest.raises(RuntimeError):
        engine.step()
    assert not engine.scheduler._ahead_of_round
    done = {}
    while engine.has_work:
        done.update((o.request_id, o) for o in engine.step())
    assert done[rid].token_ids == hf_greedy(target, PROMPTS[0], 20)
