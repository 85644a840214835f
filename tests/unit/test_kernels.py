"""Kernel paths of the runner (models/kernels.py): same logits, exact greedy output, no checkpoint change."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from specfleet.core.config import VerifierConfig
from specfleet.drafters.model_drafter import ModelDrafter
from specfleet.drafters.ngram import NgramDrafter
from specfleet.engine.engine import SpecEngine
from specfleet.models import kernels
from specfleet.models.llama_runner import ForwardItem, LlamaRunner
from specfleet.policy.draft_length import FixedDraftLength
from specfleet.verifiers.verifier import Verifier

torch.set_num_threads(1)
needs_mkldnn = pytest.mark.skipif(not kernels.available("mkldnn"), reason="no oneDNN linear in this torch")
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9, 10], [11, 12, 13, 14, 15], [40, 41, 40, 41]]


def tiny_llama(seed: int, layers: int = 2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=None, bos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def target():
    return tiny_llama(0)


def hf_greedy(model, prompt, n):
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@needs_mkldnn
def test_packed_linear_rows_are_batch_invariant():
    torch.manual_seed(0)
    w, b = torch.randn(96, 48), torch.randn(96)
    packed = kernels.MkldnnLinear(w, b)
    assert kernels.batch_invariant(packed, 48)
    x = torch.randn(3, 5, 48)
    torch.testing.assert_close(packed(x), torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5)


@needs_mkldnn
def test_mkldnn_runner_matches_default_logits(target):
    runs = {}
    for kernel in ("default", "mkldnn"):
        r = LlamaRunner(target, max_slots=3, max_seq_len=64, kernel=kernel)
        assert r.kernel == kernel
        for rid in "abc":
            r.allocate(rid)
        prefill = r.forward([ForwardItem(rid, p) for rid, p in zip("abc", PROMPTS)])
        chains = r.forward([ForwardItem("a", [20, 21]), ForwardItem("b", [30])])
        tree = r.forward([ForwardItem("c", [5, 6, 7, 8], parents=[-1, -1, 0, 1])])
        runs[kernel] = [*prefill, *chains, *tree]
    for got, want in zip(runs["mkldnn"], runs["default"]):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_mkldnn
@pytest.mark.parametrize("threads", [1, 2])
def test_mkldnn_logits_are_bit_identical_however_tokens_are_batched(threads):
    """A token's logits: decoded alone == verified in a chain == in a tree == batched
    with another request == prefilled in a ragged batch, bit for bit."""
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(3)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)).eval()
        r = LlamaRunner(model, max_slots=4, max_seq_len=128, kernel="mkldnn")
        prompt, chunk = list(range(1, 30)), [5, 9, 11, 40, 2]
        r.allocate("a")
        r.forward([ForwardItem("a", prompt, logit_rows=[])])
        decoded = torch.cat([r.forward([ForwardItem("a", [t])])[0] for t in chunk])
        r.truncate("a", len(prompt))
        assert torch.equal(r.forward([ForwardItem("a", chunk)])[0], decoded)
        r.allocate("b")
        r.forward([ForwardItem("b", [3, 4, 5, 6, 7, 8, 9, 10, 11], logit_rows=[])])
        r.truncate("a", len(prompt))
        batched = r.forward([ForwardItem("b", [1, 2, 3]), ForwardItem("a", chunk)])[1]
        assert torch.equal(batched, decoded)
        r.truncate("a", len(prompt))  # a tree whose second branch holds chunk[:3]
        tree = r.forward([ForwardItem("a", [77, chunk[0], chunk[1], 3, chunk[2]], parents=[-1, -1, 1, 0, 2])])
        assert torch.equal(tree[0][[1, 2, 4]], decoded[:3])
        fresh = LlamaRunner(model, max_slots=2, max_seq_len=128, kernel="mkldnn")
        fresh.allocate("x")
        fresh.allocate("a")
        ragged = fresh.forward([ForwardItem("x", [8] * 40), ForwardItem("a", prompt + chunk)])[1]
        assert torch.equal(ragged[len(prompt):], decoded)
    finally:
        torch.set_num_threads(1)


@needs_mkldnn
def test_packing_leaves_the_hf_model_unchanged(target):
    before = {k: v.clone() for k, v in target.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in target.state_dict().items()}
    LlamaRunner(target, max_slots=1, max_seq_len=16, kernel="mkldnn")
    for k, v in target.state_dict().items():
        assert v.data_ptr() == ptrs[k] and torch.equal(v, before[k]), k


@needs_mkldnn
@pytest.mark.parametrize("window", [1, 3, 5])
def test_mkldnn_engine_greedy_equals_hf_generate(target, window):
    drafter_model = tiny_llama(1, layers=1)
    verifier = Verifier(LlamaRunner(target, max_slots=4, max_seq_len=200, kernel="mkldnn"))
    drafters = {"m": ModelDrafter(LlamaRunner(drafter_model, max_slots=4, max_seq_len=220, kernel="mkldnn"),
                                  name="m"), "ngram": NgramDrafter(name="ngram")}
    from specfleet.core.types import SamplingParams

    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    want = [hf_greedy(target, p, 24) for p in PROMPTS]
    for drafter in ("m", "ngram", None):
        engine = SpecEngine(verifier, drafters, draft_policy=FixedDraftLength(window), max_batch_size=4)
        got = [o.token_ids for o in engine.generate(PROMPTS, params, drafter=drafter)]
        assert got == want, drafter


@needs_mkldnn
def test_biases_go_through_the_packed_path():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(2)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )).eval()
    default = LlamaRunner(model, max_slots=1, max_seq_len=32)
    packed = LlamaRunner(model, max_slots=1, max_seq_len=32, kernel="mkldnn")
    assert model.model.layers[0].self_attn.q_proj.bias is not None
    outs = []
    for r in (default, packed):
        r.allocate("a")
        outs.append(r.forward([ForwardItem("a", PROMPTS[0])])[0])
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


def test_resolve_kernel():
    assert kernels.resolve_kernel("default", torch.float32, "cpu") == "default"
    expected = "mkldnn" if kernels.available("mkldnn") else "default"
    assert kernels.resolve_kernel("auto", torch.float32, "cpu") == expected
    assert kernels.resolve_kernel("auto", torch.float32, "cuda") == "default"
    with pytest.raises(kernels.KernelUnavailableError):
        kernels.resolve_kernel("fast", torch.float32, "cpu")
    with pytest.raises(kernels.KernelUnavailableError):
        kernels.resolve_kernel("mkldnn", torch.float32, "cuda")
    if not kernels.available("mkldnn", torch.bfloat16):  # e.g. AVX2-only CPUs
        assert kernels.resolve_kernel("auto", torch.bfloat16, "cpu") == "default"


def test_config_kernel_key():
    assert VerifierConfig().kernel == "default"
    assert VerifierConfig(kernel="auto", tp_size=2).kernel == "auto"
    with pytest.raises(ValueError, match="mkldnn"):
        VerifierConfig(kernel="mkldnn", tp_size=2)
    with pytest.raises(ValueError, match="mkldnn"):
        VerifierConfig(kernel="mkldnn", device="cuda")
