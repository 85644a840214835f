"""``specfleet profile``: measure this machine's drafters and verifier for the simulator.

Where it sits: offline, before ``specfleet simulate`` / ``plan`` / ``bench
sim-validate``. Loads the models a serving config names (the real ``Verifier`` and
``ModelDrafter`` built by ``engine/builder.py``) and times the real calls over a
small grid — batch size × tokens per request × context — exactly as the scheduler
makes them (a first call carrying the prompt, then calls at a committed position
with a short delta and a window). The samples are written raw to a profile file;
``sim/step_time.FittedStepTime`` fits its cost model to them when it loads the file.

``--acceptance`` also runs the real engine on held-out zoo prompts of every domain
with every drafter at a fixed window and records each round's (window, accepted):
``sim/acceptance.AcceptanceCurves.from_rounds`` turns those into per-drafter,
per-domain, per-position curves (written into the same file).

The per-round overhead (driver, scheduler, executor, Python between the timed
calls) is measured by running the real ``SpecEngine`` for a few rounds and
comparing each step's wall time with the compute it reported.
"""

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import dataclass

import torch

from specfleet.core.config import SpecFleetConfig
from specfleet.core.types import DraftProposal, DraftRequest, SamplingParams
from specfleet.core.workers import VerifyCall

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProfileGrid:
    batches: tuple[int, ...] = (1, 2, 4)
    contexts: tuple[int, ...] = (32, 128)
    windows: tuple[int, ...] = (1, 3, 6)  # draft positions / draft tokens verified
    repeats: int = 3  # medians of this many timings per point


TINY_GRID = ProfileGrid(batches=(1, 2), contexts=(16, 48), windows=(1, 4), repeats=2)


def _grid_points(grid: ProfileGrid, prefix: str):
    """(batch, context, window, request ids) for every repeat of every grid point;
    ids are fresh per point so no call finds another point's state."""
    n = 0
    for b in grid.batches:
        for ctx in grid.contexts:
            for w in grid.windows:
                for _ in range(grid.repeats):
                    yield b, ctx, w, [f"{prefix}{n}-{i}" for i in range(b)]
                    n += 1


def _timed_ns(call, calls) -> int:
    start = time.perf_counter_ns()
    call(calls)
    return time.perf_counter_ns() - start


def profile_verifier(verifier, grid: ProfileGrid, vocab: int) -> list[list[float]]:
    """Samples [batch, tokens, context, ns] of real verify calls."""
    samples = []
    greedy = SamplingParams(max_new_tokens=8)
    for b, ctx, w, rids in _grid_points(grid, "p"):
        prompt = [(7 * i + 3) % vocab for i in range(ctx)]
        drafts = [DraftProposal(r, [5] * w, DraftProposal.chain_parents(w), [1.0] * w) for r in rids]
        first = [VerifyCall(r, 0, prompt, greedy, p) for r, p in zip(rids, drafts)]
        samples.append([b, b * (ctx + w), b * ctx, _timed_ns(verifier.verify, first)])
        later = [VerifyCall(r, ctx, [9, 11], greedy, p) for r, p in zip(rids, drafts)]
        samples.append([b, b * (2 + w), b * (ctx + 2), _timed_ns(verifier.verify, later)])
        for r in rids:
            verifier.release(r)
    return samples


def profile_drafter(drafter, grid: ProfileGrid, vocab: int) -> list[list[float]]:
    """Samples [batch, new_tokens, positions, context, ns] of real draft calls."""
    samples = []
    greedy = SamplingParams(max_new_tokens=8)
    for b, ctx, w, rids in _grid_points(grid, "q"):
        prompt = [(5 * i + 1) % vocab for i in range(ctx)]
        first = [DraftRequest(r, 0, prompt, w, greedy) for r in rids]
        samples.append([b, b * ctx, w, b * ctx, _timed_ns(drafter.propose, first)])
        later = [DraftRequest(r, ctx, [9, 11], w, greedy) for r in rids]
        samples.append([b, b * 2, w, b * (ctx + 2), _timed_ns(drafter.propose, later)])
        for r in rids:
            drafter.release(r)
    return samples


def run_profile(cfg: SpecFleetConfig, *, grid: ProfileGrid, threads: int = 1,
                acceptance: bool = False, acceptance_prompts: int = 3, acceptance_window: int = 6,
                max_new_tokens: int = 32, progress=None) -> dict:
    from specfleet.benchmarks.engine_bench import machine_description
    from specfleet.engine.builder import build_drafter, build_verifier, with_context_length

    cfg = with_context_length(cfg)
    torch.set_num_threads(threads)
    # Every point must fit the KV cache: context + drafts + the delta of the later call.
    room = cfg.verifier.max_seq_len - max(grid.windows) - 4
    contexts = tuple(c for c in grid.contexts if c <= room) or (room,)
    if room < 1:
        raise ValueError(f"verifier.max_seq_len ({cfg.verifier.max_seq_len}) is too small to profile")
    grid = ProfileGrid(grid.batches, contexts, grid.windows, grid.repeats)
    verifier = build_verifier(cfg)
    vocab = verifier.runner.vocab_size
    slots = max(max(grid.batches), cfg.verifier.max_batch_size)
    drafters = {d.name: build_drafter(d, target=cfg.models.target, max_slots=slots,
                                      max_seq_len=cfg.verifier.max_seq_len) for d in cfg.drafters}
    profile = {"machine": machine_description(), "target": cfg.models.target, "threads": threads,
               "grid": {"batches": grid.batches, "contexts": grid.contexts, "windows": grid.windows},
               "verifier": profile_verifier(verifier, grid, vocab), "drafters": {}}
    if progress:
        progress("verifier")
    for name, drafter in drafters.items():
        if hasattr(drafter, "runner"):  # model drafters cost; n-gram/suffix are ~free
            profile["drafters"][name] = profile_drafter(drafter, grid, vocab)
        if progress:
            progress(name)
    profile["round_overhead_ns"] = measure_overhead(verifier, drafters, cfg)
    if acceptance:
        measured = measure_acceptance(
            cfg, verifier, drafters, prompts=acceptance_prompts, window=acceptance_window,
            max_new_tokens=max_new_tokens)
        # The engine rounds of that run are step-time samples too, taken in situ.
        profile["verifier"] += measured.pop("verifier_samples")
        for name, samples in measured.pop("drafter_samples").items():
            profile["drafters"].setdefault(name, []).extend(samples)
        profile["round_overhead_ns"] = measured.pop("round_overhead_ns")
        profile["acceptance"] = measured
    return profile


def measure_overhead(verifier, drafters, cfg: SpecFleetConfig, rounds: int = 12) -> float:
    """Median of (step wall − reported compute) per verifier group over real steps."""
    from specfleet.engine.engine import SpecEngine
    from specfleet.policy.draft_length import FixedDraftLength

    name = next(iter(drafters))
    engine = SpecEngine(verifier, drafters, draft_policy=FixedDraftLength(3),
                        max_batch_size=cfg.verifier.max_batch_size)
    vocab = verifier.runner.vocab_size
    for i in range(2):
        engine.submit([(3 * j + i) % vocab for j in range(24)],
                      SamplingParams(max_new_tokens=4 * rounds, ignore_eos=True), drafter=name)
    gaps = []
    while engine.has_work and len(gaps) < rounds:
        before = len(engine.timings)
        start = time.perf_counter_ns()
        engine.step()
        wall = time.perf_counter_ns() - start
        compute = sum(t.draft_compute_ns + t.verify_compute_ns for t in list(engine.timings)[before:])
        gaps.append(wall - compute)
    for rid in engine.request_ids:
        engine.cancel(rid)
    return float(statistics.median(gaps)) if gaps else 0.0


class _RecordingExecutor:
    """Wraps the engine's executor to keep, per round, each request's (window, accepted)
    and each call's shape and measured time — step-time samples in the profile's
    formats taken *in situ*, where drafters and the verifier take turns on the cores
    (isolated grid timings alone ran ~20 % fast: warm caches, no interleaving)."""

    def __init__(self, inner):
        self.inner = inner
        self.rounds: list[tuple[str, int, int]] = []
        self.drafter_samples: dict[str, list[list[float]]] = {}
        self.verifier_samples: list[list[float]] = []
        self.lengths: dict[str, int] = {}  # request → committed length as last told

    def run_rounds(self, plans):
        outcomes = self.inner.run_rounds(plans)
        for plan, outcome in zip(plans, outcomes):
            drafted: dict[str, int] = {}
            for name, calls in plan.drafts.items():
                reply = outcome.drafts.get(name)
                if not hasattr(reply, "proposals"):
                    continue
                new = sum(len(c.new_tokens) for c in calls)
                ctx = sum(c.position + len(c.new_tokens) for c in calls)
                positions = max((len(p) for p in reply.proposals), default=0)
                for p in reply.proposals:
                    drafted[p.request_id] = len(p)
                self.drafter_samples.setdefault(name, []).append(
                    [len(calls), new, positions, ctx, reply.compute_ns])
            verify = outcome.verify
            if hasattr(verify, "results"):
                tokens = sum(len(c.new_tokens) + drafted.get(c.request_id, 0) for c in plan.verify)
                ctx = sum(c.position + len(c.new_tokens) for c in plan.verify)
                self.verifier_samples.append([len(plan.verify), tokens, ctx, verify.compute_ns])
                for result in verify.results:
                    if result.num_drafted:
                        self.rounds.append((result.request_id, result.num_drafted, result.num_accepted))
        return outcomes

    def housekeeping(self, work):
        self.inner.housekeeping(work)

    def idle(self):
        self.inner.idle()


def measure_acceptance(cfg: SpecFleetConfig, verifier, drafters, *, prompts: int, window: int,
                       max_new_tokens: int) -> dict:
    """Per-drafter, per-domain, per-position curves on held-out zoo prompts (greedy)."""
    from specfleet.benchmarks.engine_bench import DOMAINS, heldout_prompts
    from specfleet.engine.engine import SpecEngine
    from specfleet.models.loading import load_tokenizer
    from specfleet.policy.draft_length import FixedDraftLength
    from specfleet.sim.acceptance import AcceptanceCurves

    source = cfg.models.tokenizer or cfg.models.target
    if not source.startswith("zoo:"):
        raise ValueError("--acceptance needs a zoo target (its held-out prompts are the zoo's)")
    tokenizer = load_tokenizer(source)
    held = heldout_prompts(source[4:].split("/")[0], tokenizer, prompts, 48)
    engine = SpecEngine(verifier, drafters, draft_policy=FixedDraftLength(window), max_batch_size=4)
    recorder = _RecordingExecutor(engine.executor)
    engine.executor = recorder
    owner: dict[str, tuple[str, str]] = {}
    sampling = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True)
    overheads: list[int] = []
    for name in drafters:
        for domain in DOMAINS:
            for prompt in held[domain]:
                rid = engine.submit(prompt, sampling, drafter=name)
                owner[rid] = (name, domain)
        while engine.has_work:
            before = len(engine.timings)
            start = time.perf_counter_ns()
            engine.step()
            wall = time.perf_counter_ns() - start
            done = list(engine.timings)[before:]
            overheads.append(wall - sum(t.draft_compute_ns + t.verify_compute_ns for t in done))
    rounds = [(*owner[rid], w, a) for rid, w, a in recorder.rounds]
    curves = AcceptanceCurves.from_rounds(rounds)
    return {"curves": curves.curves, "window": window, "prompts_per_domain": prompts,
            "rounds": len(rounds), "verifier_samples": recorder.verifier_samples,
            "drafter_samples": recorder.drafter_samples,
            "round_overhead_ns": float(statistics.median(overheads)) if overheads else 0.0}
