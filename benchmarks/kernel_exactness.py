"""``specfleet bench kernel-exactness``: divergence of greedy output per ``verifier.kernel`` path.

Where it sits: offline, outside any request path; the exactness evidence for the
kernel paths of models/kernels.py (docs/benchmarks.md, "Verify kernels on this CPU
(issue 21)"). For zoo targets and held-out prompts of every domain, fp32, greedy,
EOS ignored, it generates with:

- ``hf``: Hugging Face ``generate(do_sample=False)`` (default torch kernels) — the oracle;
- per path: ``ar``: our engine without a drafter, batch 1; ``spec``: our engine with the
  zoo's general drafter at window 4, batch 1; ``spec-batch``: the same with every prompt
  of the domain in one batch (ragged rows verified together).

A pair of outputs diverges at the first differing token (after which the contexts
differ, so one divergence per sequence is all that can be counted). For each
divergence against ``hf`` the oracle's top-1 minus top-2 logit at that position is
recorded: a near-tie flipped by rounding, or a real bug.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ExactnessSettings:
    targets: list[str] = field(default_factory=lambda: ["zoo:tiny/target", "zoo:small/target-xl"])
    kernels: list[str] = field(default_factory=lambda: ["default", "mkldnn"])
    prompts_per_domain: int = 3
    prompt_tokens: int = 48
    max_new_tokens: int = 128
    window: int = 4
    threads: int = 1


def _first_divergence(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def run_target(spec: str, s: ExactnessSettings, progress=None) -> dict:
    import transformers

    from specfleet.benchmarks.engine_bench import DOMAINS, heldout_prompts
    from specfleet.core.types import SamplingParams
    from specfleet.drafters.model_drafter import ModelDrafter
    from specfleet.engine.engine import SpecEngine
    from specfleet.models.llama_runner import LlamaRunner
    from specfleet.models.loading import load_causal_lm, load_tokenizer
    from specfleet.policy.draft_length import FixedDraftLength
    from specfleet.verifiers.verifier import Verifier

    transformers.logging.set_verbosity_error()
    zoo_size = spec.split(":")[1].split("/")[0]
    target = load_causal_lm(spec)
    drafter = load_causal_lm(f"zoo:{zoo_size}/drafter-general")
    tok = load_tokenizer(spec)
    prompts = heldout_prompts(zoo_size, tok, s.prompts_per_domain, s.prompt_tokens)
    n = s.max_new_tokens
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    seq_len = s.prompt_tokens + n + s.window + 8
    slots = s.prompts_per_domain

    outputs: dict[str, dict[tuple, list[int]]] = {"hf": {}}
    for domain in DOMAINS:
        for i, p in enumerate(prompts[domain]):
            with torch.inference_mode():
                out = target.generate(torch.tensor([p]), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=0)
            outputs["hf"][(domain, i)] = out[0, len(p):].tolist()
            if progress is not None:
                progress.update(1)
    for kernel in s.kernels:
        def engine(kernel=kernel):
            verifier = Verifier(LlamaRunner(target, max_slots=slots, max_seq_len=seq_len, kernel=kernel))
            d = ModelDrafter(LlamaRunner(drafter, max_slots=slots, max_seq_len=seq_len, kernel=kernel),
                             name="general")
            return SpecEngine(verifier, {"general": d}, draft_policy=FixedDraftLength(s.window),
                              max_batch_size=slots)
        for arm in ("ar", "spec", "spec-batch"):
            got = outputs.setdefault(f"{kernel}/{arm}", {})
            for domain in DOMAINS:
                if arm == "spec-batch":
                    results = engine().generate(prompts[domain], params, drafter="general")
                    for i, r in enumerate(results):
                        got[(domain, i)] = r.token_ids
                else:
                    for i, p in enumerate(prompts[domain]):
                        (r,) = engine().generate([p], params, drafter="general" if arm == "spec" else None)
                        got[(domain, i)] = r.token_ids
                if progress is not None:
                    progress.update(len(prompts[domain]))

    def margin(key: tuple, pos: int) -> float:
        domain, i = key
        ids = prompts[domain][i] + outputs["hf"][key][:pos]
        with torch.inference_mode():
            logits = target(torch.tensor([ids])).logits[0, -1].float()
        top = logits.topk(2).values
        return float(top[0] - top[1])

    pairs = [(f"{k}/spec", f"{k}/ar") for k in s.kernels] + [(f"{k}/spec-batch", f"{k}/ar") for k in s.kernels]
    pairs += [(f"{k}/{arm}", "hf") for k in s.kernels for arm in ("ar", "spec", "spec-batch")]
    comparisons = []
    for a, b in pairs:
        diverged, matched, margins = 0, 0, []
        for key, ref in outputs[b].items():
            pos = _first_divergence(outputs[a][key], ref)
            matched += len(ref) if pos is None else pos
            if pos is not None:
                diverged += 1
                if b == "hf":
                    margins.append(margin(key, pos))
        total = len(outputs[b])
        comparisons.append({"a": a, "b": b, "sequences": total, "diverged": diverged,
                            "tokens_compared": total * n, "tokens_before_divergence": matched,
                            "divergence_rate_per_sequence": diverged / total,
                            "oracle_top2_margins_at_divergence": margins})
    return {"target": spec, "sequences": len(outputs["hf"]), "tokens_per_sequence": n,
            "comparisons": comparisons}


def run(s: ExactnessSettings) -> dict:
    from tqdm import tqdm

    from specfleet.benchmarks.engine_bench import machine_description

    torch.set_num_threads(s.threads)
    per_target = 3 * s.prompts_per_domain * (1 + 3 * len(s.kernels))
    with tqdm(total=per_target * len(s.targets), desc="exactness", leave=False) as bar:
        results = [run_target(t, s, bar) for t in s.targets]
    return {"machine": machine_description(), "settings": s.__dict__, "targets": results}


def format_table(report: dict) -> str:
    lines = []
    for t in report["targets"]:
        lines.append(f"{t['target']}: {t['sequences']} sequences x {t['tokens_per_sequence']} tokens, fp32 greedy")
        for c in t["comparisons"]:
            m = ", ".join(f"{x:.2g}" for x in c["oracle_top2_margins_at_divergence"])
            lines.append(f"  {c['a']:<22} vs {c['b']:<12} diverged {c['diverged']}/{c['sequences']}, "
                         f"identical tokens {c['tokens_before_divergence']}/{c['tokens_compared']}"
                         + (f"; oracle margin at divergence: {m}" if m else ""))
    return "\n".join(lines)
