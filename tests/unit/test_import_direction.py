"""The documented import direction (ARCHITECTURE.md), checked on the source files.

Each rule names a folder and the first-party packages it may not import; a new
violation fails here with the file and line instead of surfacing as a cycle later.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# folder → first-party packages (specfleet.<name>) its modules must not import
FORBIDDEN = {
    "core": {"models", "zoo", "drafters", "verifiers", "engine", "policy", "router", "cluster", "benchmarks"},
    "policy": {"models", "zoo", "drafters", "verifiers", "engine", "router", "cluster", "benchmarks"},
    "drafters": {"verifiers", "engine", "router", "cluster", "zoo"},
    "models": {"zoo", "drafters", "verifiers", "engine", "router", "cluster"},
    "verifiers": {"drafters", "engine", "router", "cluster", "zoo"},
}


def first_party_imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "specfleet" and len(parts) > 1:
                yield node.lineno, parts[1]


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folder_imports_follow_the_direction(folder):
    bad = [f"{path.relative_to(REPO)}:{line} imports specfleet.{pkg}"
           for path in sorted((REPO / folder).glob("*.py"))
           for line, pkg in first_party_imports(path) if pkg in FORBIDDEN[folder]]
    assert not bad, "\n".join(bad)
