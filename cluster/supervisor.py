"""Keeps one actor alive: start, readiness, restart with backoff, shutdown.

Where it sits: under each handle (``handles.py``: one per drafter and per verifier
group). The handles decide *when* an actor has failed (a dead actor, a call past its
timeout); the supervisor only replaces it. A replaced actor holds no request state,
and nothing here tries to rebuild it: the scheduler re-sends every request from
position 0 when a worker answers ``FailureKind.LOST`` or reports a request as
unknown (the position contract, ``core/workers.py``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


def kill_actor(actor) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already dead, or the cluster is shutting down
        pass


class ActorSupervisor:
    """One actor slot: ``actor`` is the current incarnation (a new one after ``restart``)."""

    def __init__(self, name: str, spawn: Callable[[], object], *, restart_backoff_s: float = 1.0):
        self.name = name
        self._spawn = spawn
        self.restart_backoff_s = restart_backoff_s
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

    def wait_ready(self, timeout_s: float | None = None) -> dict:
        """Block until the actor has loaded; returns its ping."""
        import ray

        if self._ready_ref is None:
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

        if self._ready_ref is None:  # a failed restart: try again after the backoff
            if time.monotonic() >= self._next_spawn:
                self._start()
            return False
        done, _ = ray.wait([self._ready_ref], timeout=0)
        if not done:
            return False
        try:
            self.info = ray.get(self._ready_ref)
        except Exception:
            logger.exception("%s failed to start; retrying in %.1fs", self.name, self.restart_backoff_s)
            self._ready_ref = None
            self._next_spawn = time.monotonic() + self.restart_backoff_s
            return False
        self._alive = True
        logger.info("%s is up on node %s", self.name, str(self.info.get("node_id"))[:12])
        return True

    def restart(self, why: str) -> None:
        """Kill the current actor and start a fresh one (loading in the background)."""
        logger.warning("%s lost (%s): restarting it", self.name, why)
        kill_actor(self.actor)
        self.restarts += 1
        self._start()

    def shutdown(self) -> None:
        kill_actor(self.actor)
        self._alive = False
