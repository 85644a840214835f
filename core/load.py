"""Load snapshots: what a policy may know about the fleet when it decides.

Where it sits: the scheduler builds a ``LoadSnapshot`` before asking ``policy/`` for
routes and windows (admission, every round); the simulator builds the same from its
simulated workers. Policies take it as an argument, with ``now_ns``, and keep no
handle on workers, so the same policy code runs against real actors, fakes and the
simulator. Snapshots are cheap (a few dicts) and immutable.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class GroupLoad:
    running: int  # requests whose KV lives in the group
    capacity: int  # KV slots of the group (requests it can hold)


@dataclass(frozen=True)
class LoadSnapshot:
    waiting: int = 0  # requests not yet admitted to any group
    groups: tuple[GroupLoad, ...] = ()
    drafter_requests: dict[str, int] = field(default_factory=dict)  # drafter → requests it serves
    # Drafters whose last call failed (restarting or lost), until the scheduler retries them.
    drafters_down: frozenset[str] = frozenset()

    @property
    def running(self) -> int:
        return sum(g.running for g in self.groups)

    @property
    def utilisation(self) -> float:
        """Fraction of KV slots in use over all groups (0 when there are none)."""
        capacity = sum(g.capacity for g in self.groups)
        return self.running / capacity if capacity else 0.0
