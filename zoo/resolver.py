"""Resolves ``zoo:<size>/<name>`` model paths to cached checkpoint directories.

Where it sits: ``specfleet.models.loading.resolve_model_path`` finds this resolver
through the ``specfleet.model_resolvers`` entry point (declared in pyproject.toml),
so ``models/`` never imports the zoo: the zoo depends on the runtime, not the other
way round. Building on first use happens here (``build_zoo``, minutes for ``small``).
"""

from __future__ import annotations

import logging
from pathlib import Path

from specfleet.zoo.presets import MODEL_NAMES, SIZES, read_manifest, zoo_dir

logger = logging.getLogger(__name__)

SCHEME = "zoo"


def parse_zoo_spec(spec: str) -> tuple[str, str] | None:
    """``"zoo:small/drafter-code"`` -> ``("small", "drafter-code")``; None for a plain path.

    Raises ValueError for a malformed zoo spec (unknown size or model name).
    """
    if not spec.startswith(SCHEME + ":"):
        return None
    size, sep, name = spec[len(SCHEME) + 1 :].partition("/")
    names = (*MODEL_NAMES, "tokenizer")  # the shared tokenizer has its own directory
    if not sep or size not in SIZES or name not in names:
        raise ValueError(
            f"{spec!r}: a zoo model is zoo:<size>/<name> with size one of {', '.join(SIZES)} "
            f"and name one of {', '.join(names)}"
        )
    return size, name


def resolve(spec: str, *, config_key: str, build: bool) -> Path:
    """The directory of zoo model ``spec``; builds the zoo first if allowed.

    Raises ValueError (malformed spec, or not built and ``build`` is False); the
    caller wraps it into an error naming the config key."""
    size, name = parse_zoo_spec(spec)
    root = zoo_dir(size)
    if read_manifest(root) is None:
        if not build:
            raise ValueError(f"{spec!r}: the {size} zoo is not built at {root}; "
                             f"run `specfleet zoo build --size {size}`")
        from specfleet.zoo.build import build_zoo

        logger.info("%s: %s is not built yet; building the %s zoo", config_key, spec, size)
        root = build_zoo(size, progress=True)
    return root / name
