"""``build_zoo``: train, grow, measure and save one zoo, once per settings.

Where it sits: called by ``specfleet zoo build``, by the test suite's ``tiny_zoo``
fixture, and by ``specfleet.models.loading`` when a config names ``zoo:<size>/<name>``
that is not built yet. After that the zoo is ordinary Hugging Face checkpoint
directories plus a ``manifest.json``; serving never imports this module.

Caching: a zoo lives in ``<root>/<size>-seed<seed>-<settings hash>`` (see
``specfleet.zoo.presets``). A directory is complete exactly when its manifest says
so; the build writes into a hidden temporary directory and renames it into place as
its last act, under a per-zoo file lock, so a killed or concurrent build never leaves
something that looks complete. Same settings, same seed, same thread count: same
weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import transformers

from specfleet.zoo import measure
from specfleet.zoo.corpus import build_corpus
from specfleet.zoo.grow import grow
from specfleet.zoo.presets import (
    DOMAINS,
    FORMAT_VERSION,
    MANIFEST,
    ZooRecipe,
    ZooSize,
    read_manifest,
    recipe_for,
    settings_hash,
    zoo_dir,
)
from specfleet.zoo.tokenizer import train_tokenizer
from specfleet.zoo.train import (
    BatchSampler,
    Distilled,
    greedy_continue,
    init_from_target,
    llama_config,
    new_model,
    sample_prompts,
    spaced_prompts,
    train,
)

logger = logging.getLogger(__name__)


def build_zoo(size: ZooSize = "tiny", out_dir: str | Path | None = None, seed: int = 0,
              progress: bool = True) -> Path:
    """Build (or find in the cache) the zoo of ``size`` and return its directory.

    ``out_dir`` is the cache root the zoo's hashed directory goes in (default
    ``$XDG_CACHE_HOME/specfleet/zoo``, else ``~/.cache/specfleet/zoo``). A complete zoo
    with the same settings is returned at once without touching it.
    """
    recipe = recipe_for(size)
    final = zoo_dir(size, seed, out_dir)
    if read_manifest(final) is not None:
        logger.info("zoo %s (seed %d) found in cache: %s", size, seed, final)
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with _lock(final.parent / f".{final.name}.lock"):
        if read_manifest(final) is not None:  # a concurrent build finished first
            return final
        for stale in final.parent.glob(f".{final.name}.tmp-*"):
            shutil.rmtree(stale, ignore_errors=True)  # left by a killed build; we hold the lock
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            logger.info("building zoo %s (seed %d) into %s", size, seed, final)
            with _torch_threads(recipe.train_threads):
                manifest = _Build(recipe, seed, tmp, progress).run()
            manifest["settings_hash"] = settings_hash(size, seed)
            # The manifest is written last and the rename is atomic: a directory at
            # ``final`` with a complete manifest is a complete zoo.
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            os.chmod(tmp, 0o755)  # mkdtemp makes it private; a cache is for every user
            if final.exists():
                shutil.rmtree(final)  # an incomplete leftover (read_manifest said so)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    logger.info("zoo %s built in %.0f s: %s", size, manifest["build_wall_s"], final)
    return final


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process building the same zoo (%s)", path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No per-shard progress bars from save_pretrained: the build has its own."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _stream(tokenizer, docs: list[str]) -> torch.Tensor:
    """Documents tokenized and joined, each followed by end-of-text: [n_tokens]."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


class _Build:
    """One build's steps, in order; ``run`` returns the manifest (minus the hash)."""

    def __init__(self, recipe: ZooRecipe, seed: int, out: Path, progress: bool):
        self.recipe, self.seed, self.out, self.progress = recipe, seed, out, progress
        self.phase_s: dict[str, float] = {}
        self.models: dict[str, dict] = {}

    @contextlib.contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.phase_s[name] = round(time.perf_counter() - start, 2)
        logger.info("zoo %s: %s done in %.1f s", self.recipe.size, name, self.phase_s[name])

    def run(self) -> dict:
        r, start = self.recipe, time.perf_counter()
        with self._phase("corpus_and_tokenizer"):
            corpus = build_corpus(r.corpus, self.seed)
            tok = train_tokenizer([d for dom in DOMAINS for d in corpus[dom].train], r.vocab_size)
            train_streams = {d: _stream(tok, corpus[d].train) for d in DOMAINS}
            heldout_streams = {d: _stream(tok, corpus[d].heldout) for d in DOMAINS}
        self.tok = tok

        with self._phase("target"):
            target = self._train_target(train_streams)
        with self._phase("distillation_data"):
            distilled = self._distill(target, train_streams)
        drafters = {}
        with self._phase("drafters"):
            for i, spec in enumerate(r.drafters):
                drafters[spec.name] = self._train_drafter(i, spec, target, train_streams, distilled)
        with self._phase("evaluation"):
            acceptance = self._evaluate(target, drafters, heldout_streams)
        with self._phase("target_xl"):
            xl = grow(target, r.growth, self.seed * 1000 + 999)
            xl_check = self._check_xl(target, xl, heldout_streams)
        grown = r.drafter_growth
        with self._phase("drafter_xl"):
            source = drafters[grown.source]
            drafter_xl = grow(source, grown.growth, self.seed * 1000 + 998)
            drafter_xl_check = self._check_grown(source, drafter_xl, heldout_streams)
        with self._phase("timing"):
            cost = self._time({"target": target, "target-xl": xl, **drafters, grown.name: drafter_xl})
        with self._phase("save"), _quiet_transformers():
            self._save("target", target)
            self._save("target-xl", xl)
            for name, model in drafters.items():
                self._save(name, model)
            self._save(grown.name, drafter_xl)
            tok.save_pretrained(self.out / "tokenizer")
        self.models["target-xl"].update(
            role="target-xl", domain="general", grown_from="target",
            growth=dataclasses.asdict(r.growth), heldout_loss=None,
            note="computes the trained target's function; see target_xl_check")
        source_entry = self.models[grown.source]
        self.models[grown.name].update(
            role="drafter", domain=source_entry["domain"], grown_from=grown.source,
            growth=dataclasses.asdict(grown.growth), heldout_loss=source_entry.get("heldout_loss"),
            c_vs_target_xl=cost["c_vs_target_xl"][grown.name],
            note=f"computes {grown.source}'s function at PEARL's cost regime; see drafter_xl_check")
        acceptance[grown.name] = acceptance[grown.source]  # same tokens (checked below)

        return {
            "format": FORMAT_VERSION,
            "complete": True,
            "size": r.size,
            "seed": self.seed,
            "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_wall_s": round(time.perf_counter() - start, 1),
            "phase_wall_s": self.phase_s,
            "environment": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "train_threads": r.train_threads,
                "cpu": platform.processor() or platform.machine(),
            },
            "domains": list(DOMAINS),
            "tokenizer": {
                "path": "tokenizer",
                "vocab_size": len(tok),
                "eos_token_id": tok.eos_token_id,
                "bos_token_id": tok.bos_token_id,
                "pad_token_id": tok.pad_token_id,
            },
            "corpus": {
                d: {"train_docs": len(corpus[d].train), "train_tokens": train_streams[d].numel(),
                    "heldout_docs": len(corpus[d].heldout),
                    "heldout_tokens": heldout_streams[d].numel()}
                for d in DOMAINS
            },
            "models": self.models,
            "acceptance": acceptance,
            "cost": cost,
            "target_xl_check": xl_check,
            "drafter_xl_check": drafter_xl_check,
            "recipe": dataclasses.asdict(r),
        }

    def _config(self, arch):
        return llama_config(arch, len(self.tok), eos_id=self.tok.eos_token_id,
                            pad_id=self.tok.pad_token_id)

    def _train_target(self, streams: dict[str, torch.Tensor]):
        r = self.recipe
        model = new_model(self._config(r.target), self.seed * 1000)
        sampler = BatchSampler(streams, {}, r.target_training.mix, r.target_training.seq_len,
                               self.seed * 1000 + 1)
        stats = train(model, sampler, r.target_training, desc="target", progress=self.progress)
        self._record("target", model, "target", "general", r.target_training, stats)
        return model

    def _distill(self, target, streams: dict[str, torch.Tensor]) -> dict[str, Distilled]:
        spec = self.recipe.distillation
        out = {}
        for k, dom in enumerate(DOMAINS):
            prompts = sample_prompts(streams[dom], spec.prompts_per_domain, spec.prompt_tokens,
                                     self.seed * 1000 + 10 + k)
            out[dom] = greedy_continue(target, prompts, spec.continuation_tokens, spec.batch,
                                       desc=f"distill {dom}", progress=self.progress)
        return out

    def _train_drafter(self, index: int, spec, target, streams, distilled):
        model = new_model(self._config(spec.arch), self.seed * 1000 + 100 + index)
        if spec.init_from_target_layers:
            init_from_target(model, target, spec.init_from_target_layers)
        sampler = BatchSampler(streams, distilled, spec.training.mix, spec.training.seq_len,
                               self.seed * 1000 + 200 + index)
        stats = train(model, sampler, spec.training, desc=spec.name, progress=self.progress)
        self._record(spec.name, model, "drafter", spec.domain, spec.training, stats)
        return model

    def _record(self, name, model, role, domain, training, stats) -> None:
        self.models[name] = {
            "path": name,
            "role": role,
            "domain": domain,
            "params": measure.param_count(model),
            "arch": _arch(model.config),
            "train": {"steps": stats.steps, "tokens": stats.tokens,
                      "wall_s": round(stats.wall_s, 1), "final_loss": round(stats.final_loss, 4),
                      "mix": training.mix},
        }

    def _evaluate(self, target, drafters, heldout) -> dict:
        ev = self.recipe.evaluation
        seq_len = self.recipe.target_training.seq_len
        for name, model in {"target": target, **drafters}.items():
            self.models[name]["heldout_loss"] = {
                d: round(measure.heldout_loss(model, heldout[d], ev.heldout_windows, seq_len), 4)
                for d in DOMAINS
            }
        acceptance: dict[str, dict] = {name: {} for name in drafters}
        for dom in DOMAINS:
            prompts = spaced_prompts(heldout[dom], ev.prompts, ev.prompt_tokens)
            path = greedy_continue(target, prompts, ev.continuation_tokens, batch=64)
            for name, model in drafters.items():
                flags = measure.match_flags(model, path)
                run = measure.mean_accepted(flags, ev.window)
                acceptance[name][dom] = {
                    "greedy_acceptance": round(flags.float().mean().item(), 4),
                    f"mean_accepted_w{ev.window}": round(run, 3),
                    "positions": flags.numel(),
                }
        return acceptance

    def _check_xl(self, target, xl, heldout) -> dict:
        """Does target-xl emit the target's greedy tokens? Measured, never assumed."""
        return self._check_grown(target, xl, heldout)

    def _check_grown(self, target, xl, heldout) -> dict:
        """Does a grown model emit its source's greedy tokens? Measured, never assumed."""
        ev = self.recipe.evaluation
        prompts = torch.cat([spaced_prompts(heldout[d], ev.xl_check_prompts, ev.prompt_tokens)
                             for d in DOMAINS])
        small = greedy_continue(target, prompts, ev.xl_check_tokens, batch=64)
        big = greedy_continue(xl, prompts, ev.xl_check_tokens, batch=64)
        with torch.inference_mode():  # prompts only: a full-length xl forward costs ~10 s
            diff = target(input_ids=prompts).logits - xl(input_ids=prompts).logits
        return {
            "prompts": prompts.shape[0],
            "new_tokens_per_prompt": ev.xl_check_tokens,
            "greedy_tokens_identical": bool(torch.equal(small.tokens, big.tokens)),
            "max_abs_logit_diff_on_prompts": diff.abs().max().item(),
        }

    def _time(self, models: dict) -> dict:
        ev = self.recipe.evaluation
        with _torch_threads(1):
            ms = {name: measure.decode_ms(m, ev.timing_context, ev.timing_steps, len(self.tok))
                  for name, m in models.items()}
        drafters = [n for n in models if n.startswith("drafter-")]
        return {
            "what": "one-token decode forward with KV cache, batch 1, fp32, 1 torch thread, median",
            "decode_ms": {n: round(v, 3) for n, v in ms.items()},
            "c_vs_target": {n: round(ms[n] / ms["target"], 4) for n in drafters},
            "c_vs_target_xl": {n: round(ms[n] / ms["target-xl"], 4) for n in drafters},
        }

    def _save(self, name: str, model) -> None:
        directory = self.out / name
        model.save_pretrained(directory)
        self.tok.save_pretrained(directory)
        entry = self.models.setdefault(name, {"path": name})
        entry.setdefault("params", measure.param_count(model))
        entry.setdefault("arch", _arch(model.config))


def _arch(config) -> dict:
    return {"hidden": config.hidden_size, "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads, "intermediate": config.intermediate_size,
            "vocab": config.vocab_size, "tied_embeddings": config.tie_word_embeddings}
