"""Keeps one actor alive: start, readiness, restart with backoff, shutdown.

Where it sits: under each handle (``handles.py``: one per drafter and per verifier
group). The handles decide *when* an actor has failed (a dead actor, a call past its
timeout, a replacement that died while starting); the supervisor only replaces it,
within a ``RestartBudget``: at most ``max_failures`` failures within ``window_s``
seconds (or in a row, with no good call between them), the k-th failure in a row
waiting ``backoff_s * 2**(k-2)`` (capped) before the next start. Past the budget
the slot is *given up* until its oldest failure leaves the window; the handle
decides what that means for requests (``WorkerUnavailable`` for a verifier group).
A replaced actor holds no request state, and nothing here tries to rebuild it: the
scheduler re-sends every request from position 0 when a worker answers
``FailureKind.LOST`` or reports a request as unknown (the position contract,
``core/workers.py``).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable

logger = logging.getLogger(__name__)


def kill_actor(actor) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already dead, or the cluster is shutting down
        pass


class RestartBudget:
    """How often one actor slot may fail before it is given up, and how long to wait
    between starts. ``clock`` is injectable for unit tests (monotonic seconds)."""

    def __init__(self, max_failures: int = 5, window_s: float = 60.0, backoff_s: float = 0.5,
                 backoff_max_s: float = 5.0, clock: Callable[[], float] = time.monotonic):
        self.max_failures = max_failures
        self.window_s = window_s
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._clock = clock
        self._failures: deque[float] = deque()  # times of failures within the window
        self.in_a_row = 0  # failures since the last good call

    @classmethod
    def from_config(cls, cluster) -> RestartBudget:
        return cls(cluster.restart_max_failures, cluster.restart_window_s,
                   cluster.restart_backoff_s, cluster.restart_backoff_max_s)

    def _trim(self) -> None:
        now = self._clock()
        while self._failures and now - self._failures[0] >= self.window_s:
            self._failures.popleft()

    def recent(self) -> int:
        """Failures within the window."""
        self._trim()
        return len(self._failures)

    def exhausted(self) -> bool:
        """Too many failures within the window, or too many in a row with the last one
        within the window (a slot that never works gets one try per window)."""
        if self.recent() >= self.max_failures:
            return True
        return self.in_a_row >= self.max_failures and bool(self._failures)

    def record(self) -> None:
        self._trim()
        self._failures.append(self._clock())
        self.in_a_row += 1

    def succeeded(self) -> None:
        """A call went through: failures in a row start again from 0 (the window stays)."""
        self.in_a_row = 0

    def delay_s(self) -> float:
        """Wait before the next start: none after a first failure (a crash is usually a
        one-off), then doubling from ``backoff_s`` up to ``backoff_max_s``."""
        if self.in_a_row <= 1:
            return 0.0
        return min(self.backoff_s * 2 ** (self.in_a_row - 2), self.backoff_max_s)

    def free_at(self) -> float:
        """When a given-up slot may start again: its oldest failure leaves the window."""
        self._trim()
        if not self._failures:
            return self._clock()
        if len(self._failures) >= self.max_failures:
            return self._failures[0] + self.window_s
        return self._failures[-1] + self.window_s

    def describe(self) -> str:
        return f"{self.recent()} failures within {self.window_s:g} s ({self.in_a_row} in a row)"


class ActorSupervisor:
    """One actor slot: ``actor`` is the current incarnation (a new one after ``restart``)."""

    def __init__(self, name: str, spawn: Callable[[], object], *, budget: RestartBudget | None = None):
        self.name = name
        self._spawn = spawn
        self.budget = budget or RestartBudget()
        self.restarts = 0
        self.info: dict = {}  # the actor's last ping: node, pid, what it holds
        self.actor = None
        self._ready_ref = None
        self._alive = False
        self._next_spawn = 0.0
        self._start()

    def _start(self) -> None:
        self.actor = self._spawn()
        self._ready_ref = self.actor.ping.remote()
        self._alive = False

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def given_up(self) -> bool:
        """Past its restart budget and not started again (yet)."""
        return self._ready_ref is None and self.budget.exhausted()

    def wait_ready(self, timeout_s: float | None = None) -> dict:
        """Block until the actor has loaded (starting it after its backoff if a restart
        deferred that); returns its ping. Raises if the actor dies while loading."""
        import ray

        if self._ready_ref is None:
            time.sleep(max(0.0, self._next_spawn - time.monotonic()))
            self._start()
        self.info = ray.get(self._ready_ref, timeout=timeout_s)
        self._alive = True
        return self.info

    def ready(self) -> bool:
        """True when the actor can take calls; never blocks (a restart loads in the
        background while rounds go on without it)."""
        if self._alive:
            return True
        import ray

        if self._ready_ref is None:  # a deferred restart: start after the backoff
            if time.monotonic() >= self._next_spawn and not self.budget.exhausted():
                self._start()
            return False
        done, _ = ray.wait([self._ready_ref], timeout=0)
        if not done:
            return False
        try:
            self.info = ray.get(self._ready_ref)
        except Exception as exc:
            self._ready_ref = None
            self.failed(f"failed to start ({type(exc).__name__})")
            return False
        self._alive = True
        logger.info("%s is up on node %s", self.name, str(self.info.get("node_id"))[:12])
        return True

    def failed(self, why: str) -> None:
        """Count a failure against the budget and schedule the next start (after the
        backoff; past the budget, when the oldest failure leaves the window)."""
        self.budget.record()
        self._alive = False
        if self.budget.exhausted():
            self._next_spawn = self.budget.free_at()
            logger.error("%s %s: giving up for now (%s)", self.name, why, self.budget.describe())
        else:
            self._next_spawn = time.monotonic() + self.budget.delay_s()
            logger.warning("%s %s: restarting it in %.1f s", self.name, why, self.budget.delay_s())

    def restart(self, why: str) -> bool:
        """Kill the current actor and start a fresh one (loading in the background), or
        later if the budget says so. False when the slot is given up: a failure past the
        budget is not counted again, so calls to a given-up slot do not keep it down."""
        kill_actor(self.actor)
        self._ready_ref = None
        self._alive = False
        if self.budget.exhausted():
            return False
        self.restarts += 1
        self.failed(f"lost ({why})")
        if self.budget.exhausted():
            return False
        if self._next_spawn <= time.monotonic():
            self._start()
        return True

    def shutdown(self) -> None:
        kill_actor(self.actor)
        self._alive = False
