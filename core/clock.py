"""Time, passed in: the scheduler and every policy are *told* the time, never read it.

Where it sits: the engine driver (``engine/driver.py``) reads a ``Clock`` once per
event and hands ``now_ns`` to ``Scheduler`` calls; the simulator (``sim/``) drives the
same scheduler from a simulated clock, and scheduler tests from a ``ManualClock``.
That is what lets a capacity plan be a prediction of this very scheduling code.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now_ns(self) -> int:
        """Nanoseconds on a monotonic time line (only differences mean anything)."""
        ...


class MonotonicClock:
    """Wall time for real deployments (``time.monotonic_ns``)."""

    def now_ns(self) -> int:
        return time.monotonic_ns()


class ManualClock:
    """A clock that moves only when told to (tests, simulation)."""

    def __init__(self, start_ns: int = 0):
        self._now = start_ns

    def now_ns(self) -> int:
        return self._now

    def advance(self, ns: int) -> int:
        if ns < 0:
            raise ValueError(f"a clock cannot go back ({ns} ns)")
        self._now += ns
        return self._now
