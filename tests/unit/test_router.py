"""Expertise routing policy: domain classification, priors, learning, exploration."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from specfleet.router.expertise import DrafterProfile, ExpertiseRouter, classify_domain

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


def router(exploration=0.0):
    drafters = [DrafterProfile("general", "general"), DrafterProfile("code", "code"),
                DrafterProfile("data", "data"), DrafterProfile("ngram", "general")]
    # "decode" here maps a fake token list back to a text by index, enough for routing
    texts = {1: CODE, 2: DATA, 3: PROSE}
    return ExpertiseRouter(drafters, exploration=exploration, decode=lambda ids: texts[ids[0]])


def test_priors_prefer_the_specialist_then_general():
    r = router()
    assert r.route([1]) == ("code", "code")
    assert r.route([2]) == ("data", "data")
    assert r.route([3])[1] in {"general", "ngram"}  # no prose specialist: a general drafter


def test_learns_from_observed_acceptance():
    r = router()
    for _ in range(5):
        r.observe("code", "code", 1.2)  # the specialist turns out poor...
        r.observe("code", "ngram", 3.5)  # ...and n-gram lookup is great on this traffic
    assert r.route([1]) == ("code", "ngram")
    assert r.table()["code"]["ngram"] == pytest.approx(3.5)


def test_exploration_rate():
    r = router(exploration=0.2)
    picks = Counter(r.route([1])[1] for _ in range(2000))
    assert 0.74 < picks["code"] / 2000 < 0.86
    assert set(picks) == {"general", "code", "data", "ngram"}


def test_needs_drafters():
    with pytest.raises(ValueError):
        ExpertiseRouter([])


def test_table_is_json_serialisable():
    json.dumps(router().table())
