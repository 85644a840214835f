"""Render the configuration reference (docs/configuration.md) from the schema itself.

Where it sits: documentation only. A test regenerates the text and compares it with
the committed file, so the reference can never drift from the dataclasses.
Regenerate with ``python -m specfleet.core.config_reference > docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses

from specfleet.core import config as schema

SECTIONS = [
    ("models", schema.ModelsConfig),
    ("drafters[]", schema.DrafterConfig),
    ("drafters[].resources, verifier.resources", schema.ResourcesConfig),
    ("verifier", schema.VerifierConfig),
    ("router", schema.RouterConfig),
    ("scheduler", schema.SchedulerConfig),
    ("server", schema.ServerConfig),
    ("cluster", schema.ClusterConfig),
]

HEADER = """# Configuration reference

Generated from `core/config.py` by `python -m specfleet.core.config_reference`; do not
edit by hand. A file is validated with `specfleet config validate FILE` and shown with
every default filled in by `specfleet config show FILE`. Unknown keys, missing
required keys, wrong types, bad enum values and out-of-range numbers are rejected with
the file and key path in the message.
"""


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return "*required*"
    if dataclasses.is_dataclass(value):
        return "(section)"
    return f"`{value}`"


def render() -> str:
    lines = [HEADER]
    for name, cls in SECTIONS:
        lines += [f"## `{name}`", "", "| key | default | meaning |", "|---|---|---|"]
        for f in dataclasses.fields(cls):
            extra = f" (>= {f.metadata['min']})" if "min" in f.metadata else ""
            lines.append(f"| `{f.name}` | {_default(f)} | {f.metadata.get('help', '')}{extra} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render(), end="")
