"""SpecFleet's own model zoo: a small target, domain-specialist drafters and target-xl.

Where it sits: before serving. Configs name zoo models as ``zoo:<size>/<name>``;
``specfleet.models.loading`` resolves that to a cached Hugging Face checkpoint
directory, building the zoo on first use (``build_zoo``). See docs/zoo.md.

Importing this package is cheap (no torch); ``build_zoo`` is imported on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from specfleet.zoo.presets import (
    DOMAINS,
    MODEL_NAMES,
    SIZES,
    default_cache_root,
    read_manifest,
    zoo_dir,
)

if TYPE_CHECKING:
    from specfleet.zoo.build import build_zoo

__all__ = ["DOMAINS", "MODEL_NAMES", "SIZES", "build_zoo", "default_cache_root", "read_manifest",
           "zoo_dir"]


def __getattr__(name: str):
    if name == "build_zoo":
        from specfleet.zoo.build import build_zoo

        return build_zoo
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
