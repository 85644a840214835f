"""``specfleet bench fleet``: routing and cooperation across a fleet of drafters (issue 14).

Where it sits: a benchmark over the real in-process engine (``engine/engine.py``) with
the small zoo — the cost-realistic ``target-xl`` and every drafter (four model drafters,
n-gram, suffix) deployed in every arm; only the routing policy differs between arms:

- ``single:<drafter>``: that drafter for every request;
- ``random``: a drafter drawn per request at admission;
- ``expertise``: today's expertise router (per-domain acceptance, chosen once, ε-greedy);
- ``learned``: the learned router (``policy/learned_routing.py``) with the learned domain
  signal (``policy/domain_signal.py``, centroids from the zoo's training corpus), one
  drafter per round;
- ``learned+fusion``: the learned router letting up to ``max_cooperating`` drafters
  cooperate, their proposals fused into one tree (``policy/fusion.py``);
- ``oracle``: in hindsight, each request's best single drafter (from the single arms).

Workload: held-out prompts of the zoo corpus, code, prose and data in equal shares;
closed loop at batch 1, and Poisson arrivals at two loads (batch up to ``batch``). The
routers are warmed on other held-out prompts first (a running fleet has history). Every
output is checked equal to the target's greedy tokens. Each measurement is the median
over ``runs`` runs; in every run all arms go one after another on fresh n-gram/suffix
drafters (they learn from outputs, so reuse would leak answers between arms).

A second part measures how fast a drafter added at run time earns its share: the code
specialist joins a learned fleet that has served without it, and we count requests until
its share of the code requests is what the oracle gives it.
"""

from __future__ import annotations

import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass, field

import torch
import transformers

from specfleet.benchmarks.engine_bench import heldout_prompts, machine_description
from specfleet.benchmarks.sim_validate import run_real
from specfleet.core.types import SamplingParams
from specfleet.policy.draft_length import FixedDraftLength
from specfleet.policy.learned_routing import LearnedRouter
from specfleet.policy.routing import DrafterProfile, ExpertiseRouter, RandomRouter
from specfleet.policy.speculation_width import SpeculationWidth
from specfleet.sim.workload import SimRequest
from specfleet.zoo.presets import DOMAINS

MODEL_DRAFTERS = {"general": "general", "code": "code", "prose": "prose", "data": "data"}  # name → domain
FREE_DRAFTERS = {"ngram": "general", "suffix": "general"}
FUSED = "learned+fusion"


@dataclass
class FleetSettings:
    zoo: str = "small"
    target: str = "target-xl"
    runs: int = 3
    max_new_tokens: int = 32
    prompts_per_domain: int = 3  # measured prompts per domain
    warmup_per_domain: int = 2  # router warm-up prompts per domain (disjoint from the measured)
    prompt_tokens: int = 64
    window: int = 4
    batch: int = 8
    loads: tuple[float, ...] = (0.5, 1.5)  # Poisson arrival rates (requests / s)
    threads: int = 1
    max_cooperating: int = 3
    newcomer_max_requests: int = 200
    seed: int = 0
    arms: list[str] = field(default_factory=list)  # default: all


def arm_names() -> list[str]:
    singles = [f"single:{d}" for d in (*MODEL_DRAFTERS, *FREE_DRAFTERS)]
    return [*singles, "random", "expertise", "learned", FUSED, "oracle"]


class FleetBench:
    def __init__(self, s: FleetSettings, progress=print):
        from specfleet.models.loading import load_causal_lm, load_tokenizer

        self.s = s
        self.progress = progress
        torch.set_num_threads(s.threads)
        transformers.logging.set_verbosity_error()
        zoo = f"zoo:{s.zoo}"
        self.target_hf = load_causal_lm(f"{zoo}/{s.target}")
        self.tokenizer = load_tokenizer(f"{zoo}/{s.target}")
        self.drafter_hf = {n: load_causal_lm(f"{zoo}/drafter-{n}") for n in MODEL_DRAFTERS}
        held = heldout_prompts(s.zoo, self.tokenizer, s.prompts_per_domain + s.warmup_per_domain,
                               s.prompt_tokens)
        self.warmup = [(d, p) for d in DOMAINS for p in held[d][: s.warmup_per_domain]]
        measured = [(d, p) for d in DOMAINS for p in held[d][s.warmup_per_domain:]]
        random.Random(s.seed).shuffle(measured)  # domains interleaved, as a real mix arrives
        self.measured = measured
        self.max_seq_len = s.prompt_tokens + s.max_new_tokens + 16
        self.params = SamplingParams(max_new_tokens=s.max_new_tokens, ignore_eos=True)
        self._model_drafters = self._build_model_drafters()
        from specfleet.zoo.domain_centroids import fit_for_zoo
        from specfleet.zoo.presets import zoo_dir

        self.classifier = fit_for_zoo(s.zoo, zoo_dir(s.zoo))  # the learned arms' domain signal
        self.reference: dict[tuple, list[int]] = {}

    # ---- construction ---------------------------------------------------------------------
    def _build_model_drafters(self):
        from specfleet.drafters.model_drafter import ModelDrafter
        from specfleet.models.llama_runner import LlamaRunner

        return {n: ModelDrafter(LlamaRunner(m, max_slots=self.s.batch, max_seq_len=self.max_seq_len), name=n)
                for n, m in self.drafter_hf.items()}

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def router(self, arm: str, *, without: tuple[str, ...] = ()):
        profiles = [DrafterProfile(n, d) for n, d in {**MODEL_DRAFTERS, **FREE_DRAFTERS}.items()
                    if n not in without]
        if arm == "random":
            return RandomRouter(profiles, decode=self._decode, seed=self.s.seed)
        if arm == "expertise":
            return ExpertiseRouter(profiles, decode=self._decode, exploration=0.1, seed=self.s.seed)
        if arm in ("learned", FUSED):
            return LearnedRouter(profiles, decode=self._decode, classify=self.classifier)
        return None

    def engine(self, router, width: int, *, without: tuple[str, ...] = ()):
        from specfleet.drafters.ngram import NgramDrafter
        from specfleet.drafters.suffix_tree import SuffixTreeDrafter
        from specfleet.engine.engine import SpecEngine
        from specfleet.models.llama_runner import LlamaRunner
        from specfleet.verifiers.verifier import Verifier

        verifier = Verifier(LlamaRunner(self.target_hf, max_slots=self.s.batch, max_seq_len=self.max_seq_len),
                            decode=self._decode)
        drafters = {**self._model_drafters, "ngram": NgramDrafter(name="ngram"),
                    "suffix": SuffixTreeDrafter(name="suffix")}
        drafters = {n: d for n, d in drafters.items() if n not in without}
        return SpecEngine(verifier, drafters, draft_policy=FixedDraftLength(self.s.window), router=router,
                          width=SpeculationWidth(max_width=width, batch_node_budget=self.s.batch * 4 * width),
                          max_batch_size=self.s.batch)

    def _check(self, prompt: list[int], tokens: list[int], arm: str) -> None:
        key = tuple(prompt)
        if key not in self.reference:
            with torch.no_grad():
                out = self.target_hf.generate(torch.tensor([prompt]), max_new_tokens=self.s.max_new_tokens,
                                              min_new_tokens=self.s.max_new_tokens, do_sample=False,
                                              pad_token_id=0)
            self.reference[key] = out[0, len(prompt):].tolist()
        if tokens != self.reference[key]:
            raise AssertionError(f"{arm}: output differs from the target's greedy tokens")

    # ---- one arm -------------------------------------------------------------------------------
    def _run_closed(self, engine, arm: str, pins: dict[int, str] | None) -> dict:
        latencies, tokens, rounds, emitted, per_request = [], 0, 0, 0, []
        single = arm.removeprefix("single:") if arm.startswith("single:") else None
        start = time.perf_counter()
        for i, (_, prompt) in enumerate(self.measured):
            drafter = single or (pins or {}).get(i)
            t0 = time.perf_counter()
            rid = engine.submit(prompt, self.params, drafter=drafter, route=drafter is None)
            out = None
            while engine.has_work:
                for o in engine.step():
                    if o.request_id == rid:
                        out = o
            latencies.append(time.perf_counter() - t0)
            self._check(prompt, out.token_ids, arm)
            tokens += len(out.token_ids)
            rounds += out.stats.rounds
            emitted += out.stats.emitted
            per_request.append(latencies[-1])
        wall = time.perf_counter() - start
        return {"tokens_per_s": tokens / wall, "p50_latency_s": statistics.median(latencies),
                "p90_latency_s": _p90(latencies), "accepted_per_verify": emitted / rounds,
                "per_request_s": per_request}

    def _run_poisson(self, engine, arm: str, rate: float, run: int, pins: dict[int, str] | None) -> dict:
        rng = random.Random(self.s.seed * 1000 + run)
        t, requests = 0.0, []
        single = arm.removeprefix("single:") if arm.startswith("single:") else None
        for i, (domain, prompt) in enumerate(self.measured):
            t += rng.expovariate(rate)
            requests.append(SimRequest(f"p{i}", int(t * 1e9), len(prompt), self.s.max_new_tokens, domain,
                                       tuple(prompt), single or (pins or {}).get(i)))
        report = run_real(engine, requests, route=True, drafter="")
        return {"tokens_per_s": report["throughput"], "p50_latency_s": report["p50"],
                "p90_latency_s": report["p90"], "accepted_per_verify": report["mean_acceptance_length"]}

    def warm(self, engine) -> None:
        """The routers' history: warm-up prompts through the engine, one at a time."""
        for _, prompt in self.warmup:
            engine.submit(prompt, self.params, route=True)
            while engine.has_work:
                engine.step()

    def run_arm(self, arm: str, run: int, pins: dict[int, str] | None) -> dict:
        router = self.router(arm)
        width = self.s.max_cooperating if arm == FUSED else 1
        if router is not None:
            self.warm(self.engine(router, width))
        result = self._run_closed(self.engine(router, width), arm, pins)
        for rate in self.s.loads:
            result[f"poisson_{rate:g}"] = self._run_poisson(self.engine(router, width), arm, rate, run, pins)
        if isinstance(router, LearnedRouter):
            result["reroutes"] = router.reroutes
        return result

    # ---- newcomer ---------------------------------------------------------------------------
    def newcomer(self, pins: dict[int, str]) -> dict:
        """Requests, after a drafter joins a running learned fleet, until it serves the
        traffic it is best at: the newcomer is the drafter the oracle picks most; its
        traffic is the measured prompts the oracle pins to it; "fair share" is reached
        when it served at least 4 of the last 5 of those (mostly, by rounds). The
        prompts are replayed in a loop, so the n-gram and suffix drafters — which learn
        from outputs and would memorise the answers — are left out of this part."""
        newcomer = Counter(pins.values()).most_common(1)[0][0]
        if newcomer in FREE_DRAFTERS:
            return {"drafter": newcomer, "requests": None, "note": "the oracle's favourite learns from outputs"}
        without = (newcomer, *FREE_DRAFTERS)
        router = self.router("learned", without=without)
        engine = self.engine(router, 1, without=without)
        self.warm(engine)
        engine.executor.drafters[newcomer] = _local(self._model_drafters[newcomer])
        engine.scheduler.add_drafter(DrafterProfile(newcomer, {**MODEL_DRAFTERS}[newcomer]))
        served: list[bool] = []
        for n in range(1, self.s.newcomer_max_requests + 1):
            i = (n - 1) % len(self.measured)
            rid = engine.submit(self.measured[i][1], self.params, route=True)
            out = None
            while engine.has_work:
                for o in engine.step():
                    if o.request_id == rid:
                        out = o
            if pins.get(i) == newcomer:
                top = out.stats.drafters.most_common(1)
                served.append(bool(top) and top[0][0] == newcomer)
                if len(served) >= 5 and sum(served[-5:]) >= 4:
                    return {"drafter": newcomer, "requests": n, "its_requests_seen": len(served)}
        return {"drafter": newcomer, "requests": None, "its_requests_seen": len(served)}


def _local(drafter):
    from specfleet.engine.executor import LocalDraftWorker

    return LocalDraftWorker(drafter)


def _p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(0.9 * (len(xs) - 1))))]


def _median_dict(runs: list[dict]) -> dict:
    out = {}
    for key, value in runs[0].items():
        if isinstance(value, dict):
            out[key] = _median_dict([r[key] for r in runs])
        elif isinstance(value, (int, float)):
            out[key] = statistics.median(r[key] for r in runs)
    return out


def run(s: FleetSettings, progress=print) -> dict:
    from tqdm import tqdm

    bench = FleetBench(s, progress)
    arms = s.arms or arm_names()
    real_arms = [a for a in arms if a != "oracle"]
    per_run: dict[str, list[dict]] = {a: [] for a in arms}
    bar = tqdm(total=s.runs * len(arms), desc="bench fleet", unit="arm")
    last_pins: dict[int, str] = {}
    oracle_pins: list[dict[str, int]] = []  # per run: drafter → measured prompts it is best at
    for run_index in range(s.runs):
        singles = {}
        for arm in real_arms:
            bar.set_postfix_str(f"run {run_index + 1}: {arm}")
            per_run[arm].append(bench.run_arm(arm, run_index, None))
            if arm.startswith("single:"):
                singles[arm.removeprefix("single:")] = per_run[arm][-1]["per_request_s"]
            bar.update()
        if "oracle" in arms and singles:
            names = list(singles)
            pins = {i: min(names, key=lambda n: singles[n][i]) for i in range(len(bench.measured))}
            last_pins = pins
            oracle = bench.run_arm("oracle", run_index, pins)
            oracle_pins.append(dict(Counter(pins.values())))
            per_run["oracle"].append(oracle)
            bar.update()
    bar.close()
    report = {"machine": machine_description(), "settings": {k: v for k, v in vars(s).items()},
              "arms": {a: _median_dict(r) for a, r in per_run.items() if r}}
    report["oracle_pins"] = oracle_pins
    from specfleet.zoo.domain_centroids import heldout_accuracy

    report["domain_accuracy"] = heldout_accuracy(s.zoo, bench.classifier)
    report.update(ratios(report["arms"], s))
    if FUSED in arms and last_pins:
        report["newcomer"] = bench.newcomer(last_pins)
        report["newcomer_requests_to_fair_share"] = report["newcomer"]["requests"]
    return report


def ratios(arms: dict, s: FleetSettings) -> dict:
    """The issue's ratios, closed loop at batch 1 at the top level and per Poisson load."""
    singles = {a: v for a, v in arms.items() if a.startswith("single:")}
    if not singles or FUSED not in arms:
        return {}

    def for_mode(get) -> dict:
        best = max(singles, key=lambda a: get(singles[a])["tokens_per_s"])
        fused = get(arms[FUSED])
        out = {"best_single": best,
               "speedup_vs_best_single": fused["tokens_per_s"] / get(singles[best])["tokens_per_s"],
               "p50_ratio_vs_best_single": fused["p50_latency_s"] / get(singles[best])["p50_latency_s"]}
        if "oracle" in arms:
            out["fraction_of_oracle"] = fused["tokens_per_s"] / get(arms["oracle"])["tokens_per_s"]
        if "learned" in arms:
            out["fusion_gain_accepted_per_verify"] = (fused["accepted_per_verify"]
                                                      / get(arms["learned"])["accepted_per_verify"])
        return out

    top = for_mode(lambda a: a)
    top["by_load"] = {f"poisson_{r:g}": for_mode(lambda a, r=r: a[f"poisson_{r:g}"]) for r in s.loads}
    return top


def format_table(report: dict) -> str:
    loads = [k for k in next(iter(report["arms"].values())) if k.startswith("poisson_")]
    head = "| arm | batch 1: tok/s | p50 s | p90 s | accepted/verify |" + "".join(
        f" {k}: tok/s | p50 s | p90 s | acc/verify |" for k in loads)
    lines = [head, "|" + "---|" * (5 + 4 * len(loads))]
    for arm, v in report["arms"].items():
        cells = [f"{v['tokens_per_s']:.1f}", f"{v['p50_latency_s']:.2f}", f"{v['p90_latency_s']:.2f}",
                 f"{v['accepted_per_verify']:.2f}"]
        for k in loads:
            m = v.get(k, {})
            cells += [f"{m.get('tokens_per_s', 0):.1f}", f"{m.get('p50_latency_s', 0):.2f}",
                      f"{m.get('p90_latency_s', 0):.2f}", f"{m.get('accepted_per_verify', 0):.2f}"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
