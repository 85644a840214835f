"""Expertise routing policy: domain classification, priors, per-round learning, exploration."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from specfleet.policy.routing import DrafterProfile, ExpertiseRouter, RouterPriors, classify_domain

CODE = "def parse(self, text):\n    if not text:\n        return None\n    for line in text.split():\n"
DATA = '{"user": "ana", "id": 42, "ts": "2024-05-01T10:00:00"}\n{"user": "bo", "id": 7}\n'
LOG = "2024-05-01 10:00:01 INFO server started\n2024-05-01 10:00:02 ERROR disk full\n"
CSV = "id,name,city,amount,date\n1,ana,Lisbon,3.50,2024-01-02\n2,bo,Porto,7.25,2024-01-03\n"
ACCESS_LOG = ('10.54.9.30 - - [16/Sep/2023:09:41:39 +0000] "GET /health HTTP/1.1" 200 3644 "-"\n'
              '10.74.10.36 - - [16/May/2024:03:35:36 +0000] "GET /api/v1/orders/310 HTTP/1.1" 200')
MODULE_HEADER = ('#!/usr/bin/env python3\n\n"""Python interface for the profiler.\n'
                 '   Compatible with the profile module.\n"""\n\n__all__ = ["run", "Profile"]\n')
PROSE = "The interpreter reads the file and evaluates each statement in order. Names are bound."


@pytest.mark.parametrize("text,domain", [(CODE, "code"), (DATA, "data"), (LOG, "data"),
                                         (CSV, "data"), (PROSE, "prose"),
                                         (ACCESS_LOG, "data"), (MODULE_HEADER, "code")])
def test_classify_domain(text, domain):
    assert classify_domain(text) == domain


def router(exploration=0.0, **kwargs):
    drafters = [DrafterProfile("general", "general"), DrafterProfile("code", "code"),
                DrafterProfile("data", "data"), DrafterProfile("ngram", "general")]
    # "decode" here maps a fake token list back to a text by index, enough for routing
    texts = {1: CODE, 2: DATA, 3: PROSE}
    return ExpertiseRouter(drafters, exploration=exploration, decode=lambda ids: texts[ids[0]], **kwargs)


def test_priors_prefer_the_specialist_then_general():
    r = router()
    assert r.route([1]) == ("code", "code")
    assert r.route([2]) == ("data", "data")
    assert r.route([3])[1] in {"general", "ngram"}  # no prose specialist: a general drafter


def test_learns_from_every_round():
    r = router()
    for _ in range(5):  # the specialist turns out poor, n-gram lookup great on this traffic
        r.observe_round("code", "code", drafted=4, accepted=0, emitted=1, now_ns=0)
        r.observe_round("code", "ngram", drafted=4, accepted=3, emitted=4, now_ns=0)
    assert r.route([1], now_ns=0) == ("code", "ngram")
    assert r.table()["code"]["ngram"] == pytest.approx(4.0)
    assert r.table()["code"]["code"] == pytest.approx(1.0)


def test_rounds_without_drafts_teach_nothing():
    r = router()
    r.observe_round("code", "code", drafted=0, accepted=0, emitted=1)
    assert r.table()["code"]["code"] == pytest.approx(2.5)  # still the prior


def test_smoothing_tracks_drift():
    r = router(smoothing=0.5)
    for _ in range(10):
        r.observe_round("prose", "general", drafted=4, accepted=4, emitted=5)
    r.observe_round("prose", "general", drafted=4, accepted=0, emitted=1)
    assert r.table()["prose"]["general"] == pytest.approx(3.0)  # 5 + 0.5 * (1 - 5)


def test_priors_are_configurable():
    r = router(priors=RouterPriors(specialist=1.0, general=3.0, other=0.5))
    assert r.route([1])[1] in {"general", "ngram"}


def test_exploration_rate():
    r = router(exploration=0.2)
    picks = Counter(r.route([1])[1] for _ in range(2000))
    assert 0.74 < picks["code"] / 2000 < 0.86
    assert set(picks) == {"general", "code", "data", "ngram"}


def test_exploration_is_seeded():
    a, b, c = router(0.5, seed=7), router(0.5, seed=7), router(0.5, seed=8)
    picks = [[x.route([1])[1] for _ in range(50)] for x in (a, b, c)]
    assert picks[0] == picks[1] != picks[2]


def test_needs_drafters():
    with pytest.raises(ValueError):
        ExpertiseRouter([])


def test_table_is_json_serialisable():
    json.dumps(router().table())
