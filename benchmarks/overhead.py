"""Measure what the actor path adds per round compared with the in-process engine.

Where it sits: offline, outside any request path (docs/deployment.md quotes its
numbers). The same workload — same config, same prompts, greedy, exact outputs
checked equal — runs through ``SpecEngine`` in this process and through
the same engine driver over the Ray executor; per round we record wall time and the actors'
own compute time, so

- ``overhead = actor round wall − in-actor compute on the critical path`` (calls,
  serialisation, scheduling: what the runtime costs), and
- ``added = actor round wall − in-process round wall`` (what a user sees).

A second run with no-compute fakes (``testing.FakeDrafter``/``FakeVerifier``) gives
the pure control cost of a round.
Run: ``python -m specfleet.benchmarks.overhead [--mode compiled|chained|sequential] [--fake]``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

from specfleet.cluster.actors import DrafterFactory, VerifierFactory
from specfleet.cluster.runtime import RayRuntime, connect
from specfleet.core.config import SpecFleetConfig, load_config
from specfleet.core.types import SamplingParams
from specfleet.engine.engine import SpecEngine
from specfleet.policy.draft_length import FixedDraftLength

logger = logging.getLogger(__name__)


def _prompts(n: int, length: int) -> list[list[int]]:
    return [[(7 * i + 3 * j) % 90 + 5 for j in range(length)] for i in range(n)]


def _drive(engine, prompts, sampling, drafters: list[str | None]) -> tuple[list, list[int], float]:
    """Submit one request per prompt (drafters assigned round-robin) and step to the end."""
    for i, p in enumerate(prompts):
        engine.submit(p, sampling, drafter=drafters[i % len(drafters)])
    outputs, rounds = [], []
    start = time.perf_counter()
    while engine.has_work:
        t = time.perf_counter_ns()
        outputs += engine.step()
        rounds.append(time.perf_counter_ns() - t)
    return outputs, rounds, time.perf_counter() - start


def _ms(ns_values) -> float:
    return round(statistics.median(ns_values) / 1e6, 3) if ns_values else 0.0


def measure(cfg: SpecFleetConfig, *, drafters: list[str | None], batch: int = 4, max_new: int = 32,
            repeats: int = 3, mode: str = "compiled", fake: bool = False) -> dict:
    """Run the workload in-process and over actors; return medians in ms and tokens/s."""
    import torch

    torch.set_num_threads(1)
    window = cfg.scheduler.draft_length
    sampling = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    prompts = _prompts(batch, 12)
    if fake:
        from specfleet.testing.cluster_rigs import FakeDrafter, FakeVerifier

        dfac = {d.name: FakeDrafter for d in cfg.drafters}
        vfac = FakeVerifier
    else:
        from specfleet.engine.builder import with_context_length

        cfg = with_context_length(cfg)
        dfac = {d.name: DrafterFactory(d, cfg.models.target, cfg.verifier.max_batch_size, cfg.verifier.max_seq_len)
                for d in cfg.drafters}
        vfac = VerifierFactory(cfg)

    local = SpecEngine(vfac(), {n: f() for n, f in dfac.items()}, draft_policy=FixedDraftLength(window),
                       max_batch_size=cfg.verifier.max_batch_size)
    runtime = RayRuntime(cfg, drafter_factories=dfac, verifier_factory=vfac,
                         concurrent_drafts=mode != "sequential", compiled_graph=mode == "compiled")
    runtime.scheduler.draft_length = FixedDraftLength(window)
    # This measures what a round costs on each path, not when serving picks one: let
    # even short requests compile the graph.
    runtime.executor.compile_min_rounds_left = 0
    result = {"fake": fake, "mode": mode, "drafters": drafters, "batch": batch,
              "max_new_tokens": max_new, "window": window}
    try:
        for name, engine in (("inprocess", local), ("actors", runtime.engine)):
            _drive(engine, prompts, sampling, drafters)  # warm-up (builds the compiled graph)
            if name == "actors":
                runtime.engine.timings.clear()
            rounds, secs, tokens, outs = [], 0.0, 0, None
            for _ in range(repeats):
                outputs, r, s = _drive(engine, prompts, sampling, drafters)
                rounds += r
                secs += s
                tokens += sum(len(o.token_ids) for o in outputs)
                outs = sorted((o.prompt, o.token_ids) for o in outputs)
            result[name] = {"round_ms": _ms(rounds), "rounds": len(rounds),
                            "tokens_per_s": round(tokens / secs, 1)}
            result.setdefault("outputs", []).append(outs)
        runtime.engine.idle()
        result["actors"]["compiled_rounds"] = runtime.executor.compiled_rounds
        t = list(runtime.engine.timings)
        result["actors"]["overhead_ms"] = _ms([x.overhead_ns for x in t])
        result["actors"]["compute_ms"] = _ms([x.draft_compute_ns + x.verify_compute_ns for x in t])
        result["added_ms"] = round(result["actors"]["round_ms"] - result["inprocess"]["round_ms"], 3)
        outs = result.pop("outputs")
        result["exact"] = outs[0] == outs[1]
    finally:
        runtime.shutdown()
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="config file; default: tiny random models in a temp dir")
    parser.add_argument("--drafters", default="self", help="comma list assigned round-robin; 'none' = no drafter")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", choices=["compiled", "chained", "sequential"], default="compiled",
                        help="compiled: steady rounds as a Ray compiled graph; chained: plain calls, "
                        "drafter results passed straight to the verify call; sequential: one call "
                        "after another, the driver waiting for each")
    parser.add_argument("--fake", action="store_true", help="no-compute fakes: pure control overhead")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    drafters = [None if d == "none" else d for d in args.drafters.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        if args.config:
            cfg = load_config(args.config)
        else:
            from specfleet.testing.cluster_rigs import (
                tiny_config_dict,
                write_config,
                write_tiny_models,
            )

            cfg = load_config(write_config(f"{tmp}/cfg.yaml", tiny_config_dict(write_tiny_models(tmp))))
        import ray

        connect(cfg.cluster)
        try:
            print(measure(cfg, drafters=drafters, batch=args.batch, max_new=args.max_new_tokens,
                          repeats=args.repeats, mode=args.mode, fake=args.fake))
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
