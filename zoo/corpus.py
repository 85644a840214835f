"""The zoo's training text: what every Python installation carries, in three domains.

Where it sits: the first step of ``build_zoo``; nothing at serving time reads it.

- ``code``: the standard library's ``.py`` sources (tests, encodings tables and the
  generated documentation module left out).
- ``prose``: the documentation topics of ``pydoc_data.topics`` plus the docstrings of
  the standard library's modules, classes and functions.
- ``data``: generated structured records (``specfleet.zoo.records``).

The train/held-out split is by source file (a module's code and its docstrings fall
on the same side) and by topic name, from a hash of the name alone, so the held-out
set does not move with the seed and no held-out text leaks into training. The seed
only chooses which training files fill the size budget and the generated records.
"""

from __future__ import annotations

import hashlib
import inspect
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from specfleet.zoo.presets import DOMAINS, Corpus
from specfleet.zoo.records import generate_documents

HELDOUT_PERCENT = 10
# Directories whose files are not representative code: test suites (huge, repetitive),
# codec tables, generated docs (that is the prose domain), bundled wheels.
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "encodings",
              "pydoc_data", "ensurepip", "lib2to3", "config-3", "venv"}
_MAX_FILE_CHARS = 120_000  # a few giant modules would otherwise dominate a domain
_DOCSTRING = re.compile(r'"""(.*?)"""|\'\'\'(.*?)\'\'\'', re.DOTALL)


@dataclass
class DomainText:
    train: list[str]  # documents
    heldout: list[str]


def is_heldout(name: str) -> bool:
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < HELDOUT_PERCENT


def stdlib_sources() -> list[tuple[str, Path]]:
    """(relative path, path) of the standard library's Python files, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith("config-3") for part in rel.parts[:-1]):
            continue
        out.append((rel.as_posix(), path))
    return sorted(out)


def _docstrings(source: str) -> str:
    """Prose-like triple-quoted strings of a module, cleaned of indentation.

    A regex rather than ``ast``: an order of magnitude faster, and the few
    non-docstring triple-quoted strings it also catches are filtered as non-prose.
    """
    parts = []
    for match in _DOCSTRING.finditer(source):
        text = inspect.cleandoc(match.group(1) or match.group(2) or "")
        if len(text) < 60:
            continue
        letters = sum(ch.isalpha() or ch == " " for ch in text)
        if letters / len(text) < 0.75:  # tables, templates, code samples
            continue
        parts.append(text)
    return "\n\n".join(parts)


def _fill(docs: list[tuple[str, str]], budget: int, rng: random.Random | None) -> list[str]:
    """Documents (shuffled when ``rng`` is given) until ``budget`` characters."""
    docs = list(docs)
    if rng is not None:
        rng.shuffle(docs)
    # No single document may take more than a quarter of the budget: a small held-out
    # set should still span several files.
    cap = min(_MAX_FILE_CHARS, max(budget // 4, 1000))
    out, total = [], 0
    for _, text in docs:
        if total >= budget:
            break
        text = text[:cap]
        out.append(text)
        total += len(text)
    return out


def build_corpus(spec: Corpus, seed: int) -> dict[str, DomainText]:
    """Train and held-out documents per domain, deterministic for ``seed``."""
    import pydoc_data.topics

    rng = random.Random(f"corpus:{seed}")
    code = {"train": [], "heldout": []}
    prose = {"train": [], "heldout": []}
    for name, text in sorted(pydoc_data.topics.topics.items()):
        prose["heldout" if is_heldout(f"topic:{name}") else "train"].append((name, text.strip()))

    # Read files in a seeded order and stop once both domains are full: the whole
    # standard library (~30 MB) is far more than a zoo needs.
    files = stdlib_sources()
    order = list(range(len(files)))
    rng.shuffle(order)
    need = {"train": spec.train_chars, "heldout": spec.heldout_chars}
    have = {"code": {"train": 0, "heldout": 0}, "prose": {"train": 0, "heldout": 0}}

    def full(side: str) -> bool:
        return all(have[domain][side] >= need[side] for domain in have)

    for index in order:
        if full("train") and full("heldout"):
            break
        rel, path = files[index]
        side = "heldout" if is_heldout(rel) else "train"
        if full(side):
            continue
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        if len(source) < 200:
            continue
        code[side].append((rel, source))
        have["code"][side] += min(len(source), _MAX_FILE_CHARS)
        doc = _docstrings(source)
        if doc:
            prose[side].append((rel, doc))
            have["prose"][side] += len(doc)

    corpus = {
        # Training documents are shuffled (the seed's choice); held-out ones keep
        # file order so every seed evaluates on the same text.
        "code": DomainText(_fill(code["train"], spec.train_chars, rng),
                           _fill(code["heldout"], spec.heldout_chars, None)),
        "prose": DomainText(_fill(prose["train"], spec.train_chars, rng),
                            _fill(prose["heldout"], spec.heldout_chars, None)),
        "data": DomainText(generate_documents(spec.train_chars, f"data-train:{seed}"),
                           generate_documents(spec.heldout_chars, "data-heldout")),
    }
    assert set(corpus) == set(DOMAINS)
    return corpus
