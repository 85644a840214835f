"""``specfleet bench engine``: speculative vs autoregressive vs Hugging Face, side by side.

Where it sits: offline, outside any request path. One process loads the zoo's target
(by default the cost-realistic ``target-xl``) and every drafter, then times, on
held-out prompts of each domain, medians of ``runs`` repetitions:

- ``ours-ar``: autoregressive decoding with our runner (the engine with no drafter);
- ``hf-greedy``: Hugging Face ``generate(do_sample=False)`` on the same weights;
- ``hf-assisted``: Hugging Face assisted generation with the domain's specialist as
  ``assistant_model`` (HF's default assistant schedule);
- ``ours:<drafter>``: our engine with each drafter at a fixed window γ;
- batch 8: a mixed-domain batch, each request drafted by its domain specialist,
  speculative vs autoregressive throughput.

Every method decodes exactly ``max_new_tokens`` greedy tokens (EOS ignored) and the
outputs are checked equal to the target's, so the timings compare equal work.
The analytic bound is Leviathan et al.'s S = (1 − α^(γ+1)) / ((1 − α)(γc + 1)) with
α the measured draft-token acceptance rate and c the measured cost ratio.
"""

from __future__ import annotations

import logging
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import transformers
from tqdm import tqdm

from specfleet.core.types import SamplingParams
from specfleet.engine.engine import SpecEngine
from specfleet.policy.draft_length import FixedDraftLength

logger = logging.getLogger(__name__)
DOMAINS = ("code", "prose", "data")


@dataclass
class BenchSettings:
    zoo: str = "small"
    target: str = "target-xl"
    runs: int = 3
    max_new_tokens: int = 64
    prompts_per_domain: int = 3
    prompt_tokens: int = 96
    draft_length: int = 4
    batch_size: int = 8
    threads: int = 2
    drafters: list[str] = field(default_factory=lambda: ["specialist", "general", "ngram", "suffix"])


def machine_description() -> str:
    import os

    return (
        f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, python {platform.python_version()}"
    ).replace("  ", " ")


def heldout_prompts(zoo_size: str, tokenizer, n: int, prompt_tokens: int) -> dict[str, list[list[int]]]:
    """The first ``prompt_tokens`` tokens of ``n`` held-out documents per domain."""
    from specfleet.zoo.corpus import build_corpus
    from specfleet.zoo.presets import recipe_for

    corpus = build_corpus(recipe_for(zoo_size).corpus, seed=0)
    prompts = {}
    for domain in DOMAINS:
        picked = []
        for doc in corpus[domain].heldout:
            ids = tokenizer(doc)["input_ids"]
            if len(ids) >= prompt_tokens:
                picked.append(ids[:prompt_tokens])
            if len(picked) == n:
                break
        prompts[domain] = picked
    return prompts


class EngineBench:
    """Loads the zoo once and runs every method; results are plain dicts."""

    def __init__(self, settings: BenchSettings):
        from specfleet.models.loading import load_causal_lm, load_tokenizer, resolve_model_path

        self.s = settings
        torch.set_num_threads(settings.threads)
        # HF warns about every generate() call that passes both a config and kwargs.
        transformers.logging.set_verbosity_error()
        zoo = f"zoo:{settings.zoo}"
        self.target_hf = load_causal_lm(f"{zoo}/{settings.target}")
        self.tokenizer = load_tokenizer(f"{zoo}/{settings.target}")
        self.drafter_hf = {
            name: load_causal_lm(f"{zoo}/drafter-{name}") for name in ("general", *DOMAINS)
        }
        self.zoo_dir = resolve_model_path(f"{zoo}/target").parent
        self.prompts = heldout_prompts(
            settings.zoo, self.tokenizer, settings.prompts_per_domain, settings.prompt_tokens
        )
        self.max_seq_len = settings.prompt_tokens + settings.max_new_tokens + 16
        self.params = SamplingParams(max_new_tokens=settings.max_new_tokens, ignore_eos=True)
        self.reference: dict[tuple, list[int]] = {}

    # ---- construction -------------------------------------------------------------
    def _engine(self, window: int, slots: int = 1) -> SpecEngine:
        from specfleet.drafters.model_drafter import ModelDrafter
        from specfleet.drafters.ngram import NgramDrafter
        from specfleet.drafters.suffix_tree import SuffixTreeDrafter
        from specfleet.models.llama_runner import LlamaRunner
        from specfleet.verifiers.verifier import Verifier

        verifier = Verifier(LlamaRunner(self.target_hf, max_slots=slots, max_seq_len=self.max_seq_len))
        drafters = {
            name: ModelDrafter(LlamaRunner(model, max_slots=slots, max_seq_len=self.max_seq_len), name=name)
            for name, model in self.drafter_hf.items()
        }
        drafters["ngram"] = NgramDrafter(name="ngram")
        drafters["suffix"] = SuffixTreeDrafter(name="suffix")
        return SpecEngine(verifier, drafters, draft_policy=FixedDraftLength(window), max_batch_size=slots)

    # ---- methods --------------------------------------------------------------------
    def _timed_ours(self, engine: SpecEngine, prompt: list[int], drafter: str | None):
        start = time.perf_counter()
        (out,) = engine.generate([prompt], self.params, drafter=drafter)
        return time.perf_counter() - start, out

    def _timed_hf(self, prompt: list[int], assistant=None):
        n = self.s.max_new_tokens
        kwargs = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        if assistant is not None:
            kwargs["assistant_model"] = assistant
        ids = torch.tensor([prompt])
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.target_hf.generate(ids, **kwargs)
        return time.perf_counter() - start, out[0, len(prompt) :].tolist()

    def _check(self, domain: str, i: int, tokens: list[int], method: str) -> None:
        key = (domain, i)
        if key not in self.reference:
            self.reference[key] = tokens
        elif tokens != self.reference[key]:
            raise AssertionError(f"{method} on {domain} prompt {i} diverged from the target's output")

    def run_domain_methods(self, progress: tqdm) -> dict:
        """Batch-1 results: method → domain → figures (medians over runs).

        Repetitions are interleaved (run 1 of every method, then run 2, ...) so that
        drift in machine load does not favour whichever method ran first."""
        s = self.s
        self._warm_up()
        samples: dict[tuple[str, str], dict[str, list]] = {}
        for _run in range(s.runs):
            for domain in DOMAINS:
                for method, arg in self._methods(domain).items():
                    # A fresh engine per method and run: the suffix drafter learns from
                    # every finished output and must not have seen this prompt's answer.
                    engine = self._engine(s.draft_length)
                    figures = samples.setdefault((method, domain), {"tps": [], "len": [], "rate": []})
                    tokens = seconds = 0.0
                    emitted = rounds = drafted = accepted = 0
                    for i, prompt in enumerate(self.prompts[domain]):
                        if method.startswith("hf"):
                            dt, out = self._timed_hf(prompt, self.drafter_hf[arg] if arg else None)
                        else:
                            dt, result = self._timed_ours(engine, prompt, arg)
                            out, st = result.token_ids, result.stats
                            emitted, rounds = emitted + st.emitted, rounds + st.rounds
                            drafted, accepted = drafted + st.drafted, accepted + st.accepted
                        self._check(domain, i, out, method)
                        tokens += len(out)
                        seconds += dt
                        progress.update(1)
                    figures["tps"].append(tokens / seconds)
                    if rounds:
                        figures["len"].append(emitted / rounds)
                        figures["rate"].append(accepted / drafted if drafted else 0.0)
        results: dict[str, dict[str, dict]] = {}
        for (method, domain), f in samples.items():
            results.setdefault(method, {})[domain] = {
                "tokens_per_s": statistics.median(f["tps"]),
                "runs_tokens_per_s": f["tps"],
                "mean_acceptance_length": statistics.median(f["len"]) if f["len"] else None,
                "acceptance_rate": statistics.median(f["rate"]) if f["rate"] else None,
            }
        return results

    def _warm_up(self) -> None:
        """One untimed short generation per method: first calls pay for lazy
        initialisation (allocator, kernels, HF's generation set-up), not decoding."""
        prompt = self.prompts[DOMAINS[0]][0]
        for method, arg in self._methods(DOMAINS[0]).items():
            if method.startswith("hf"):
                self._timed_hf(prompt, self.drafter_hf[arg] if arg else None)
            else:
                self._timed_ours(self._engine(self.s.draft_length), prompt, arg)

    def _methods(self, domain: str) -> dict[str, str | None]:
        """method name → drafter (ours) or assistant (HF) for a domain's prompts."""
        methods: dict[str, str | None] = {"ours-ar": None, "hf-greedy": None, "hf-assisted": domain}
        for name in self.s.drafters:
            methods[f"ours:{name}"] = domain if name == "specialist" else name
        return methods

    def cost_ratios(self, steps: int = 20) -> dict[str, float]:
        """c = one-token decode forward time of each drafter / of the target (our runner)."""
        from specfleet.models.llama_runner import ForwardItem, LlamaRunner

        def decode_time(model) -> float:
            runner = LlamaRunner(model, max_slots=1, max_seq_len=self.max_seq_len)
            runner.allocate("t")
            runner.forward([ForwardItem("t", self.prompts["code"][0], logit_rows=[])])
            times = []
            for step in range(steps):
                start = time.perf_counter()
                runner.forward([ForwardItem("t", [step + 1])])
                times.append(time.perf_counter() - start)
            return statistics.median(times)

        target = decode_time(self.target_hf)
        ratios = {name: decode_time(m) / target for name, m in self.drafter_hf.items()}
        ratios["target_decode_s"] = target
        return ratios

    def run_batch(self, progress: tqdm) -> dict:
        """Mixed-domain batch: speculative (each request → its specialist) vs autoregressive."""
        s = self.s
        mix = [self._mixed(i) for i in range(s.batch_size)]
        figures = {}
        for label in ("autoregressive", "speculative"):
            per_run = []
            for _ in range(s.runs):
                engine = self._engine(s.draft_length, slots=s.batch_size)
                ids = [
                    engine.submit(p, self.params, drafter=d if label == "speculative" else None)
                    for d, p in mix
                ]
                start = time.perf_counter()
                done = {}
                while engine.has_work:
                    for out in engine.step():
                        done[out.request_id] = out
                seconds = time.perf_counter() - start
                per_run.append(sum(len(done[i].token_ids) for i in ids) / seconds)
                progress.update(1)
            figures[label] = {"tokens_per_s": statistics.median(per_run), "runs_tokens_per_s": per_run}
        figures["speedup"] = figures["speculative"]["tokens_per_s"] / figures["autoregressive"]["tokens_per_s"]
        return figures

    def _mixed(self, i: int) -> tuple[str, list[int]]:
        domain = DOMAINS[i % len(DOMAINS)]
        prompts = self.prompts[domain]
        return domain, prompts[(i // len(DOMAINS)) % len(prompts)]


def analytic_bound(alpha: float, gamma: int, c: float) -> float:
    if alpha >= 1.0:
        return (gamma + 1) / (gamma * c + 1)
    return (1 - alpha ** (gamma + 1)) / ((1 - alpha) * (gamma * c + 1))


def summarize(settings: BenchSettings, methods: dict, ratios: dict, batch: dict | None) -> dict:
    """Speedups per domain for the best drafter, and the fraction of the analytic bound."""
    per_domain = {}
    for domain in DOMAINS:
        ar = methods["ours-ar"][domain]["tokens_per_s"]
        hf_assisted = methods["hf-assisted"][domain]["tokens_per_s"]
        ours = {m: r[domain] for m, r in methods.items() if m.startswith("ours:")}
        best_method = max(ours, key=lambda m: ours[m]["tokens_per_s"])
        best = ours[best_method]
        specialist = ours.get("ours:specialist")
        model_name = best_method.split(":", 1)[1]
        model_name = domain if model_name == "specialist" else model_name
        c = ratios.get(model_name, 0.0)  # model-free drafters cost ~0 target forwards
        alpha = best["acceptance_rate"] or 0.0
        bound = analytic_bound(alpha, settings.draft_length, c)
        per_domain[domain] = {
            "best_drafter": best_method,
            "speedup_vs_autoregressive": best["tokens_per_s"] / ar,
            "speedup_vs_hf_assisted": (specialist or best)["tokens_per_s"] / hf_assisted,
            "alpha": alpha,
            "c": c,
            "analytic_bound": bound,
            "fraction_of_analytic_bound": (best["tokens_per_s"] / ar) / bound,
        }

    def mean(key: str) -> float:
        return statistics.fmean(per_domain[d][key] for d in DOMAINS)

    return {
        "speedup_vs_autoregressive": mean("speedup_vs_autoregressive"),
        "speedup_vs_hf_assisted": mean("speedup_vs_hf_assisted"),
        "fraction_of_analytic_bound": mean("fraction_of_analytic_bound"),
        "per_domain": per_domain,
        "batch": batch,
        "cost_ratio": ratios,
        "methods": methods,
        "settings": asdict(settings),
        "machine": machine_description(),
    }


def run(settings: BenchSettings) -> dict:
    bench = EngineBench(settings)
    n_methods = 3 + len(settings.drafters)
    total = len(DOMAINS) * n_methods * settings.runs * settings.prompts_per_domain
    total += 2 * settings.runs if settings.batch_size > 1 else 0
    with tqdm(total=total, desc="bench engine", unit="gen") as progress:
        methods = bench.run_domain_methods(progress)
        batch = bench.run_batch(progress) if settings.batch_size > 1 else None
    ratios = bench.cost_ratios()
    return summarize(settings, methods, ratios, batch)


def format_table(report: dict) -> str:
    """Markdown table: tokens/s (mean acceptance length) per method and domain."""
    methods = report["methods"]
    lines = ["| method | " + " | ".join(DOMAINS) + " |", "|---|" + "---|" * len(DOMAINS)]
    for method, by_domain in methods.items():
        cells = []
        for d in DOMAINS:
            r = by_domain[d]
            mal = r["mean_acceptance_length"]
            cells.append(f"{r['tokens_per_s']:.1f}" + (f" ({mal:.2f})" if mal else ""))
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("| domain | best drafter | vs ours-ar | vs HF assisted | α | c | bound S | fraction of S |")
    lines.append("|---|---|---|---|---|---|---|---|")
    for d, r in report["per_domain"].items():
        lines.append(
            f"| {d} | {r['best_drafter']} | {r['speedup_vs_autoregressive']:.2f}x | "
            f"{r['speedup_vs_hf_assisted']:.2f}x | {r['alpha']:.2f} | {r['c']:.3f} | "
            f"{r['analytic_bound']:.2f} | {r['fraction_of_analytic_bound']:.0%} |"
        )
    if report.get("batch"):
        b = report["batch"]
        lines.append("")
        lines.append(
            f"batch {report['settings']['batch_size']} mixed domains: speculative "
            f"{b['speculative']['tokens_per_s']:.1f} tok/s vs autoregressive "
            f"{b['autoregressive']['tokens_per_s']:.1f} tok/s = {b['speedup']:.2f}x"
        )
    return "\n".join(lines)
