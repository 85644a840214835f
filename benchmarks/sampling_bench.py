"""Sampled speculation: the keyed (coupled) rule vs the rejection rule vs greedy drafts.

``python -m specfleet.benchmarks.sampling_bench --zoo small --target target``

Each domain's specialist drafts for held-out prompts of its domain, batch 1, window
4, EOS ignored; for each temperature, three ways to speculate on a sampled request:

- ``coupled``: what SpecFleet runs. The drafter draws from its q with the same
  position-keyed noise the verifier uses for p; the verifier accepts a draft iff it is
  the target's keyed choice (``accept_keyed``). Output: a function of the seed.
- ``rejection``: the textbook rule (SpecInfer/Leviathan): the drafter samples from q
  with its own stream and ships q; the verifier accepts with min(1, p/q) from its own
  sequential stream (``accept_sampled``). Exact in distribution, but the output
  depends on the drafts. Built here from subclasses: no request path serves it.
- ``greedy-drafts``: the drafter proposes its argmax; the keyed verifier checks it.

Reports mean acceptance length (tokens per verify round, counting the target's
own token) and tokens/s, medians over ``--runs``, per domain and temperature.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from specfleet.benchmarks.engine_bench import heldout_prompts, machine_description
from specfleet.core.sampling import make_generator, sample
from specfleet.core.types import SamplingParams
from specfleet.drafters.model_drafter import ModelDrafter
from specfleet.policy.domains import DOMAINS
from specfleet.verifiers.acceptance import accept_sampled
from specfleet.verifiers.verifier import Verifier

RULES = ("coupled", "rejection", "greedy-drafts")


class RejectionRuleVerifier(Verifier):
    """The rejection rule, for comparison: a sequential stream per request, q from the draft."""

    def __init__(self, runner):
        super().__init__(runner)
        self._streams: dict[int, torch.Generator] = {}

    def _accept(self, req, logits, proposal):
        if req.sampling.greedy:
            return super()._accept(req, logits, proposal)
        stream = self._streams.setdefault(id(req), make_generator(req.seed >> 1))
        q = None if proposal.draft_probs is None else torch.from_numpy(proposal.draft_probs)
        return accept_sampled(logits, proposal.tokens, proposal.parents, req.sampling, stream, q)


class IndependentDrafter(ModelDrafter):
    """Samples from q with a stream of its own and ships q (the rejection rule's drafter)."""

    ships_q = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._streams: dict[int, torch.Generator] = {}

    def draw(self, probs, seed, position):
        return sample(probs, self._streams.setdefault(seed, make_generator((seed >> 1) ^ 0x5EED)))


class GreedyDrafter(ModelDrafter):
    """Proposes its argmax even for sampled requests."""

    def draw(self, probs, seed, position):
        return int(torch.argmax(probs))


def run(zoo: str, target: str, temperatures: list[float], prompts_per_domain: int, max_new: int,
        window: int, runs: int) -> dict:
    from tqdm import tqdm

    from specfleet.engine.engine import SpecEngine
    from specfleet.models.llama_runner import LlamaRunner
    from specfleet.models.loading import load_causal_lm, load_tokenizer
    from specfleet.policy.draft_length import FixedDraftLength

    torch.set_num_threads(1)
    tokenizer = load_tokenizer(f"zoo:{zoo}/tokenizer")
    prompts = heldout_prompts(zoo, tokenizer, prompts_per_domain, 32)
    target_hf = load_causal_lm(f"zoo:{zoo}/{target}")
    drafters_hf = {d: load_causal_lm(f"zoo:{zoo}/drafter-{d}") for d in DOMAINS}
    verifier_cls = {"coupled": Verifier, "rejection": RejectionRuleVerifier, "greedy-drafts": Verifier}
    drafter_cls = {"coupled": ModelDrafter, "rejection": IndependentDrafter, "greedy-drafts": GreedyDrafter}
    report = {"machine": machine_description(), "zoo": zoo, "target": target, "window": window,
              "max_new_tokens": max_new, "prompts_per_domain": prompts_per_domain, "runs": runs,
              "results": []}
    total = len(temperatures) * len(DOMAINS) * len(RULES) * runs
    with tqdm(total=total, desc="sampling bench", unit="run") as progress:
        for temperature in temperatures:
            for domain in DOMAINS:
                for rule in RULES:
                    tps, mal = [], []
                    for r in range(runs):
                        verifier = verifier_cls[rule](LlamaRunner(target_hf, max_slots=1, max_seq_len=256))
                        drafter = drafter_cls[rule](LlamaRunner(drafters_hf[domain], max_slots=1, max_seq_len=256),
                                                    name=domain)
                        engine = SpecEngine(verifier, {domain: drafter}, draft_policy=FixedDraftLength(window),
                                            max_batch_size=1)
                        tokens, rounds, seconds = 0, 0, 0.0
                        for i, prompt in enumerate(prompts[domain]):
                            params = SamplingParams(temperature=temperature, max_new_tokens=max_new,
                                                    ignore_eos=True, seed=1000 * r + i)
                            start = time.perf_counter()
                            (out,) = engine.generate([prompt], params, drafter=domain)
                            seconds += time.perf_counter() - start
                            tokens += len(out.token_ids)
                            rounds += out.stats.rounds
                        tps.append(tokens / seconds)
                        mal.append(tokens / rounds)
                        progress.update(1)
                    report["results"].append({
                        "temperature": temperature, "domain": domain, "rule": rule,
                        "mean_acceptance_length": round(statistics.median(mal), 2),
                        "tokens_per_s": round(statistics.median(tps), 1),
                    })
    return report


def format_table(report: dict) -> str:
    lines = ["| T | domain | " + " | ".join(f"{r}: accept len, tok/s" for r in RULES) + " |",
             "|---|---|" + "---|" * len(RULES)]
    rows: dict[tuple, dict] = {}
    for row in report["results"]:
        rows.setdefault((row["temperature"], row["domain"]), {})[row["rule"]] = row
    for (t, domain), by_rule in rows.items():
        cells = [f"{by_rule[r]['mean_acceptance_length']:.2f}, {by_rule[r]['tokens_per_s']:.1f}" for r in RULES]
        lines.append(f"| {t} | {domain} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="small", choices=["tiny", "small"])
    parser.add_argument("--target", default="target", choices=["target", "target-xl"])
    parser.add_argument("--temperatures", default="0.7,1.0")
    parser.add_argument("--prompts", type=int, default=3, help="held-out prompts per domain")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--draft-length", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    report = run(args.zoo, args.target, [float(t) for t in args.temperatures.split(",")], args.prompts,
                 args.max_new_tokens, args.draft_length, args.runs)
    print(report["machine"])
    print(format_table(report))
    if args.json:
        with open(args.json, "w") as f:
            f.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
