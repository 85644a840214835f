"""The learned router and the width policy on scripted acceptance and costs: no model.

Each test drives ``LearnedRouter`` the way the scheduler does — ``route`` at
admission, ``cooperators`` before a round, ``observe`` after it — with acceptance
and draft costs chosen by the test, so what the policy should do is known exactly.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest

from specfleet.core.load import GroupLoad, LoadSnapshot
from specfleet.policy.learned_routing import LearnedRouter
from specfleet.policy.routing import DrafterProfile, RoundFeedback
from specfleet.policy.speculation_width import SpeculationWidth

TEXTS = {1: "def f(x):\n    return x\n", 2: '{"a": 1, "b": 2}\n{"c": 3}\n', 3: "The cat sat on the mat."}
VERIFY_NS = 50_000_000  # a 50 ms verify call


def router(*profiles, **kwargs) -> LearnedRouter:
    return LearnedRouter([DrafterProfile(n, d) for n, d in profiles],
                         decode=lambda ids: TEXTS[ids[0]], **kwargs)


def serve(r: LearnedRouter, prompt: int, rounds: int, accept, cost_ns, *, rid: str, load=None) -> list[str]:
    """One request through the router: per round its team drafts a window of 4, the
    drafter ``d`` gets ``accept(d, rng)`` tokens accepted and costs ``cost_ns[d]``.
    Returns the primary of every round."""
    domain, current = r.route([prompt], load=load)
    primaries = []
    for _ in range(rounds):
        team = r.cooperators(rid, domain, current, width=1, load=load)
        current = team[0][0]
        primaries.append(current)
        got = {name: accept(name) for name, _ in team}
        emitted = max(got.values()) + 1
        r.observe(rid, domain, RoundFeedback({n: (4, a) for n, a in got.items()}, emitted,
                                             {n: cost_ns[n] for n, _ in team}, VERIFY_NS))
    r.forget(rid)
    return primaries


def test_route_prefers_the_specialist_before_any_evidence():
    r = router(("general", "general"), ("code", "code"), ("data", "data"))
    assert r.route([1]) == ("code", "code")
    assert r.route([2]) == ("data", "data")
    assert r.route([3])[1] == "general"


def test_reward_is_per_unit_of_cost_so_a_cheap_drafter_can_win():
    # "model" gets 3 of 4 accepted but costs 60 ms a round; "ngram" gets 1 and costs nothing.
    # Tokens per ms of round: model 4/110, ngram 2/50: the cheap one wins.
    r = router(("model", "code"), ("ngram", "general"), ucb_c=0.0)
    cost = {"model": 60_000_000, "ngram": 0}
    for i in range(6):
        serve(r, 1, 8, lambda d: 3 if d == "model" else 1, cost, rid=f"r{i}")
    assert r.route([1])[1] == "ngram"
    # And with a cheap model the accepted-more drafter wins.
    r = router(("model", "code"), ("ngram", "general"), ucb_c=0.0)
    cost = {"model": 1_000_000, "ngram": 0}
    for i in range(6):
        serve(r, 1, 8, lambda d: 3 if d == "model" else 1, cost, rid=f"r{i}")
    assert r.route([1])[1] == "model"


def test_learns_per_domain_and_explores_by_ucb():
    rng = random.Random(0)
    # "a" is best on code, "b" on prose; priors point the wrong way (b is the code specialist).
    r = router(("a", "prose"), ("b", "code"))
    best = {("code", "a"): 3, ("code", "b"): 1, ("prose", "a"): 1, ("prose", "b"): 3}
    picks = Counter()
    for i in range(60):
        prompt = 1 if i % 2 == 0 else 3
        domain = "code" if prompt == 1 else "prose"
        primaries = serve(r, prompt, 6, lambda d, dom=domain: best[(dom, d)] if rng.random() < 0.9 else 0,
                          {"a": 0, "b": 0}, rid=f"r{i}")
        if i >= 40:
            picks[(domain, primaries[-1])] += 1
    assert picks[("code", "a")] >= 9 and picks[("prose", "b")] >= 9


def test_a_request_is_rerouted_mid_flight_when_its_drafter_falls_behind():
    r = router(("a", "code"), ("b", "general"), ucb_c=0.0, min_rounds=3)
    # Teach the table: on code, b is good (3 accepted).
    for _ in range(10):
        r.observe("warm-b", "code", RoundFeedback({"b": (4, 3)}, 4, {"b": 0}, VERIFY_NS))
    # A request that starts on a (the specialist prior) and gets nothing from it moves to b.
    domain, first = "code", "a"
    primaries = []
    for _ in range(8):
        team = r.cooperators("x", domain, first, width=1)
        first = team[0][0]
        primaries.append(first)
        accepted = 0 if first == "a" else 3
        r.observe("x", domain, RoundFeedback({first: (4, accepted)}, accepted + 1, {first: 0}, VERIFY_NS))
    assert primaries[:3] == ["a", "a", "a"] and primaries[-1] == "b"
    assert r.reroutes == 1


def test_load_spreads_identical_copies_and_skips_a_drafter_that_is_down():
    profiles = [(f"copy{i}", "general") for i in range(4)]
    r = router(*profiles, ucb_c=0.0, load_weight=1.0)
    for i in range(4):  # every copy equally good
        serve(r, 3, 4, lambda d: 2, {f"copy{i}": 0 for i in range(4)}, rid=f"w{i}")
    users: Counter = Counter()
    for _ in range(8):
        load = LoadSnapshot(groups=(GroupLoad(sum(users.values()), 16),), drafter_requests=dict(users))
        users[r.route([3], load=load)[1]] += 1
    assert max(users.values()) - min(users.values()) <= 1, users
    load = LoadSnapshot(drafters_down=frozenset({"copy0", "copy1", "copy2"}))
    assert r.route([3], load=load)[1] == "copy3"
    # A request on a drafter that went down is moved at once.
    assert r.cooperators("y", "prose", "copy0", load=load)[0][0] == "copy3"


def test_a_newcomer_is_tried_at_once_and_reaches_its_fair_share():
    rng = random.Random(1)
    r = router(("old", "general"))
    quality = {"old": 1, "new": 3}
    for i in range(20):
        serve(r, 1, 5, lambda d: quality[d], {"old": 0, "new": 0}, rid=f"a{i}")
    r.add_drafter(DrafterProfile("new", "general"))
    firsts = [serve(r, 1, 5, lambda d: quality[d] if rng.random() < 0.9 else 0, {"old": 0, "new": 0},
                    rid=f"b{i}")[0] for i in range(60)]
    assert firsts[0] == "new"  # optimism: untried is tried first
    assert Counter(firsts[-20:])["new"] >= 15


def test_cooperators_within_width_with_acceptance_rates_as_weights():
    r = router(("a", "code"), ("b", "general"), ("c", "prose"), ucb_c=0.0, cooperate_ratio=0.5)
    quality = {"a": 3, "b": 2, "c": 0}
    for i in range(3):
        for name in "abc":  # each tried alone on code
            domain = "code"
            r.observe(f"t{name}{i}", domain, RoundFeedback({name: (4, quality[name])}, quality[name] + 1,
                                                            {name: 0}, VERIFY_NS))
    team = r.cooperators("q", "code", "a", width=3)
    names = [n for n, _ in team]
    assert names == ["a", "b"]  # c scores below half of a's: not worth a place in the tree
    weights = dict(team)
    assert weights["a"] == pytest.approx(0.75) and weights["b"] == pytest.approx(0.5)
    assert [n for n, _ in r.cooperators("q", "code", "a", width=1)] == ["a"]


def test_remove_keeps_at_least_one_drafter():
    r = router(("a", "code"), ("b", "general"))
    r.remove_drafter("a")
    assert r.route([1])[1] == "b"
    with pytest.raises(ValueError, match="last drafter"):
        r.remove_drafter("b")


def test_width_narrows_under_backlog_and_widens_when_idle():
    width = SpeculationWidth(max_width=3, batch_node_budget=32)
    idle = LoadSnapshot(groups=(GroupLoad(1, 8),))
    busy = LoadSnapshot(waiting=5, groups=(GroupLoad(8, 8),))
    assert width.plan(idle, 1).width == 3
    assert width.plan(busy, 8).width == 1
    assert [width.plan(idle, 1).width for _ in range(3)] == [2, 3, 3]
    plan = width.plan(idle, 8)  # 32 nodes over 8 requests: 4 each, never below one window
    assert plan.node_share == 4 and plan.max_nodes(window=5, cooperating=3) == 5
    assert width.plan(idle, 1).max_nodes(window=5, cooperating=3) == 15
