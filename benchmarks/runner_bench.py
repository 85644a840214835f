"""Why a lean runner: one decode step, HF modules + DynamicCache vs ``LlamaRunner``.

Where it sits: offline; backs the choice documented in ``models/llama_runner.py``.
Run: ``python -m specfleet.benchmarks.runner_bench`` (random weights of the zoo's
``small`` target and ``target-xl`` shapes; timings are medians, interleaved).
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from specfleet.models.llama_runner import ForwardItem, LlamaRunner

SHAPES = {
    "small-target (h192 x4)": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=3,
                                   num_key_value_heads=3, intermediate_size=512),
    "target-xl (h768 x24)": dict(hidden_size=768, num_hidden_layers=24, num_attention_heads=12,
                                 num_key_value_heads=12, intermediate_size=2560),
}


def bench(shape: dict, context: int = 96, steps: int = 15) -> dict:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=4096, max_position_embeddings=512, **shape)).eval()
    prompt = torch.randint(0, 4096, (1, context))
    runner = LlamaRunner(model, max_slots=1, max_seq_len=context + 2 * steps + 8)
    runner.allocate("r")
    runner.forward([ForwardItem("r", prompt[0].tolist(), logit_rows=[])])
    cache = DynamicCache()
    with torch.inference_mode():
        model(prompt, past_key_values=cache, use_cache=True)
    hf, ours = [], []
    for step in range(steps):
        token = torch.tensor([[step + 1]])
        with torch.inference_mode():
            start = time.perf_counter()
            model(token, past_key_values=cache, use_cache=True)
            hf.append(time.perf_counter() - start)
        start = time.perf_counter()
        runner.forward([ForwardItem("r", [step + 1])])
        ours.append(time.perf_counter() - start)
    return {"hf_ms": 1e3 * statistics.median(hf), "ours_ms": 1e3 * statistics.median(ours)}


def verify_cost(shape: dict, context: int = 96, repeats: int = 7) -> dict[int, float]:
    """Forward time (ms) by number of tokens fed: what a verify step of γ+1 tokens costs."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=4096, max_position_embeddings=512, **shape)).eval()
    runner = LlamaRunner(model, max_slots=1, max_seq_len=context + 16)
    runner.allocate("r")
    runner.forward([ForwardItem("r", list(range(1, context + 1)), logit_rows=[])])
    costs = {}
    for n in (1, 2, 3, 5, 7, 9):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            runner.forward([ForwardItem("r", list(range(5, 5 + n)))])
            times.append(time.perf_counter() - start)
            runner.truncate("r", context)
        costs[n] = 1e3 * statistics.median(times)
    return costs


def main() -> None:
    torch.set_num_threads(1)
    print("| model shape | HF decode step (ms) | LlamaRunner decode step (ms) | ratio |")
    print("|---|---|---|---|")
    for name, shape in SHAPES.items():
        r = bench(shape)
        print(f"| {name} | {r['hf_ms']:.2f} | {r['ours_ms']:.2f} | {r['hf_ms'] / r['ours_ms']:.2f}x |")
    costs = verify_cost(SHAPES["target-xl (h768 x24)"])
    print("\ntarget-xl forward time by tokens fed (a verify step of γ+1 tokens):")
    print("| tokens | " + " | ".join(str(n) for n in costs) + " |")
    print("|---|" + "---|" * len(costs))
    print("| ms | " + " | ".join(f"{ms:.1f}" for ms in costs.values()) + " |")


if __name__ == "__main__":
    main()
