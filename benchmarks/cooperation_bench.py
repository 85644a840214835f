"""Which cooperation pays here: CoSine's per-step variant or tree fusion of parallel drafts.

Run: ``python -m specfleet.benchmarks.cooperation_bench [--runs 3] [--zoo small] [--json FILE]``.

Where it sits: a side measurement for issue 14, on the in-process engine and the small
zoo (``target-xl``, the four model drafters as the cooperating members). Arms, batch 1,
the same mixed held-out prompts, outputs checked against the target's greedy tokens:

- ``single:general``: the best single drafter of ``bench fleet``;
- ``fused``: every member drafts its window in parallel, the verifier fuses the
  proposals into one tree (``policy/fusion.py``; learned router, all members cooperating);
- ``per-step``: ``drafters/cooperative_step.py`` — every draft token is the members'
  most confident guess, fed back to all of them before the next one.

Per-step cooperation makes ``window`` rounds of member calls where fusion makes one;
in one process a call costs microseconds, between Ray actors a plain call costs
0.55–2 ms (docs/deployment.md). The report gives the in-process figures and the
per-round call count, from which the actor cost follows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from specfleet.benchmarks.fleet_bench import MODEL_DRAFTERS, FleetBench, FleetSettings
from specfleet.drafters.cooperative_step import StepCooperativeDrafter
from specfleet.policy.draft_length import FixedDraftLength
from specfleet.policy.learned_routing import LearnedRouter
from specfleet.policy.routing import DrafterProfile
from specfleet.policy.speculation_width import SpeculationWidth


def _engine(bench: FleetBench, drafters: dict, router=None, width: int = 1):
    from specfleet.engine.engine import SpecEngine
    from specfleet.models.llama_runner import LlamaRunner
    from specfleet.verifiers.verifier import Verifier

    verifier = Verifier(LlamaRunner(bench.target_hf, max_slots=1, max_seq_len=bench.max_seq_len),
                        decode=bench._decode)
    return SpecEngine(verifier, drafters, draft_policy=FixedDraftLength(bench.s.window), router=router,
                      width=SpeculationWidth(max_width=width, batch_node_budget=4 * bench.s.window * width),
                      max_batch_size=1)


def _measure(bench: FleetBench, engine, arm: str, drafter: str | None) -> dict:
    tokens = rounds = emitted = 0
    draft_ns = 0
    engine.timings.clear()
    start = time.perf_counter()
    for _, prompt in bench.measured:
        rid = engine.submit(prompt, bench.params, drafter=drafter, route=drafter is None)
        out = None
        while engine.has_work:
            for o in engine.step():
                if o.request_id == rid:
                    out = o
        bench._check(prompt, out.token_ids, arm)
        tokens += len(out.token_ids)
        rounds += out.stats.rounds
        emitted += out.stats.emitted
    wall = time.perf_counter() - start
    draft_ns = sum(t.draft_compute_ns for t in engine.timings)
    return {"tokens_per_s": tokens / wall, "accepted_per_verify": emitted / rounds,
            "draft_ms_per_round": draft_ns / max(1, len(engine.timings)) / 1e6}


def run(runs: int, zoo: str = "small") -> dict:
    bench = FleetBench(FleetSettings(zoo=zoo, prompts_per_domain=3))
    members = {n: bench._model_drafters[n] for n in MODEL_DRAFTERS}
    per_run: dict[str, list[dict]] = {"single:general": [], "fused": [], "per-step": []}
    for _ in range(runs):
        per_run["single:general"].append(_measure(bench, _engine(bench, members), "single", "general"))
        router = LearnedRouter([DrafterProfile(n, d) for n, d in MODEL_DRAFTERS.items()], decode=bench._decode,
                               classify=bench.classifier, cooperate_ratio=0.0)
        bench.warm(_engine(bench, members, router, len(members)))
        per_run["fused"].append(_measure(bench, _engine(bench, members, router, len(members)), "fused", None))
        coop = StepCooperativeDrafter(members, max_draft_tokens=bench.s.window)
        per_run["per-step"].append(_measure(bench, _engine(bench, {"per-step": coop}), "per-step", "per-step"))
    arms = {a: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for a, rs in per_run.items()}
    window = bench.s.window
    return {
        "arms": arms,
        "member_calls_per_round": {"fused": len(members), "per-step": window * len(members)},
        "sequential_call_rounds_per_round": {"fused": 1, "per-step": window},
        "per_step_vs_fused_tokens_per_s": arms["per-step"]["tokens_per_s"] / arms["fused"]["tokens_per_s"],
        "settings": {"runs": runs, "window": window, "max_new_tokens": bench.s.max_new_tokens,
                     "prompts": len(bench.measured), "target": bench.s.target},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--zoo", default="small", choices=["tiny", "small"])
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    report = run(args.runs, args.zoo)
    print("| arm | tokens/s | accepted/verify | draft ms/round |\n|---|---|---|---|")
    for arm, v in report["arms"].items():
        print(f"| {arm} | {v['tokens_per_s']:.1f} | {v['accepted_per_verify']:.2f} | {v['draft_ms_per_round']:.2f} |")
    print(f"per-step / fused tokens/s: {report['per_step_vs_fused_tokens_per_s']:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
