"""Speculation width by negative feedback: how many drafters cooperate, how big a tree.

Where it sits: the scheduler asks ``SpeculationWidth.plan`` once per round of a
verifier group, with the load snapshot and the number of requests in the round; the
answer bounds how many drafters the router may let cooperate on each request
(``width``) and the fused tree's node budget per request (``nodes_per_request``).

Policy: when the verifier has spare capacity (nothing waiting and its KV slots mostly
free) a wider speculation is cheap — the width grows by one per round up to
``max_width``; when requests queue the width shrinks at once to one drafter, so a
backlog is served with the least verify work per token. A batch-wide node budget is
split evenly over the round's requests, never below the window (one full chain).
"""

from __future__ import annotations

from dataclasses import dataclass

from specfleet.core.load import LoadSnapshot


@dataclass(frozen=True)
class WidthPlan:
    width: int  # cooperating drafters per request (1: no fusion)
    node_share: int  # one request's share of the round's node budget

    def max_nodes(self, window: int, cooperating: int) -> int:
        """Node budget of a fused tree: every cooperator's full window if the share
        allows, never less than one full chain."""
        return max(window, min(window * cooperating, self.node_share))


class SpeculationWidth:
    def __init__(self, *, max_width: int = 1, batch_node_budget: int = 64, idle_utilisation: float = 0.5):
        if max_width < 1:
            raise ValueError(f"max_width: must be >= 1, got {max_width}")
        self.max_width = max_width
        self.batch_node_budget = batch_node_budget
        self.idle_utilisation = idle_utilisation
        self._width = max_width

    def plan(self, load: LoadSnapshot, requests: int) -> WidthPlan:
        if load.waiting > 0:
            self._width = 1  # backlog: narrow at once
        elif load.utilisation <= self.idle_utilisation:
            self._width = min(self.max_width, self._width + 1)  # spare capacity: widen step by step
        return WidthPlan(self._width, self.batch_node_budget // max(1, requests))
