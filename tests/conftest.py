"""Fixtures shared by the whole suite.

``tiny_zoo`` builds SpecFleet's tiny model zoo once per test session (or finds it in
the cache, ``$XDG_CACHE_HOME/specfleet/zoo``), so every test that needs trained
checkpoints shares one build of well under a minute.
"""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def _torch_one_thread():
    """One torch thread per test process: the suite shares two cores with everything
    else, and single-threaded float reductions make results reproducible. The zoo
    build sets its own thread count for training and restores this afterwards."""
    try:
        import torch
    except ImportError:  # a test environment without torch still runs the light tests
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_zoo() -> Path:
    """The tiny zoo's directory (built on first use, then a cache hit)."""
    from specfleet.zoo.build import build_zoo

    return build_zoo("tiny", progress=False)
