"""Tensor-parallel sharding, simulated in one process: no workers, no torch.distributed.

The row-parallel layers' partial outputs must sum to the unsharded output (TGI's CPU
check), a whole runner split over threads must reproduce the unsharded logits through
trees, compaction and truncation, and models that cannot be split must be refused
with a message naming the dimension.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from specfleet.models.llama_runner import (
    ForwardItem,
    LlamaRunner,
    TensorParallelError,
    UnsupportedModelError,
    _apply_rope,
    shard_layer,
)
from specfleet.verifiers.tensor_parallel import TPGroupError, _Worker, _WorkerPool, rank_devices

torch.set_num_threads(1)


def tiny_llama(seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = dict(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    cfg.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**cfg)).eval()


def tiny_qwen2(seed=1):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )).eval()


class ThreadGroup:
    """``size`` ranks on threads of this process; ``allreduce`` sums through a barrier,
    in rank order, so every rank gets bit-identical results (as gloo gives)."""

    def __init__(self, size: int):
        self._size = size
        self._barrier = threading.Barrier(size, timeout=30)
        self._parts: list[torch.Tensor | None] = [None] * size

    def member(self, rank: int) -> _Member:
        return _Member(self, rank)


class _Member:
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self._rank = group, rank

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self.group._size

    def allreduce(self, tensors):
        (tensor,) = tensors
        g = self.group
        g._parts[self._rank] = tensor.clone()
        g._barrier.wait()
        total = g._parts[0].clone()
        for part in g._parts[1:]:
            total += part
        g._barrier.wait()  # nobody overwrites a part before everyone has summed
        tensor.copy_(total)
        return self

    def wait(self):
        return True


def run_ranks(runners, method, *args):
    """Call ``method`` on every rank's runner at once (collectives need all of them)."""
    with ThreadPoolExecutor(len(runners)) as pool:
        return [f.result() for f in [pool.submit(getattr(r, method), *args) for r in runners]]


# ---- row-parallel partial sums ---------------------------------------------------------
def _attention_partial(layer, x, n_heads, n_kv, head_dim, runner):
    """Causal self-attention of ``x`` [1, S, hidden] through ``layer``, up to o_proj."""
    seq = x.shape[1]
    q = F.linear(x, layer.q, layer.q_bias).view(1, seq, n_heads, head_dim)
    k = F.linear(x, layer.k, layer.k_bias).view(1, seq, n_kv, head_dim)
    v = F.linear(x, layer.v, layer.v_bias).view(1, seq, n_kv, head_dim)
    cos, sin = runner._rope(torch.arange(seq)[None])
    q, k = _apply_rope(q, k, cos, sin)
    attn = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
        enable_gqa=n_kv != n_heads,
    )  # [1, H, S, D]
    return F.linear(attn.transpose(1, 2).reshape(1, seq, n_heads * head_dim), layer.o)


@pytest.mark.parametrize(
    ("make_model", "size"),
    [
        (tiny_llama, 2),  # GQA: 2 q heads share each rank's one kv head
        (lambda: tiny_llama(num_attention_heads=8, num_key_value_heads=4), 4),
        (tiny_qwen2, 2),  # q/k/v biases split with their rows
    ],
    ids=["llama-tp2", "llama-tp4", "qwen2-bias-tp2"],
)
def test_row_parallel_partials_sum_to_unsharded(make_model, size):
    model = make_model()
    runner = LlamaRunner(model, max_slots=1, max_seq_len=16)
    heads, kv = runner.num_heads, runner.num_kv_heads
    torch.manual_seed(5)
    x = torch.randn(1, 6, model.config.hidden_size)  # [1, S, hidden]
    for layer in runner.layers:
        shards = [shard_layer(layer, r, size) for r in range(size)]
        assert shards[0].q.shape[0] == heads // size * runner.head_dim
        assert shards[0].k.shape[0] == kv // size * runner.head_dim
        assert shards[0].o.shape[1] == heads // size * runner.head_dim
        full = _attention_partial(layer, x, heads, kv, runner.head_dim, runner)
        parts = [_attention_partial(s, x, heads // size, kv // size, runner.head_dim, runner)
                 for s in shards]
        torch.testing.assert_close(sum(parts), full, atol=1e-5, rtol=1e-5)

        def mlp(w):
            return F.linear(F.silu(F.linear(x, w.gate)) * F.linear(x, w.up), w.down)

        torch.testing.assert_close(sum(mlp(s) for s in shards), mlp(layer), atol=1e-5, rtol=1e-5)


# ---- a whole sharded runner, ranks on threads ------------------------------------------
def test_threaded_tp2_runner_matches_unsharded():
    model = tiny_llama()
    full = LlamaRunner(model, max_slots=4, max_seq_len=64)
    group = ThreadGroup(2)
    ranks = [LlamaRunner(model, max_slots=4, max_seq_len=64, tp_group=group.member(r))
             for r in range(2)]
    # Each rank's KV cache holds only its own kv heads.
    assert ranks[0].k_cache[0].shape == (4, 64, 1, full.head_dim)
    assert full.k_cache[0].shape == (4, 64, 2, full.head_dim)

    def step(method, *args):
        expected = getattr(full, method)(*args)
        got = run_ranks(ranks, method, *args)
        if method == "forward":
            for exp, rank0, rank1 in zip(expected, *got):
                torch.testing.assert_close(rank0, exp, atol=1e-5, rtol=1e-5)
                assert torch.equal(rank0, rank1)  # the all-reduce gives every rank the same sum

    for rid in ("a", "b"):
        step("allocate", rid)
    step("forward", [ForwardItem("a", [3, 1, 4, 1], logit_rows=[]), ForwardItem("b", [9, 2, 6])])
    # a tree for a, a chain for b; then keep a non-first branch of a and roll b back
    step("forward", [ForwardItem("a", [5, 10, 20, 11, 21], [-1, 0, 0, 1, 2]),
                     ForwardItem("b", [7, 8])])
    step("compact", "a", 4, [0, 2, 4])
    step("truncate", "b", 4)
    step("forward", [ForwardItem("a", [33]), ForwardItem("b", [12, 13])])
    assert [r.length("a") for r in ranks] == [full.length("a")] * 2 == [8, 8]


def test_world_size_one_does_nothing():
    model = tiny_llama()
    runner = LlamaRunner(model, max_slots=1, max_seq_len=8, tp_group=ThreadGroup(1).member(0))
    assert runner.tp_group is None and runner.tp_size == 1
    assert runner.layers[0].q is model.model.layers[0].self_attn.q_proj.weight


# ---- what cannot be split ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "size", "dimension"),
    [
        ({}, 3, r"num_attention_heads \(4\)"),
        ({"num_attention_heads": 8, "num_key_value_heads": 2}, 4, r"num_key_value_heads \(2\)"),
        ({"intermediate_size": 65}, 2, r"intermediate_size \(65\)"),
    ],
)
def test_unsplittable_model_is_refused(overrides, size, dimension):
    model = tiny_llama(**overrides)
    with pytest.raises(TensorParallelError, match=dimension):
        LlamaRunner(model, max_slots=1, max_seq_len=8, tp_group=ThreadGroup(size).member(0))


def test_unsupported_architecture_is_refused_before_sharding():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2))
    with pytest.raises(UnsupportedModelError, match="gpt2"):
        LlamaRunner(gpt2, max_slots=1, max_seq_len=8, tp_group=ThreadGroup(2).member(0))


def test_group_refuses_before_spawning(tmp_path):
    from specfleet.verifiers.tensor_parallel import TPVerifierGroup

    model = tiny_llama()
    with pytest.raises(TensorParallelError, match="num_attention_heads"):
        TPVerifierGroup(model, 3, max_slots=1, max_seq_len=8)
    with pytest.raises(ValueError, match="devices"):
        TPVerifierGroup(model, 2, max_slots=1, max_seq_len=8, devices=["cpu"])


def test_rank_devices_from_one_config_device():
    assert rank_devices("cpu", 2) == ("cpu", "cpu")
    assert rank_devices("cuda", 2) == ("cuda:0", "cuda:1")
    assert rank_devices("cuda:2", 2) == ("cuda:2", "cuda:3")


# ---- rank 0's view of its workers, with stand-ins for processes and pipes ---------------
class _FakeProcess:
    def __init__(self, exitcode=None):
        self.exitcode, self.pid = exitcode, 4242

    def is_alive(self):
        return self.exitcode is None

    def kill(self):
        self.exitcode = -9

    def join(self, timeout=None):
        pass


def _silent_pipe():
    """A real pipe whose other end never answers."""
    ours, theirs = multiprocessing.Pipe()
    _silent_pipe.keep.append(theirs)  # stays open: silence, not a closed pipe
    return ours


_silent_pipe.keep = []


def test_mute_worker_is_an_error_not_a_hang():
    pool = _WorkerPool([_Worker(1, _FakeProcess(), _silent_pipe())], reply_timeout_s=0.2)
    start = time.monotonic()
    with pytest.raises(TPGroupError, match="rank 1 .* did not answer within 0.2s") as info:
        pool.replies()
    assert info.value.rank == 1 and time.monotonic() - start < 2
    with pytest.raises(TPGroupError, match="unusable"):  # the group stays failed
        pool.send(("run", []))


def test_dead_worker_is_named():
    pool = _WorkerPool([_Worker(1, _FakeProcess(), _silent_pipe()),
                        _Worker(2, _FakeProcess(exitcode=-9), _silent_pipe())], reply_timeout_s=5)
    with pytest.raises(TPGroupError, match=r"rank 2 \(pid 4242\) was killed by SIGKILL"):
        pool.send(("run", []))
