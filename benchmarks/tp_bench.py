"""Verify-step time of one target at TP=1 vs TP=2 (gloo, two processes, this machine).

Where it sits: offline, outside any request path; the numbers are in
docs/tensor_parallel.md. A verify step is ``Verifier.verify`` for a batch whose
every request feeds 1 pending token plus a 4-token draft chain (random drafts:
nearly always rejected, so each step commits one token and the cache grows by one),
i.e. one target forward of ``batch x 5`` tokens plus the accept rule, and for TP=2
the command round trip to the worker. TP=1 and TP=2 steps alternate, so both see
the same background load on a shared machine; TP=1 with two threads is timed
separately afterwards.

The speed-up column compares TP=2 with the faster TP=1 variant.

Run: ``.venv/bin/python -m specfleet.benchmarks.tp_bench --model random-small random-big``
(``zoo:small/target`` and any checkpoint directory are accepted as ``--model`` too).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

RANDOM_MODELS = {
    # name: (hidden, layers, heads, kv_heads, intermediate, vocab)
    "random-small": (256, 4, 8, 4, 688, 8192),
    "random-big": (1024, 8, 16, 8, 2816, 8192),
}


def _checkpoint(name: str, tmp: Path) -> tuple[str, str]:
    """A checkpoint directory or zoo spec for ``name``, and how to describe it."""
    if name not in RANDOM_MODELS:
        return name, name
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, heads, kv, inter, vocab = RANDOM_MODELS[name]
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                         num_key_value_heads=kv, intermediate_size=inter, vocab_size=vocab,
                         max_position_embeddings=1024)
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    path = tmp / name
    model.save_pretrained(path)
    desc = (f"{name}: random Llama, hidden {hidden}, {layers} layers, {heads} heads / {kv} kv, "
            f"MLP {inter}, vocab {vocab}, {params:.0f}M params")
    return str(path), desc


def time_verify(variants, batch: int, steps: int, warmup: int, draft: int, seed: int = 0):
    """Median milliseconds of ``steps`` verify calls per variant, after ``warmup`` untimed.

    ``variants``: ``(verifier, torch_threads)`` pairs. Their steps are interleaved, one
    verify each in turn, so that all of them see the same background load (this machine
    is shared) instead of one variant getting a quiet minute and another a busy one.
    """
    from specfleet.core.types import DraftProposal, SamplingParams
    from specfleet.core.workers import VerifyCall

    gen = torch.Generator().manual_seed(seed)
    vocab = variants[0][0].runner.vocab_size
    params = SamplingParams(max_new_tokens=(steps + warmup) * len(variants) + 8)
    rids = [f"bench-{i}" for i in range(batch)]
    prompts = [torch.randint(0, vocab, (32,), generator=gen).tolist() for _ in rids]
    verifiers = list({id(v): v for v, _ in variants}.values())
    # Per verifier and request: (committed length told, tokens to tell next). The
    # first call prefills the prompt (a warm-up step, never timed: warmup >= 1).
    told = {id(v): {r: (0, list(p)) for r, p in zip(rids, prompts)} for v in verifiers}
    times: list[list[float]] = [[] for _ in variants]
    for step in range(warmup + steps):
        for k, (verifier, threads) in enumerate(variants):
            torch.set_num_threads(threads)
            proposals = [
                DraftProposal(r, torch.randint(0, vocab, (draft,), generator=gen).tolist(),
                              DraftProposal.chain_parents(draft), [0.5] * draft)
                for r in rids
            ]
            state = told[id(verifier)]
            calls = [VerifyCall(r, state[r][0], state[r][1], params, p) for r, p in zip(rids, proposals)]
            start = time.perf_counter()
            reply = verifier.verify(calls)
            for call, result in zip(calls, reply.results):
                state[call.request_id] = (call.position + len(call.new_tokens), result.emitted)
            if step >= warmup:
                times[k].append((time.perf_counter() - start) * 1e3)
    for verifier in verifiers:
        for r in rids:
            verifier.release(r)
    torch.set_num_threads(1)
    return [statistics.median(t) for t in times]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["random-small", "random-big"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--draft", type=int, default=4)
    args = parser.parse_args(argv)

    from specfleet.models.llama_runner import LlamaRunner
    from specfleet.models.loading import load_causal_lm
    from specfleet.verifiers.tensor_parallel import TPVerifierGroup
    from specfleet.verifiers.verifier import Verifier

    slots, seq = max(args.batch), 32 + 2 * (args.steps + args.warmup) + args.draft + 16
    print(f"{os.cpu_count()} cores, torch {torch.__version__}, load average "
          f"{os.getloadavg()[0]:.1f} at start; median of {args.steps} verify steps, "
          f"1 pending + {args.draft} draft tokens per request\n")
    print("| model | batch | TP=1, 1 thread | TP=1, 2 threads | TP=2, 1 thread/rank | TP=2 speed-up |")
    print("|---|---|---|---|---|---|")
    descriptions = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.model:
            path, desc = _checkpoint(name, Path(tmp))
            descriptions.append(desc)
            model = load_causal_lm(path)
            single = Verifier(LlamaRunner(model, max_slots=slots, max_seq_len=seq))
            del model
            torch.set_num_threads(1)  # rank 0's threads; the worker sets its own
            rows = {}
            with TPVerifierGroup(path, 2, max_slots=slots, max_seq_len=seq) as group:
                for b in args.batch:
                    rows[b] = time_verify([(single, 1), (group, 1)], b, args.steps,
                                          args.warmup, args.draft)
            # Apart: idle OpenMP threads of a 2-thread step spin on for a moment and
            # would steal a core from whatever step runs right after.
            for b in args.batch:
                rows[b] += time_verify([(single, 2)], b, args.steps, args.warmup, args.draft)
            for b in args.batch:
                t1, t2, t1x2 = rows[b]
                print(f"| {name} | {b} | {t1:.1f} ms | {t1x2:.1f} ms | {t2:.1f} ms "
                      f"| {min(t1, t1x2) / t2:.2f}x |")
    print("\n" + "\n".join(f"- {d}" for d in descriptions))
    print(f"\nload average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
