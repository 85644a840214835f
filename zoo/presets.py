"""What each zoo size is made of, and where a built zoo lives on disk.

Where it sits: before anything runs. ``specfleet.models.loading`` maps a config path
such as ``zoo:small/target-xl`` to a directory through ``zoo_dir``; ``build_zoo``
reads the recipe from here. This module imports no torch, so the CLI's ``zoo path``
and config resolution stay instant.

A recipe is plain frozen dataclasses. Its hash (together with the seed, the format
version and the Python version, whose standard library *is* the corpus) names the
cache directory, so changing any setting builds a new zoo beside the old one instead
of silently reusing stale weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ZooSize = Literal["tiny", "small"]
SIZES: tuple[str, ...] = ("tiny", "small")
DOMAINS: tuple[str, ...] = ("code", "prose", "data")
DRAFTERS: tuple[str, ...] = ("drafter-general", "drafter-code", "drafter-prose", "drafter-data")
# A specialist grown, function-preservingly, to PEARL's cost regime (a draft step
# ~0.15-0.25 of a target-xl decode step): it emits exactly drafter-code's tokens.
GROWN_DRAFTERS: tuple[str, ...] = ("drafter-code-xl",)
MODEL_NAMES: tuple[str, ...] = ("target", "target-xl", *DRAFTERS, *GROWN_DRAFTERS)
# Bump when a change to the build code changes what a recipe produces.
# 2: the tokenizer ships a chat template (zoo/tokenizer.py); weights as in 1.
# 3: drafter-code-xl (a grown specialist, ``ZooRecipe.drafter_growth``).
FORMAT_VERSION = 3
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Arch:
    """A Llama shape. ``head_dim`` is fixed so growing the width adds heads."""

    hidden: int
    layers: int
    heads: int
    intermediate: int
    head_dim: int = 64
    tie_embeddings: bool = False
    max_positions: int = 512


@dataclass(frozen=True)
class Training:
    steps: int
    batch: int  # sequences per step
    seq_len: int
    lr: float
    # Sampling weight of each source per sequence: a domain name draws a window of real
    # text; "distill:<domain>" draws one of the target's greedy continuations.
    mix: dict[str, float] = field(default_factory=dict)
    warmup_frac: float = 0.05


@dataclass(frozen=True)
class DrafterRecipe:
    name: str
    domain: str  # "general" or one of DOMAINS
    arch: Arch
    training: Training
    # Target layers copied into the drafter before training (layer dropping); empty
    # means a random init. Embeddings, final norm and head come along when non-empty.
    init_from_target_layers: tuple[int, ...] = ()


@dataclass(frozen=True)
class Growth:
    """How ``target-xl`` is grown from ``target`` (see ``specfleet.zoo.grow``)."""

    width_factor: int  # hidden size multiplier: 1 or 4 (4 keeps RMSNorm bit-exact)
    layers: int  # total decoder layers after growth (>= the target's)
    intermediate: int  # MLP width after growth (>= the target's)


@dataclass(frozen=True)
class DrafterGrowth:
    """A drafter grown like target-xl (``specfleet.zoo.grow``): same tokens, more cost."""

    name: str
    source: str  # the trained drafter it computes the function of
    growth: Growth


@dataclass(frozen=True)
class Corpus:
    train_chars: int  # per domain
    heldout_chars: int  # per domain


@dataclass(frozen=True)
class Evaluation:
    heldout_windows: int  # windows per domain for held-out loss
    prompts: int  # held-out prompts per domain for acceptance
    prompt_tokens: int
    continuation_tokens: int  # the target's greedy continuation, teacher-forced
    window: int  # draft window for the mean-accepted-length figure
    timing_steps: int  # one-token decode forwards timed per model
    timing_context: int  # prompt length before timed decode steps
    xl_check_prompts: int  # prompts whose greedy output target-xl must reproduce
    xl_check_tokens: int


@dataclass(frozen=True)
class Distillation:
    prompts_per_domain: int  # training prompts the target continues greedily
    prompt_tokens: int
    continuation_tokens: int
    batch: int


@dataclass(frozen=True)
class ZooRecipe:
    size: str
    vocab_size: int
    corpus: Corpus
    target: Arch
    target_training: Training
    distillation: Distillation
    drafters: tuple[DrafterRecipe, ...]
    growth: Growth
    evaluation: Evaluation
    drafter_growth: DrafterGrowth
    # Fixed, not "all cores": float reductions depend on the thread count, so a fixed
    # count makes a seed reproduce the same weights on any machine. One, because on a
    # shared two-core machine a second thread's synchronisation turned a 14 s tiny
    # build into 405 s and made small-target steps 10x slower (0.16 vs 1.7 steps/s)
    # whenever another job held a core; idle, it was only 1.4x faster.
    train_threads: int = 1


def _drafters(arch: Arch, steps: int, batch: int, seq_len: int, lr: float,
              general_init: tuple[int, ...], own: float) -> tuple[DrafterRecipe, ...]:
    """The general drafter plus one specialist per domain.

    The general drafter starts from the target's first layers (it should know
    everything the target knows, cheaply). Specialists start from random weights and
    draw ``own`` of their sequences from their domain (real text and the target's
    continuations alike), so what they know is their domain. Measured on earlier
    builds of the small zoo: specialists initialised from the target kept most of its
    off-domain skill (own-domain acceptance only 1.1x off-domain); from scratch, a
    2.5% share of each other domain put the code specialist at 1.27x, 1% at 1.32x,
    none at 1.6x.
    """
    half = 0.5 / len(DOMAINS)
    general = {**{d: half for d in DOMAINS}, **{f"distill:{d}": half for d in DOMAINS}}
    out = [DrafterRecipe("drafter-general", "general", arch,
                         Training(steps, batch, seq_len, lr, general), general_init)]
    for dom in DOMAINS:
        others = [d for d in DOMAINS if d != dom]
        mix = {dom: own / 2, f"distill:{dom}": own / 2}
        if own < 1:
            mix.update({d: (1 - own) / len(others) for d in others})
        training = Training(steps, batch, seq_len, lr, mix)
        out.append(DrafterRecipe(f"drafter-{dom}", dom, arch, training))
    return tuple(out)


_EVEN = {d: 1 / len(DOMAINS) for d in DOMAINS}

RECIPES: dict[str, ZooRecipe] = {
    # Tests: every code path, in well under a minute on two cores.
    "tiny": ZooRecipe(
        size="tiny",
        vocab_size=1024,
        corpus=Corpus(train_chars=300_000, heldout_chars=40_000),
        target=Arch(hidden=64, layers=2, heads=2, intermediate=192, head_dim=32),
        target_training=Training(steps=150, batch=16, seq_len=128, lr=3e-3, mix=_EVEN),
        distillation=Distillation(prompts_per_domain=64, prompt_tokens=16,
                                  continuation_tokens=48, batch=64),
        drafters=_drafters(Arch(hidden=64, layers=1, heads=2, intermediate=192, head_dim=32),
                           steps=60, batch=16, seq_len=64, lr=3e-3, general_init=(0,), own=1.0),
        growth=Growth(width_factor=4, layers=4, intermediate=768),
        evaluation=Evaluation(heldout_windows=8, prompts=8, prompt_tokens=16,
                              continuation_tokens=24, window=4, timing_steps=8,
                              timing_context=16, xl_check_prompts=3, xl_check_tokens=16),
        drafter_growth=DrafterGrowth("drafter-code-xl", "drafter-code",
                                     Growth(width_factor=4, layers=2, intermediate=768)),
    ),
    # Demo and benchmarks: a few-million-parameter target, ~200M-parameter-cost target-xl.
    "small": ZooRecipe(
        size="small",
        vocab_size=4096,
        corpus=Corpus(train_chars=3_000_000, heldout_chars=150_000),
        target=Arch(hidden=192, layers=4, heads=3, intermediate=512),
        target_training=Training(steps=400, batch=32, seq_len=128, lr=3e-3, mix=_EVEN),
        distillation=Distillation(prompts_per_domain=384, prompt_tokens=32,
                                  continuation_tokens=96, batch=128),
        # One layer: on CPU a decode step's cost is mostly per-op overhead, and a second
        # layer bought under 0.01 acceptance in our measurements.
        drafters=_drafters(Arch(hidden=192, layers=1, heads=3, intermediate=512),
                           steps=150, batch=32, seq_len=128, lr=2e-3, general_init=(0,),
                           own=1.0),
        growth=Growth(width_factor=4, layers=24, intermediate=2560),
        evaluation=Evaluation(heldout_windows=48, prompts=48, prompt_tokens=32,
                              continuation_tokens=64, window=4, timing_steps=24,
                              timing_context=32, xl_check_prompts=6, xl_check_tokens=48),
        # 4 of target-xl's 24 layers at its width, and the same head: c ~ 0.18 by bytes.
        drafter_growth=DrafterGrowth("drafter-code-xl", "drafter-code",
                                     Growth(width_factor=4, layers=4, intermediate=2560)),
    ),
}


def recipe_for(size: str) -> ZooRecipe:
    if size not in RECIPES:
        raise ValueError(f"zoo size must be one of {', '.join(SIZES)}, got {size!r}")
    return RECIPES[size]


def train_precision() -> str:
    """``bf16`` (autocast) where the CPU computes bf16 natively, else ``fp32``.

    Emulated bf16 is no saving: on an AMD EPYC host without AVX-512 a small-zoo target
    step took 17 s under autocast against 1.7 s in fp32. ``SPECFLEET_ZOO_PRECISION``
    overrides the detection (bf16 or fp32)."""
    forced = os.environ.get("SPECFLEET_ZOO_PRECISION")
    if forced in ("bf16", "fp32"):
        return forced
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "fp32"
    return "bf16" if ("avx512_bf16" in flags or "amx_bf16" in flags) else "fp32"


def settings_hash(size: str, seed: int) -> str:
    """Twelve hex digits naming everything that determines a zoo's contents."""
    settings = {
        "format": FORMAT_VERSION,
        "recipe": dataclasses.asdict(recipe_for(size)),
        "seed": seed,
        # The corpus is this interpreter's standard library.
        "python": platform.python_version(),
    }
    precision = train_precision()
    if precision != "bf16":  # bf16 zoos keep the names they always had
        settings["train_precision"] = precision
    blob = json.dumps(settings, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def default_cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "specfleet" / "zoo"


def zoo_dir(size: str, seed: int = 0, root: str | Path | None = None) -> Path:
    """Where the zoo for these settings is (or would be) built."""
    root = Path(root) if root is not None else default_cache_root()
    return root / f"{size}-seed{seed}-{settings_hash(size, seed)}"


def read_manifest(directory: str | Path) -> dict | None:
    """The manifest of a *complete* zoo, or None (absent, partial or unreadable)."""
    directory = Path(directory)
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    if not manifest.get("complete"):
        return None
    for entry in manifest.get("models", {}).values():
        if not (directory / entry["path"] / "config.json").is_file():
            return None
    return manifest
