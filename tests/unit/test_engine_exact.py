"""The engine's output is exactly the target's: greedy token for token, sampled in distribution.

Tiny random Llama models (no zoo, no Ray): correctness does not depend on drafts
being good, so a random drafter is as valid a test as a trained one.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specfleet.core.types import DraftProposal, FinishReason, SamplingParams
from specfleet.drafters.base import Drafter
from specfleet.drafters.model_drafter import ModelDrafter
from specfleet.drafters.ngram import NgramDrafter
from specfleet.drafters.suffix_tree import SuffixTreeDrafter
from specfleet.engine.engine import SpecEngine
from specfleet.models.llama_runner import LlamaRunner
from specfleet.policy.draft_length import AdaptiveDraftLength, FixedDraftLength
from specfleet.verifiers.verifier import Verifier

torch.set_num_threads(1)
VOCAB = 97
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9, 10], [11, 12, 13, 14, 15], [40]]


def tiny_llama(seed: int, layers: int = 2, vocab: int = VOCAB, eos: int | None = None):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=eos, bos_token_id=None, pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def target():
    return tiny_llama(0)


def hf_greedy(model, prompt, n, eos=None):
    kwargs = {} if eos is not None else {"min_new_tokens": n}
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                             eos_token_id=eos, pad_token_id=0, **kwargs)
    return out[0, len(prompt):].tolist()


def make_engine(target, drafters, eos=(), window=4, policy=None, batch=8):
    verifier = Verifier(LlamaRunner(target, max_slots=batch, max_seq_len=200), eos_token_ids=eos)
    return SpecEngine(verifier, drafters, draft_policy=policy or FixedDraftLength(window),
                      max_batch_size=batch)


def model_drafter(model, name, slots=32):
    return ModelDrafter(LlamaRunner(model, max_slots=slots, max_seq_len=220), name=name)


class OracleTreeDrafter(Drafter):
    """Test double: proposes a 2-wide tree whose *second* branch holds the target's true
    continuation (taken from a reference run), so acceptance must walk a non-first
    branch and the verifier must compact the KV cache to it."""

    name = "tree"

    def __init__(self, continuations: dict[tuple, list[int]]):
        self.continuations = continuations
        self.seq: dict[str, list[int]] = {}

    def propose(self, requests):
        out = []
        for r in requests:
            seq = self.seq.setdefault(r.request_id, [])
            del seq[r.position:]
            seq.extend(r.new_tokens)
            truth = next(v for k, v in self.continuations.items() if seq[: len(k)] == list(k))
            gen = len(seq) - len(next(k for k in self.continuations if seq[: len(k)] == list(k)))
            nxt = truth[gen : gen + 2]
            if len(nxt) < 2:
                out.append(DraftProposal.empty(r.request_id, self.name))
                continue
            wrong = (nxt[0] + 1) % VOCAB
            # node0: wrong first token; node1: right first token; node2: child of node1 (right)
            # node3: child of node0
            out.append(DraftProposal(r.request_id, [wrong, nxt[0], nxt[1], 5], [-1, -1, 1, 0],
                                     [0.5] * 4, None, self.name))
        return out

    def rollback(self, request_id, length):
        del self.seq[request_id][length:]

    def release(self, request_id):
        self.seq.pop(request_id, None)


def test_early_exit_runner_is_the_truncated_target(target):
    """num_layers=k computes exactly a k-layer model with the target's weights."""
    from specfleet.models.llama_runner import ForwardItem

    shallow = LlamaForCausalLM(LlamaConfig(**{**target.config.to_dict(), "num_hidden_layers": 1})).eval()
    shallow.load_state_dict({k: v for k, v in target.state_dict().items() if ".layers.1." not in k})
    runner = LlamaRunner(target, max_slots=1, max_seq_len=64, num_layers=1)
    assert len(runner.layers) == 1 and runner.embed.data_ptr() == target.model.embed_tokens.weight.data_ptr()
    runner.allocate("r")
    prompt = PROMPTS[0]
    (logits,) = runner.forward([ForwardItem("r", prompt, logit_rows=list(range(len(prompt))))])
    with torch.no_grad():
        expected = shallow(torch.tensor([prompt])).logits[0]
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("drafter_kind", ["self", "random", "none", "tree", "ngram", "suffix", "early_exit"])
def test_greedy_batch_equals_hf_generate(target, drafter_kind):
    expected = [hf_greedy(target, p, 24) for p in PROMPTS]
    drafters = {
        "self": {"d": model_drafter(target, "d")},
        "random": {"d": model_drafter(tiny_llama(7, layers=1), "d")},
        "none": {},
        "tree": {"d": OracleTreeDrafter({tuple(p): e for p, e in zip(PROMPTS, expected)})},
        "ngram": {"d": NgramDrafter(name="d")},
        "suffix": {"d": SuffixTreeDrafter(name="d", tree_width=2)},
        # the target's own first layer + final norm + LM head, on the target's weights
        "early_exit": {"d": ModelDrafter(LlamaRunner(target, max_slots=32, max_seq_len=220, num_layers=1),
                                         name="d")},
    }[drafter_kind]
    engine = make_engine(target, drafters)
    outputs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=24),
                              drafter="d" if drafters else None)
    for out, exp in zip(outputs, expected):
        assert out.token_ids == exp
        assert out.finish_reason == FinishReason.LENGTH
    if drafter_kind == "self":  # a drafter that is the target is always accepted
        assert all(o.stats.acceptance_rate == 1.0 for o in outputs)
        assert all(o.stats.mean_acceptance_length > 4.0 for o in outputs)
    if drafter_kind == "tree":
        assert all(o.stats.accepted > 0 for o in outputs)


def test_adaptive_window_stays_exact(target):
    engine = make_engine(target, {"d": model_drafter(tiny_llama(7, layers=1), "d")},
                         policy=AdaptiveDraftLength(max_length=6))
    outputs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=30), drafter="d")
    assert [o.token_ids for o in outputs] == [hf_greedy(target, p, 30) for p in PROMPTS]


def test_eos_inside_accepted_window(target):
    reference = hf_greedy(target, PROMPTS[0], 12)
    eos = reference[5]  # the target emits it at position 5 (or earlier)
    expected = hf_greedy(target, PROMPTS[0], 12, eos=eos)
    engine = make_engine(target, {"d": model_drafter(target, "d")}, eos=[eos], window=4)
    (out,) = engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=12), drafter="d")
    assert out.token_ids == expected and out.token_ids[-1] == eos
    assert out.finish_reason == FinishReason.EOS


def test_max_new_tokens_inside_window(target):
    engine = make_engine(target, {"d": model_drafter(target, "d")}, window=4)
    outs = engine.generate(PROMPTS, SamplingParams(max_new_tokens=6), drafter="d")
    assert [o.token_ids for o in outs] == [hf_greedy(target, p, 6) for p in PROMPTS]


def test_cancel_frees_kv_slots(target):
    engine = make_engine(target, {"d": model_drafter(target, "d")})
    rid = engine.submit(PROMPTS[0], SamplingParams(max_new_tokens=50), drafter="d")
    engine.step()
    assert engine.verifier.runner.active_requests == [rid]
    assert engine.cancel(rid)
    assert engine.verifier.runner.active_requests == []
    assert engine.drafters["d"].runner.active_requests == []
    (out,) = engine.step()
    assert out.finish_reason == FinishReason.CANCELLED


def test_bad_requests_rejected(target):
    engine = make_engine(target, {})
    with pytest.raises(ValueError, match="unknown drafter"):
        engine.submit([1, 2], drafter="nope")
    with pytest.raises(ValueError, match="temperature"):
        engine.submit([1, 2], SamplingParams(temperature=-1.0))
    # Rejected at submit (was: at the first round), so it never takes a batch slot.
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.submit([VOCAB + 5], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValueError, match="exceeds the context"):
        engine.submit([1, 2], SamplingParams(max_new_tokens=10_000))
    assert not engine.has_work


# ---- sampling ---------------------------------------------------------------------------
SMALL_VOCAB = 6


def exact_two_token_marginals(model, prompt, temperature):
    """p(x1) and p(x2) = Σ p(x1) p(x2 | x1), computed from the target directly."""
    with torch.no_grad():
        p1 = torch.softmax(model(torch.tensor([prompt])).logits[0, -1] / temperature, -1)
        p2 = torch.zeros(SMALL_VOCAB)
        for x1 in range(SMALL_VOCAB):
            row = model(torch.tensor([prompt + [x1]])).logits[0, -1]
            p2 += p1[x1] * torch.softmax(row / temperature, -1)
    return p1.numpy(), p2.numpy()


def chi_square_ok(counts: Counter, probs: np.ndarray, n: int) -> bool:
    """Pearson chi-square at p < 1e-4 (critical value for 5 dof ~ 25.7)."""
    stat = sum((counts.get(i, 0) - n * p) ** 2 / (n * p) for i, p in enumerate(probs) if p > 0)
    return stat < 25.7


@pytest.mark.parametrize("drafter_kind", ["sampled-model", "deterministic-tree"])
def test_sampled_output_has_target_distribution(drafter_kind):
    target = tiny_llama(3, vocab=SMALL_VOCAB)
    prompt = [1, 4, 2]
    temperature = 1.3
    p1, p2 = exact_two_token_marginals(target, prompt, temperature)
    if drafter_kind == "sampled-model":
        drafter = model_drafter(tiny_llama(11, layers=1, vocab=SMALL_VOCAB), "d")
    else:
        drafter = FixedTreeDrafter()
    engine = make_engine(target, {"d": drafter}, window=3, batch=32)
    n = 1600
    params = [SamplingParams(temperature=temperature, max_new_tokens=2, seed=s) for s in range(n)]
    outs = engine.generate([prompt] * n, params, drafter="d")
    first = Counter(o.token_ids[0] for o in outs)
    second = Counter(o.token_ids[1] for o in outs)
    assert chi_square_ok(first, p1, n), (first, p1)
    assert chi_square_ok(second, p2, n), (second, p2)
    assert sum(o.stats.accepted for o in outs) > 0  # drafts were really accepted sometimes


class FixedTreeDrafter(Drafter):
    """Test double: always proposes the same 3-candidate root plus a child (one-hot q)."""

    name = "fixed-tree"

    def propose(self, requests):
        return [DraftProposal(r.request_id, [0, 2, 5, 1], [-1, -1, -1, 1], [0.3] * 4, None, self.name)
                for r in requests]

    def rollback(self, request_id, length):
        pass

    def release(self, request_id):
        pass


def test_fixed_seed_reproduces_sampled_output(target):
    def run(seed):
        engine = make_engine(target, {"d": model_drafter(tiny_llama(7, layers=1), "d")})
        params = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, max_new_tokens=16, seed=seed)
        return [o.token_ids for o in engine.generate(PROMPTS, params, drafter="d")]

    assert run(123) == run(123)
    assert run(123) != run(124)
