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
    "cluster": {"router"},
    # The simulator runs the scheduler and policies, on simulated workers only.
    "sim": {"models", "zoo", "drafters", "verifiers", "router", "cluster", "benchmarks", "testing", "proto"},
}

# Files that decide (the scheduler, every policy) are told the time and never touch a
# tensor: the simulator runs them on a simulated clock without torch.
DECIDERS = [REPO / "engine" / "scheduler.py", REPO / "engine" / "pipeline.py",
            *sorted((REPO / "policy").glob("*.py"))]
WALL_CLOCK_OR_TENSORS = {"time", "datetime", "torch", "numpy", "ray"}


def imported_modules(path: Path):
    """(line, dotted module name) for every absolute import in ``path``."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def first_party_imports(path: Path):
    for line, name in imported_modules(path):
        parts = name.split(".")
        if parts[0] == "specfleet" and len(parts) > 1:
            yield line, parts[1]


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_folder_imports_follow_the_direction(folder):
    bad = [f"{path.relative_to(REPO)}:{line} imports specfleet.{pkg}"
           for path in sorted((REPO / folder).glob("*.py"))
           for line, pkg in first_party_imports(path) if pkg in FORBIDDEN[folder]]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("path", DECIDERS, ids=lambda p: str(p.relative_to(REPO)))
def test_deciders_read_no_clock_and_hold_no_tensors(path):
    bad = [f"line {line}: {name}" for line, name in imported_modules(path)
           if name.split(".")[0] in WALL_CLOCK_OR_TENSORS]
    assert not bad, f"{path.relative_to(REPO)} imports " + ", ".join(bad)


# The simulator may take only the schedulers of engine/: lockstep and pipelined (not the
# driver, the executors or the builder, which pull in drafters, verifiers and torch).
SIM_ALLOWED_ENGINE = {"specfleet.engine.scheduler", "specfleet.engine.pipeline"}
SIM_FORBIDDEN_THIRD_PARTY = {"torch", "ray", "transformers", "grpc"}


def test_sim_imports_only_the_scheduler_policies_and_core():
    bad = []
    for path in sorted((REPO / "sim").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for name in names:
                if name.startswith("specfleet.engine") and name not in SIM_ALLOWED_ENGINE:
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
                if name.split(".")[0] in SIM_FORBIDDEN_THIRD_PARTY:
                    bad.append(f"{path.relative_to(REPO)}:{node.lineno} imports {name}")
    assert not bad, "\n".join(bad)


def test_importing_the_simulator_loads_no_torch_or_ray():
    """Transitively, too: a fresh interpreter imports every sim module and checks."""
    import subprocess
    import sys

    modules = [f"specfleet.sim.{p.stem}" for p in sorted((REPO / "sim").glob("*.py")) if p.stem != "__init__"]
    code = ("import sys\n" + "".join(f"import {m}\n" for m in modules)
            + "bad = [m for m in ('torch', 'ray', 'transformers', 'grpc') if m in sys.modules]\n"
            + "assert not bad, bad\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


@pytest.mark.parametrize("path", sorted((REPO / "sim").glob("*.py")), ids=lambda p: str(p.relative_to(REPO)))
def test_the_simulator_reads_no_wall_clock(path):
    """Simulated entities are told the time; a caller that wants the simulation's own
    speed passes a clock in (``Simulator.run(wall_clock=...)``)."""
    bad = [f"line {line}: {name}" for line, name in imported_modules(path)
           if name.split(".")[0] in {"time", "datetime"}]
    assert not bad, f"{path.relative_to(REPO)} imports " + ", ".join(bad)
