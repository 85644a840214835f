"""Both install modes expose every top-level folder as ``specfleet.<name>``.

``proto`` in particular must import as ``specfleet.proto``: a top-level ``proto``
would be shadowed by proto-plus, which ``ray[default]`` installs.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
SUBPACKAGES = sorted(
    tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
)
REQUIRED = {"cluster", "drafters", "verifiers", "router", "proto"}

pytestmark = pytest.mark.integration


def test_required_layout_is_packaged():
    assert REQUIRED <= {p.split(".")[-1] for p in SUBPACKAGES}
    for name in REQUIRED | {"configs", "tests"}:
        assert (REPO / name).is_dir(), name


def test_editable_install_imports_every_subpackage():
    code = f"import importlib\nfor name in {SUBPACKAGES!r}:\n    importlib.import_module(name)\n"
    code += "import specfleet.proto, os; print(os.path.dirname(specfleet.proto.__file__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()) == REPO / "proto"


def test_wheel_install_imports_every_subpackage(tmp_path):
    wheel_dir, target, source = tmp_path / "wheel", tmp_path / "site", tmp_path / "src"
    # Build from a clean copy: setuptools reuses ./build, which could carry stale files.
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(wheel_dir), str(source)],
        capture_output=True, text=True,
    )
    assert build.returncode == 0, build.stderr
    (wheel,) = wheel_dir.glob("specfleet-*.whl")
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        capture_output=True, text=True,
    )
    assert install.returncode == 0, install.stderr
    # -S skips site-packages (and so the editable install's finder); the installed
    # dependencies are appended after the wheel's copy so imports resolve to the wheel.
    site = sysconfig.get_paths()["purelib"]
    code = (
        f"import sys; sys.path[:0] = [{str(target)!r}]; sys.path.append({site!r})\n"
        f"import importlib\nfor name in {SUBPACKAGES!r}:\n"
        f"    mod = importlib.import_module(name)\n"
        f"    assert mod.__file__.startswith({str(target)!r}), mod.__file__\n"
    )
    out = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0, out.stderr
