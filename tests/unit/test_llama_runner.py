"""The lean runner reproduces Hugging Face's logits for chains, ragged batches and trees."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specfleet.models.llama_runner import ForwardItem, LlamaRunner, UnsupportedModelError

torch.set_num_threads(1)


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float()


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def make_runner(model, slots=4):
    return LlamaRunner(model, max_slots=slots, max_seq_len=64)


def test_prefill_matches_hf(model):
    runner = make_runner(model)
    tokens = [5, 17, 3, 88, 42, 7]
    runner.allocate("a")
    (logits,) = runner.forward([ForwardItem("a", tokens)])
    torch.testing.assert_close(logits, hf_logits(model, tokens), atol=1e-5, rtol=1e-5)
    assert runner.length("a") == len(tokens)


def test_incremental_ragged_batch_matches_hf(model):
    runner = make_runner(model)
    prompts = {"a": [1, 2, 3, 4, 5, 6, 7], "b": [9, 8], "c": [11, 12, 13, 14]}
    for rid in prompts:
        runner.allocate(rid)
    runner.forward([ForwardItem(rid, p, logit_rows=[]) for rid, p in prompts.items()])
    extra = {"a": [20, 21], "b": [30], "c": [40, 41, 42]}
    out = runner.forward([ForwardItem(rid, t) for rid, t in extra.items()])
    for (rid, new), logits in zip(extra.items(), out):
        full = prompts[rid] + new
        expected = hf_logits(model, full)[len(prompts[rid]) :]
        torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_truncate_then_continue_matches_hf(model):
    runner = make_runner(model)
    runner.allocate("a")
    runner.forward([ForwardItem("a", [1, 2, 3, 4], logit_rows=[])])
    runner.forward([ForwardItem("a", [50, 51, 52], logit_rows=[])])  # rejected drafts
    runner.truncate("a", 5)  # keep only the first of them
    (logits,) = runner.forward([ForwardItem("a", [60, 61])])
    expected = hf_logits(model, [1, 2, 3, 4, 50, 60, 61])[-2:]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


def test_tree_rows_match_each_branch_and_compact(model):
    runner = make_runner(model)
    runner.allocate("a")
    prefix = [3, 1, 4, 1, 5]
    runner.forward([ForwardItem("a", prefix[:-1], logit_rows=[])])
    # pending last prefix token, then a tree: 10 and 20 both follow it; 11 follows 10; 21 follows 20
    tokens = [prefix[-1], 10, 20, 11, 21]
    parents = [-1, 0, 0, 1, 2]
    (logits,) = runner.forward([ForwardItem("a", tokens, parents)])
    branch_a = hf_logits(model, prefix + [10, 11])
    branch_b = hf_logits(model, prefix + [20, 21])
    torch.testing.assert_close(logits[0], branch_a[4], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[1], branch_a[5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[3], branch_a[6], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[2], branch_b[5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[4], branch_b[6], atol=1e-5, rtol=1e-5)
    # accept branch b: keep pending token + nodes 20, 21 (item indices 0, 2, 4)
    runner.compact("a", 4, [0, 2, 4])
    assert runner.length("a") == 7
    (after,) = runner.forward([ForwardItem("a", [33])])
    expected = hf_logits(model, prefix + [20, 21, 33])[-1]
    torch.testing.assert_close(after[0], expected, atol=1e-5, rtol=1e-5)


def test_noncontiguous_slots_gather(model):
    runner = make_runner(model)
    for rid in ("a", "b", "c"):
        runner.allocate(rid)
    runner.free("b")
    runner.forward([ForwardItem("c", [7, 8, 9], logit_rows=[]), ForwardItem("a", [1, 2], logit_rows=[])])
    out = runner.forward([ForwardItem("c", [10]), ForwardItem("a", [3])])
    torch.testing.assert_close(out[0][0], hf_logits(model, [7, 8, 9, 10])[-1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1][0], hf_logits(model, [1, 2, 3])[-1], atol=1e-5, rtol=1e-5)


def test_qwen2_style_attention_bias():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(1)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )).eval()
    runner = make_runner(model)
    runner.allocate("a")
    (logits,) = runner.forward([ForwardItem("a", [1, 5, 9, 3])])
    torch.testing.assert_close(logits, hf_logits(model, [1, 5, 9, 3]), atol=1e-5, rtol=1e-5)


def test_errors(model):
    runner = make_runner(model, slots=1)
    runner.allocate("a")
    with pytest.raises(RuntimeError, match="slots"):
        runner.allocate("b")
    with pytest.raises(ValueError, match="max_seq_len"):
        runner.forward([ForwardItem("a", list(range(65)))])
    with pytest.raises(ValueError, match="parent"):
        runner.forward([ForwardItem("a", [1, 2], parents=[-1, 1])])


def test_unsupported_architecture():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(UnsupportedModelError, match="gpt2"):
        LlamaRunner(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2)), max_slots=1, max_seq_len=8)
