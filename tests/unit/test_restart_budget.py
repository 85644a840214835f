"""RestartBudget (cluster/supervisor.py): N failures within T seconds, or N in a row,
give a slot up until its oldest failure leaves the window; backoff doubles, capped.

The clock is a plain counter: nothing here waits or starts Ray.
"""

from __future__ import annotations

import pytest

from specfleet.cluster.supervisor import RestartBudget
from specfleet.core.config import ClusterConfig


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def budget(**kw):
    clock = Clock()
    args = dict(max_failures=3, window_s=10.0, backoff_s=0.5, backoff_max_s=2.0, clock=clock)
    args.update(kw)
    return RestartBudget(**args), clock


def test_n_failures_within_the_window_exhaust_it_and_it_frees_when_they_age_out():
    b, clock = budget()
    for _ in range(2):
        b.record()
        b.succeeded()  # good calls in between: only the window counts
        clock.now += 1
        assert not b.exhausted()
    b.record()
    assert b.exhausted() and b.recent() == 3
    assert b.free_at() == pytest.approx(1000.0 + 10.0)
    clock.now = 1010.0  # the first failure leaves the window
    assert not b.exhausted() and b.recent() == 2


def test_failures_spread_wider_than_the_window_never_exhaust_it():
    b, clock = budget()
    for _ in range(20):
        b.record()
        b.succeeded()
        clock.now += 6.0  # at most 2 within any 10 s
        assert not b.exhausted()


def test_n_in_a_row_exhaust_it_and_a_crash_loop_gets_one_try_per_window():
    b, clock = budget(max_failures=3, window_s=10.0)
    for _ in range(3):
        b.record()
        clock.now += 8.0  # never 3 within 10 s, but 3 in a row with no good call
    assert b.recent() < 3 and b.exhausted()
    clock.now = b.free_at()
    assert not b.exhausted()  # one more try ...
    b.record()
    assert b.exhausted()  # ... and down again at once
    b.succeeded()
    assert not b.exhausted()


def test_backoff_none_after_a_first_failure_then_doubling_up_to_the_cap():
    b, _ = budget(max_failures=10)
    delays = []
    for _ in range(6):
        b.record()
        delays.append(b.delay_s())
    assert delays == [0.0, 0.5, 1.0, 2.0, 2.0, 2.0]
    b.succeeded()
    b.record()
    assert b.delay_s() == 0.0


def test_from_config_reads_the_cluster_keys():
    cfg = ClusterConfig(restart_max_failures=7, restart_window_s=30.0, restart_backoff_s=0.1,
                        restart_backoff_max_s=1.5)
    b = RestartBudget.from_config(cfg)
    assert (b.max_failures, b.window_s, b.backoff_s, b.backoff_max_s) == (7, 30.0, 0.1, 1.5)
    assert "0 failures within 30 s" in b.describe()
