"""``specfleet bench load``: goodput and latency vs offered load, per window policy.

Where it sits: a composition root outside the request path. It loads the zoo once,
measures the autoregressive engine's capacity (all prompts at once), then replays the
same Poisson (or bursty Gamma) arrival timestamps into a fresh in-process engine per
arm and load: autoregressive, fixed windows, and the goodput controller
(policy/goodput.py). Arrivals reuse ``sim.workload``'s renewal generator and the
replay loop of ``sim_validate.run_real``, so every arm sees identical timestamps.
"""

from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

import torch
import transformers

from specfleet.benchmarks.engine_bench import heldout_prompts, machine_description
from specfleet.benchmarks.sim_validate import run_real
from specfleet.policy.draft_length import FixedDraftLength
from specfleet.policy.goodput import GoodputDraftLength
from specfleet.sim.workload import SimRequest
from specfleet.zoo.presets import DOMAINS


@dataclass
class LoadSettings:
    zoo: str = "small"
    target: str = "target-xl"
    drafter: str = "general"
    fractions: tuple[float, ...] = (0.1, 0.3, 0.5, 0.7, 0.9, 1.2)
    windows: tuple[int, ...] = (1, 2, 4, 6)
    repeats: int = 3
    requests: int = 12  # per cell (shortens each cell on a small machine)
    max_new_tokens: int = 32
    prompt_tokens: int = 32
    batch: int = 8
    cv: float = 1.0  # 1: Poisson; > 1: bursty Gamma
    threads: int = 2
    seed: int = 0


def arm_names(s: LoadSettings) -> list[str]:
    return ["ar", *(f"fixed-{w}" for w in s.windows), "controller"]


def arrivals(prompts, qps: float, cv: float, seed: int, max_new: int) -> list[SimRequest]:
    rng, k, t, out = random.Random(seed), 1.0 / (cv * cv), 0.0, []
    for i, (domain, p) in enumerate(prompts):
        t += rng.gammavariate(k, 1.0 / (qps * k))
        out.append(SimRequest(f"r{i}", int(t * 1e9), len(p), max_new, domain, tuple(p)))
    return out


class LoadBench:
    def __init__(self, s: LoadSettings, progress=None):
        from specfleet.models.loading import load_causal_lm, load_tokenizer

        self.s = s
        torch.set_num_threads(s.threads)
        transformers.logging.set_verbosity_error()
        zoo = f"zoo:{s.zoo}"
        self.target = load_causal_lm(f"{zoo}/{s.target}")
        self.tok = load_tokenizer(f"{zoo}/{s.target}")
        self.drafter = load_causal_lm(f"{zoo}/drafter-{s.drafter}")
        per = -(-s.requests // len(DOMAINS))
        held = heldout_prompts(s.zoo, self.tok, per, s.prompt_tokens)
        mixed = [(d, p) for d in DOMAINS for p in held[d]]
        random.Random(s.seed).shuffle(mixed)  # domains interleaved
        self.prompts = mixed[: s.requests]
        self.max_seq = s.prompt_tokens + s.max_new_tokens + 16

    def policy(self, arm: str):
        if arm == "ar":
            return FixedDraftLength(0)
        if arm.startswith("fixed-"):
            return FixedDraftLength(int(arm.removeprefix("fixed-")))
        return GoodputDraftLength(max_length=max(self.s.windows))

    def engine(self, arm: str):
        from specfleet.drafters.model_drafter import ModelDrafter
        from specfleet.engine.engine import SpecEngine
        from specfleet.models.llama_runner import LlamaRunner
        from specfleet.policy.speculation_width import SpeculationWidth
        from specfleet.verifiers.verifier import Verifier

        b = self.s.batch
        verifier = Verifier(LlamaRunner(self.target, max_slots=b, max_seq_len=self.max_seq), decode=self.tok.decode)
        drafter = ModelDrafter(LlamaRunner(self.drafter, max_slots=b, max_seq_len=self.max_seq), name="d")
        return SpecEngine(verifier, {"d": drafter}, draft_policy=self.policy(arm), router=None,
                          width=SpeculationWidth(max_width=1, batch_node_budget=b * 8), max_batch_size=b)

    def cell(self, arm: str, qps: float, seed: int) -> dict:
        reqs = arrivals(self.prompts, qps, self.s.cv, seed, self.s.max_new_tokens)
        r = run_real(self.engine(arm), reqs, route=False, drafter="d")
        return {"goodput_tok_s": r["throughput"], "p50_s": r["p50"], "p90_s": r["p90"],
                "ttft_p50_s": r["ttft"]["p50"], "itl_p50_s": r["itl"]["p50"]}

    def capacity_qps(self) -> float:
        """AR capacity: every request arriving at once, requests finished per second."""
        reqs = arrivals(self.prompts, 1e6, 1.0, self.s.seed, self.s.max_new_tokens)
        r = run_real(self.engine("ar"), reqs, route=False, drafter="d")
        return r["throughput"] / self.s.max_new_tokens


def _median(cells: list[dict]) -> dict:
    return {k: statistics.median(c[k] for c in cells) for k in cells[0]}


def summary(loads: list[dict], windows) -> dict:
    ctl = [ld["arms"]["controller"]["goodput_tok_s"] for ld in loads]
    best_fixed = [max(ld["arms"][f"fixed-{w}"]["goodput_tok_s"] for w in windows) for ld in loads]
    ar = [ld["arms"]["ar"]["goodput_tok_s"] for ld in loads]
    drops = [max(0.0, (a - b) / a) for a, b in zip(ctl, ctl[1:], strict=False) if a > 0]
    return {
        "min_ratio_vs_best_baseline": min(c / max(a, f) for c, a, f in zip(ctl, ar, best_fixed, strict=True)),
        "max_gain_vs_best_fixed": max(c / f for c, f in zip(ctl, best_fixed, strict=True)),
        "worst_vs_ar": min(c / a for c, a in zip(ctl, ar, strict=True)),
        "max_adjacent_drop": max(drops, default=0.0),
    }


def run(s: LoadSettings, progress: bool = True) -> dict:
    from tqdm import tqdm

    bench = LoadBench(s)
    cap = bench.capacity_qps()
    arms = arm_names(s)
    bar = tqdm(total=len(s.fractions) * len(arms) * s.repeats, disable=not progress, desc="bench load")
    loads = []
    for frac in s.fractions:
        qps = cap * frac
        cells = {a: [] for a in arms}
        for rep in range(s.repeats):
            for arm in arms:  # same seed → identical timestamps for every arm
                cells[arm].append(bench.cell(arm, qps, s.seed * 1000 + rep))
                bar.update(1)
        loads.append({"fraction_of_ar_capacity": frac, "offered_qps": qps,
                      "arms": {a: _median(c) for a, c in cells.items()}})
    bar.close()
    return {"machine": machine_description(), "settings": vars(s), "ar_capacity_qps": cap,
            "loads": loads, **summary(loads, s.windows)}


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    x = [ld["offered_qps"] for ld in report["loads"]]
    for arm in report["loads"][0]["arms"]:
        ax1.plot(x, [ld["arms"][arm]["goodput_tok_s"] for ld in report["loads"]], marker="o", label=arm)
        ax2.plot(x, [ld["arms"][arm]["p50_s"] for ld in report["loads"]], marker="o", label=arm)
    ax1.set(xlabel="offered load (req/s)", ylabel="goodput (tok/s)")
    ax2.set(xlabel="offered load (req/s)", ylabel="p50 end-to-end latency (s)")
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def format_table(report: dict) -> str:
    arms = list(report["loads"][0]["arms"])
    lines = ["| load (qps) | " + " | ".join(arms) + " |", "|---" * (len(arms) + 1) + "|"]
    for ld in report["loads"]:
        cells = [f"{ld['arms'][a]['goodput_tok_s']:.1f} / {ld['arms'][a]['p50_s']:.2f}s" for a in arms]
        lines.append(f"| {ld['offered_qps']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
