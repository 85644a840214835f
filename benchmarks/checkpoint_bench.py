"""``specfleet bench engine --target PATH``: speculation on any checkpoint, side by side.

Where it sits: offline, outside any request path; the zoo's benchmark
(``engine_bench.py``) for a user's own model. One process loads the target (an HF
directory, a GGUF file, ``pkg:`` or ``zoo:`` spec) and times, per prompt kind, medians
of ``runs`` interleaved repetitions at batch 1, greedy, each generation ending at the
checkpoint's EOS (or ``max_new_tokens``):

- ``ours-ar``: our engine with no drafter;
- ``hf-greedy``: Hugging Face ``generate(do_sample=False)`` on the same weights;
- ``hf-prompt-lookup``: HF prompt-lookup decoding (``prompt_lookup_num_tokens`` = the
  window, and 10, HF's documented example; the faster of the two is the baseline);
- ``ours:<drafter>``: our engine with each drafter (``ngram``, ``suffix``, or
  ``early_exit:K``: the target's own first K layers, or ``NAME=PATH`` of a model
  drafter sharing the target's tokenizer) at a fixed window.

Prompts come from a JSONL file, one ``{"kind": ..., "messages": [...]}`` (rendered
with the checkpoint's chat template) or ``{"kind": ..., "prompt": "..."}`` per line;
``benchmarks/prompts/chat_heldout.jsonl`` (summaries, rewrites, Q&A, code, JSON,
written for this benchmark) is the default. Every method's tokens are checked equal
to HF greedy's, so the timings compare equal work.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers
from tqdm import tqdm

from specfleet.benchmarks.engine_bench import machine_description
from specfleet.core.types import SamplingParams
from specfleet.policy.draft_length import FixedDraftLength

DEFAULT_PROMPTS = Path(__file__).resolve().parent / "prompts" / "chat_heldout.jsonl"
HF_PLD_TOKENS = 10  # the value in HF's prompt-lookup documentation


@dataclass
class CheckpointBenchSettings:
    target: str
    drafters: list[str] = field(default_factory=lambda: ["ngram", "suffix"])
    prompts: str = str(DEFAULT_PROMPTS)
    runs: int = 3
    max_new_tokens: int = 128
    draft_length: int = 4
    threads: int = 2


def load_prompts(path: str | Path, tokenizer) -> list[tuple[str, list[int]]]:
    """(kind, prompt ids) per line of a JSONL prompts file."""
    from specfleet.router.chat import render_chat

    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        item = json.loads(line)
        if "messages" in item:
            ids = render_chat(tokenizer, item["messages"])
        elif "prompt" in item:
            ids = tokenizer.encode(item["prompt"])
        else:
            raise ValueError(f"{path}:{n}: a line needs 'messages' or 'prompt'")
        out.append((str(item.get("kind", "all")), ids))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


class CheckpointBench:
    def __init__(self, s: CheckpointBenchSettings):
        from specfleet.models.loading import generation_eos_ids, load_causal_lm, load_tokenizer

        self.s = s
        torch.set_num_threads(s.threads)
        transformers.logging.set_verbosity_error()
        self.target_hf = load_causal_lm(s.target, config_key="--target")
        self.tokenizer = load_tokenizer(s.target, config_key="--target")
        self.eos = generation_eos_ids(s.target, self.tokenizer, config_key="--target")
        self.prompts = load_prompts(s.prompts, self.tokenizer)
        self.max_seq_len = max(len(p) for _, p in self.prompts) + s.max_new_tokens + 16
        self.params = SamplingParams(max_new_tokens=s.max_new_tokens)
        self.model_drafters = {}
        self.early_exit: dict[str, int] = {}
        for spec in s.drafters:
            if spec.startswith("early_exit:"):
                k = int(spec.split(":", 1)[1])
                if not 0 < k < self.target_hf.config.num_hidden_layers:
                    raise ValueError(f"--drafter {spec}: the exit layer must be in [1, "
                                     f"{self.target_hf.config.num_hidden_layers})")
                self.early_exit[f"early_exit_{k}"] = k
            elif "=" in spec:
                name, path = spec.split("=", 1)
                from specfleet.models.loading import check_same_vocabulary

                check_same_vocabulary(self.tokenizer, path, name)
                self.model_drafters[name] = load_causal_lm(path, config_key=f"--drafter {name}")
            elif spec not in ("ngram", "suffix"):
                raise ValueError(f"--drafter: {spec!r} is not ngram, suffix, early_exit:K or NAME=PATH")
        self.reference: dict[int, list[int]] = {}

    def _engine(self):
        from specfleet.drafters.model_drafter import ModelDrafter
        from specfleet.drafters.ngram import NgramDrafter
        from specfleet.drafters.suffix_tree import SuffixTreeDrafter
        from specfleet.engine.engine import SpecEngine
        from specfleet.models.llama_runner import LlamaRunner
        from specfleet.verifiers.verifier import Verifier

        verifier = Verifier(LlamaRunner(self.target_hf, max_slots=1, max_seq_len=self.max_seq_len),
                            eos_token_ids=self.eos)
        drafters = {"ngram": NgramDrafter(name="ngram"), "suffix": SuffixTreeDrafter(name="suffix")}
        for name, model in self.model_drafters.items():
            drafters[name] = ModelDrafter(LlamaRunner(model, max_slots=1, max_seq_len=self.max_seq_len), name=name)
        for name, k in self.early_exit.items():  # the target's first k layers, its weights shared
            drafters[name] = ModelDrafter(LlamaRunner(self.target_hf, max_slots=1, max_seq_len=self.max_seq_len,
                                                      num_layers=k), name=name)
        return SpecEngine(verifier, drafters, draft_policy=FixedDraftLength(self.s.draft_length), max_batch_size=1)

    def methods(self) -> list[str]:
        names = [f"early_exit_{d.split(':', 1)[1]}" if d.startswith("early_exit:") else d.split("=", 1)[0]
                 for d in self.s.drafters]
        pld = ["hf-prompt-lookup"] if self.s.draft_length == HF_PLD_TOKENS else [
            "hf-prompt-lookup", f"hf-prompt-lookup-{HF_PLD_TOKENS}"]
        return ["ours-ar", "hf-greedy", *pld, *(f"ours:{n}" for n in names)]

    def _hf(self, prompt: list[int], method: str):
        kwargs = dict(max_new_tokens=self.s.max_new_tokens, do_sample=False, eos_token_id=self.eos,
                      pad_token_id=self.eos[0] if self.eos else 0)
        if method.startswith("hf-prompt-lookup"):
            kwargs["prompt_lookup_num_tokens"] = (HF_PLD_TOKENS if method.endswith(f"-{HF_PLD_TOKENS}")
                                                  else self.s.draft_length)
        start = time.perf_counter()
        with torch.inference_mode():
            out = self.target_hf.generate(torch.tensor([prompt]), **kwargs)
        return time.perf_counter() - start, out[0, len(prompt):].tolist(), None

    def _ours(self, prompt: list[int], method: str):
        engine = self._engine()  # fresh: the suffix drafter must not have seen this answer
        drafter = None if method == "ours-ar" else method.split(":", 1)[1]
        start = time.perf_counter()
        (out,) = engine.generate([prompt], self.params, drafter=drafter)
        return time.perf_counter() - start, out.token_ids, out.stats

    def _once(self, i: int, prompt: list[int], method: str):
        dt, tokens, stats = (self._hf if method.startswith("hf") else self._ours)(prompt, method)
        if tokens != self.reference[i]:
            raise AssertionError(f"{method} on prompt {i} diverged from the target's greedy output")
        return dt, tokens, stats

    def run(self, progress=None) -> dict:
        s = self.s
        methods = self.methods()
        for i, (_, prompt) in enumerate(self.prompts):  # the reference: HF greedy, untimed
            self.reference[i] = self._hf(prompt, "hf-greedy")[1]
        for method in methods:  # untimed warm-up of every path (lazy init, allocator)
            self._once(0, self.prompts[0][1], method)
        samples: dict[tuple[str, str], dict[str, list]] = {}
        for _ in range(s.runs):
            for method in methods:  # interleaved: drift in machine load hits every method alike
                per_kind: dict[str, list[float]] = {}
                for i, (kind, prompt) in enumerate(self.prompts):
                    dt, tokens, stats = self._once(i, prompt, method)
                    acc = per_kind.setdefault(kind, [0.0, 0.0, 0, 0])
                    acc[0] += len(tokens)
                    acc[1] += dt
                    if stats is not None and stats.rounds:
                        acc[2] += stats.emitted
                        acc[3] += stats.rounds
                    if progress is not None:
                        progress.update(1)
                totals = [0.0, 0.0, 0, 0]
                for kind, acc in per_kind.items():
                    self._add(samples, method, kind, acc)
                    totals = [a + b for a, b in zip(totals, acc, strict=True)]
                self._add(samples, method, "all", totals)
        results: dict[str, dict[str, dict]] = {}
        for (method, kind), f in samples.items():
            results.setdefault(method, {})[kind] = {
                "tokens_per_s": statistics.median(f["tps"]), "runs_tokens_per_s": f["tps"],
                "mean_acceptance_length": statistics.median(f["len"]) if f["len"] else None,
            }
        return self._summary(results)

    @staticmethod
    def _add(samples, method, kind, acc) -> None:
        f = samples.setdefault((method, kind), {"tps": [], "len": []})
        f["tps"].append(acc[0] / acc[1])
        if acc[3]:
            f["len"].append(acc[2] / acc[3])

    def _summary(self, results: dict) -> dict:
        kinds = sorted({k for r in results.values() for k in r if k != "all"}) + ["all"]
        ours = [m for m in results if m.startswith("ours:")]
        pld = [m for m in results if m.startswith("hf-prompt-lookup")]
        per_kind = {}
        for kind in kinds:
            tps = {m: results[m][kind]["tokens_per_s"] for m in results}
            best = max(ours, key=lambda m: tps[m]) if ours else None
            best_pld = max(pld, key=lambda m: tps[m])
            per_kind[kind] = {
                "best_drafter": best, "speedup_vs_ours_ar": tps[best] / tps["ours-ar"] if best else None,
                "speedup_vs_hf_prompt_lookup": tps[best] / tps[best_pld] if best else None,
                "best_hf_prompt_lookup": best_pld,
            }
        return {
            "target": self.s.target, "machine": machine_description(),
            "settings": {k: v for k, v in vars(self.s).items()}, "prompts": len(self.prompts),
            "eos_token_ids": self.eos, "methods": results, "per_kind": per_kind,
            "speedup_vs_ours_ar": per_kind["all"]["speedup_vs_ours_ar"],
            "speedup_vs_hf_prompt_lookup": per_kind["all"]["speedup_vs_hf_prompt_lookup"],
        }


def format_checkpoint_table(report: dict) -> str:
    kinds = list(report["per_kind"])
    lines = ["method".ljust(24) + "".join(k.rjust(16) for k in kinds)]
    for method, per in report["methods"].items():
        cells = []
        for k in kinds:
            f = per[k]
            length = f"/{f['mean_acceptance_length']:.2f}" if f["mean_acceptance_length"] else ""
            cells.append(f"{f['tokens_per_s']:.1f}{length}".rjust(16))
        lines.append(method.ljust(24) + "".join(cells))
    lines.append("(tok/s, median of runs; /x = mean tokens per verify round)")
    for k, v in report["per_kind"].items():
        if v["best_drafter"]:
            lines.append(f"{k}: best {v['best_drafter']} {v['speedup_vs_ours_ar']:.2f}x ours-ar, "
                         f"{v['speedup_vs_hf_prompt_lookup']:.2f}x {v['best_hf_prompt_lookup']}")
    return "\n".join(lines)


def run_checkpoint_bench(s: CheckpointBenchSettings) -> dict:
    bench = CheckpointBench(s)
    total = s.runs * len(bench.methods()) * len(bench.prompts)
    with tqdm(total=total, desc="bench engine", unit="gen") as progress:
        return bench.run(progress)
