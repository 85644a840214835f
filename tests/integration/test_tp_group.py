"""A TP=2 verifier group on gloo (two processes) emits exactly the TP=1 tokens, and a
dead or hung rank becomes a clear ``TPGroupError`` within seconds, never a hang.

Tiny random Llama checkpoints (4 heads, 2 kv heads) saved to a temporary directory,
as in ``tests/unit/test_engine_exact.py``; one group is shared by the equality tests
because starting one costs a few seconds (the workers import torch and transformers).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specfleet.core.types import DraftProposal, SamplingParams
from specfleet.core.workers import VerifyCall
from specfleet.drafters.base import Drafter
from specfleet.drafters.model_drafter import ModelDrafter
from specfleet.engine.engine import SpecEngine
from specfleet.models.llama_runner import ForwardItem, LlamaRunner
from specfleet.policy.draft_length import FixedDraftLength
from specfleet.verifiers.tensor_parallel import TPGroupError, TPVerifierGroup
from specfleet.verifiers.verifier import Verifier

pytestmark = pytest.mark.integration

VOCAB = 97
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9, 10], [11, 12, 13, 14, 15], [40]]
NEW = 20


def tiny_llama(seed: int, layers: int = 2):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    model = tiny_llama(0)
    path = tmp_path_factory.mktemp("tp-target")
    model.save_pretrained(path)
    return model, path


@pytest.fixture(scope="module")
def group(target):
    with TPVerifierGroup(target[1], 2, max_slots=8, max_seq_len=200) as g:
        yield g


def tp1_verifier(model):
    return Verifier(LlamaRunner(model, max_slots=8, max_seq_len=200))


def generate(verifier, drafters, params, drafter="d"):
    engine = SpecEngine(verifier, drafters, draft_policy=FixedDraftLength(4), max_batch_size=8)
    return [o.token_ids for o in engine.generate(PROMPTS, params, drafter=drafter)]


def random_drafter():
    return {"d": ModelDrafter(LlamaRunner(tiny_llama(7, layers=1), max_slots=8, max_seq_len=220),
                              name="d")}


class TruthTreeDrafter(Drafter):
    """Proposes a 2-wide tree whose *second* branch is the target's true continuation,
    so every round compacts a non-first branch into the KV cache of every rank."""

    name = "tree"

    def __init__(self, truth: dict[tuple[int, ...], list[int]]):
        self.truth = truth
        self.seq: dict[str, list[int]] = {}

    def propose(self, requests):
        out = []
        for r in requests:
            seq = self.seq.setdefault(r.request_id, [])
            del seq[r.position:]
            seq.extend(r.new_tokens)
            prompt = next(p for p in self.truth if tuple(seq[: len(p)]) == p)
            nxt = self.truth[prompt][len(seq) - len(prompt): len(seq) - len(prompt) + 2]
            if len(nxt) < 2:
                out.append(DraftProposal.empty(r.request_id, self.name))
                continue
            wrong = (nxt[0] + 1) % VOCAB
            out.append(DraftProposal(r.request_id, [wrong, nxt[0], nxt[1], 5], [-1, -1, 1, 0],
                                     [0.5] * 4, None, self.name))
        return out

    def rollback(self, request_id, length):
        del self.seq[request_id][length:]

    def release(self, request_id):
        self.seq.pop(request_id, None)


def test_greedy_tp2_equals_tp1_and_hf_generate(group, target):
    model, _ = target
    expected = [hf_greedy(model, p, NEW) for p in PROMPTS]
    params = SamplingParams(max_new_tokens=NEW)
    assert generate(tp1_verifier(model), random_drafter(), params) == expected
    assert generate(group, random_drafter(), params) == expected
    truth = {tuple(p): e for p, e in zip(PROMPTS, expected)}
    assert generate(group, {"d": TruthTreeDrafter(truth)}, params) == expected
    assert generate(group, {}, params, drafter=None) == expected
    assert group.active == [] and group.runner.active_requests == []


def test_sampled_fixed_seed_tp2_equals_tp1(group, target):
    model, _ = target
    params = [SamplingParams(temperature=0.9, top_k=20, top_p=0.9, max_new_tokens=NEW, seed=s)
              for s in (11, 12, 13, 14)]
    tp1 = generate(tp1_verifier(model), random_drafter(), params)
    tp2 = generate(group, random_drafter(), params)
    assert tp2 == tp1
    # Keyed sampling: the same seeds give the same tokens without any drafts, too.
    assert generate(group, {}, params, drafter=None) == tp1
    assert tp1 != generate(tp1_verifier(model), random_drafter(), SamplingParams(max_new_tokens=NEW))


def test_deterministic_error_leaves_group_usable(group, target):
    runner = group.runner
    runner.allocate("too-long")
    with pytest.raises(ValueError, match="max_seq_len"):  # raised on every rank alike
        runner.forward([ForwardItem("too-long", list(range(201)))])
    runner.free("too-long")
    assert group.failed is None
    expected = [hf_greedy(target[0], p, 4) for p in PROMPTS]
    assert generate(group, {}, SamplingParams(max_new_tokens=4), drafter=None) == expected


def _fail_mid_generation(group, how: int) -> tuple[TPGroupError, float]:
    """Generate until the first tokens are out, then send ``how`` to rank 1."""
    fired = []

    def sink(request_id, tokens):
        if not fired:
            fired.append(time.monotonic())
            os.kill(group.worker_pids[0], how)

    engine = SpecEngine(group, random_drafter(), draft_policy=FixedDraftLength(4), token_sink=sink)
    with pytest.raises(TPGroupError) as info:
        engine.generate(PROMPTS, SamplingParams(max_new_tokens=NEW), drafter="d")
    return info.value, time.monotonic() - fired[0]


def test_killed_rank_fails_the_group_fast(target):
    # The in-memory model reaches the worker as a state dict (the other loading path).
    group = TPVerifierGroup(target[0], 2, max_slots=8, max_seq_len=200, collective_timeout_s=5)
    try:
        error, elapsed = _fail_mid_generation(group, signal.SIGKILL)
        assert error.rank == 1 and "rank 1" in str(error) and "SIGKILL" in str(error)
        assert elapsed < 15
        with pytest.raises(TPGroupError, match="unusable.*SIGKILL"):  # stays failed, at once
            group.verify([VerifyCall("later", 0, [1, 2, 3], SamplingParams())])
    finally:
        group.close()


def test_hung_rank_times_out_instead_of_hanging(target):
    group = TPVerifierGroup(target[1], 2, max_slots=8, max_seq_len=200, collective_timeout_s=2)
    try:
        error, elapsed = _fail_mid_generation(group, signal.SIGSTOP)
        assert error.rank == 1 and "rank 1" in str(error)
        assert elapsed < 15
    finally:
        group.close()  # SIGKILL ends a stopped process too
    assert all(w.process.exitcode is not None for w in group._pool.workers)


def test_worker_that_cannot_load_its_shard_is_named(target):
    model = tiny_llama(0)
    model.register_buffer("unexpected", torch.zeros(1))  # loads here, not in a worker
    start = time.monotonic()
    with pytest.raises(TPGroupError, match=r"rank 1 failed to start: .*unexpected") as info:
        TPVerifierGroup(model, 2, max_slots=2, max_seq_len=32)
    assert info.value.rank == 1 and time.monotonic() - start < 60


def test_config_tp_size_builds_a_group(tiny_zoo):
    """`verifier.tp_size: 2` in a config gives a TP group whose greedy output is the target's."""
    import dataclasses

    from specfleet.core.config import load_config
    from specfleet.engine.builder import build_engine
    from specfleet.models.loading import load_causal_lm, load_tokenizer

    base = load_config("configs/tiny.yaml")
    cfg = dataclasses.replace(base, verifier=dataclasses.replace(base.verifier, tp_size=2))
    engine = build_engine(cfg)
    try:
        assert isinstance(engine.verifier, TPVerifierGroup)
        tokenizer = load_tokenizer("zoo:tiny/target")
        prompt = tokenizer("def main(argv):\n    ")["input_ids"]
        (out,) = engine.generate([prompt], SamplingParams(max_new_tokens=12, ignore_eos=True),
                                 drafter="general")
        hf = load_causal_lm("zoo:tiny/target")
        with torch.no_grad():
            expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, min_new_tokens=12,
                                   do_sample=False, pad_token_id=1)[0, len(prompt):].tolist()
        assert out.token_ids == expected
    finally:
        engine.verifier.close()


def test_seeded_sampling_through_grpc_is_the_same_at_tp1_and_tp2(tiny_zoo):
    """The API path: the same seeded request gives the same tokens from a TP=1 and a
    TP=2 deployment of the tiny zoo, with and without speculation."""
    import asyncio
    import dataclasses

    from specfleet.core.config import load_config
    from specfleet.proto.client import Client
    from specfleet.router.server import ServerThread, load_tokenizer, make_backend

    base = load_config("configs/tiny.yaml")
    kwargs = dict(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=4242)
    prompt = "def main(argv):\n    "
    results = {}
    for tp in (1, 2):
        cfg = dataclasses.replace(base, verifier=dataclasses.replace(base.verifier, tp_size=tp))
        backend = make_backend(cfg, "inprocess")
        try:
            with ServerThread(backend, load_tokenizer(cfg), cfg.server) as server:
                with Client(server.address, timeout=120) as client:
                    results[tp] = [client.generate(prompt, drafter="general", **kwargs).token_ids,
                                   client.generate(prompt, speculate=False, **kwargs).token_ids]
        finally:
            asyncio.run(backend.close())
            if tp == 2:
                backend.engine.verifier.close()
    assert results[1][0] == results[1][1] == results[2][0] == results[2][1]
