"""The runner and tensor-parallel groups on CUDA (skipped without it).

- One device, bf16: the engine's greedy tokens equal Hugging Face ``generate`` on the
  same bf16 weights, except where HF itself saw a near-tie (bf16 rounding may then
  pick either token, and the sequences legitimately part there).
- Two or more devices: a TP=2 group over NCCL emits exactly the TP=1 tokens, greedy
  and fixed-seed sampled.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specfleet.core.types import SamplingParams
from specfleet.drafters.model_drafter import ModelDrafter
from specfleet.engine.engine import SpecEngine
from specfleet.models.llama_runner import LlamaRunner
from specfleet.policy.draft_length import FixedDraftLength
from specfleet.verifiers.verifier import Verifier

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9, 10], [11, 12, 13, 14, 15], [40, 41, 42]]
NEAR_TIE = 0.125  # logit gap below which bf16 rounding may flip HF's own argmax


def random_llama(seed: int, layers: int = 4, hidden: int = 256, heads: int = 8, kv: int = 4):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=512, hidden_size=hidden, intermediate_size=2 * hidden + 176,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
        max_position_embeddings=512, eos_token_id=None, bos_token_id=None, pad_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


def engine_tokens(verifier, drafters, params, drafter=None):
    engine = SpecEngine(verifier, drafters, draft_policy=FixedDraftLength(4), max_batch_size=8)
    return [o.token_ids for o in engine.generate(PROMPTS, params, drafter=drafter)]


def test_bf16_runner_on_one_device_matches_hf_generate():
    device = "cuda:0"
    model = random_llama(0).to(device=device, dtype=torch.bfloat16)
    new = 24
    ours = engine_tokens(
        Verifier(LlamaRunner(model, max_slots=8, max_seq_len=128, device=device, dtype="bfloat16")),
        {"self": ModelDrafter(LlamaRunner(model, max_slots=8, max_seq_len=140, device=device,
                                          dtype="bfloat16"), name="self")},
        SamplingParams(max_new_tokens=new), drafter="self",
    )
    exact = 0
    for prompt, got in zip(PROMPTS, ours):
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=new,
                                 min_new_tokens=new, do_sample=False, pad_token_id=0,
                                 eos_token_id=None, output_logits=True,
                                 return_dict_in_generate=True)
        expected = out.sequences[0, len(prompt):].tolist()
        if got == expected:
            exact += 1
            continue
        step = next(i for i, (a, b) in enumerate(zip(got, expected)) if a != b)
        top2 = out.logits[step][0].float().topk(2).values
        gap = float(top2[0] - top2[1])
        assert gap < NEAR_TIE, f"prompt {prompt}: diverged at step {step} with HF's gap {gap:.3f}"
    assert exact >= len(PROMPTS) // 2, f"only {exact} of {len(PROMPTS)} prompts matched exactly"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_tp2_over_nccl_equals_tp1(tmp_path):
    from specfleet.verifiers.tensor_parallel import TPVerifierGroup

    model = random_llama(0, layers=2)
    model.save_pretrained(tmp_path)
    single = Verifier(LlamaRunner(model, max_slots=8, max_seq_len=128, device="cuda:0"))
    greedy = SamplingParams(max_new_tokens=20)
    sampled = [SamplingParams(temperature=0.8, top_k=50, max_new_tokens=20, seed=s)
               for s in range(len(PROMPTS))]

    def drafters():
        runner = LlamaRunner(random_llama(7, layers=1), max_slots=8, max_seq_len=140, device="cuda:0")
        return {"d": ModelDrafter(runner, name="d")}

    expected_greedy = engine_tokens(single, drafters(), greedy, "d")
    expected_sampled = engine_tokens(single, drafters(), sampled, "d")
    with TPVerifierGroup(tmp_path, 2, max_slots=8, max_seq_len=128,
                         devices=["cuda:0", "cuda:1"]) as group:
        assert engine_tokens(group, drafters(), greedy, "d") == expected_greedy
        assert engine_tokens(group, drafters(), sampled, "d") == expected_sampled
