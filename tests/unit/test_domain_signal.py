"""The learned domain signal: hashed n-gram centroids, with the textual cues as fallback."""

from __future__ import annotations

from specfleet.policy.domain_signal import DomainClassifier, accuracy, features

DOCS = {
    "code": ["def add(a, b):\n    return a + b\n\nclass Box:\n    def __init__(self):\n        self.x = 1\n"] * 3,
    "data": ['{"id": 17, "name": "ana", "tags": ["x", "y"]}\n{"id": 18, "name": "bo", "tags": []}\n'] * 3,
    "prose": ["The river ran quietly past the old mill, and the children watched the water turn.\n"] * 3,
}


def test_features_are_unit_length_and_look_only_at_the_tail():
    f = features("abcdef" * 10)
    assert abs(sum(v * v for v in f.values()) - 1.0) < 1e-9
    assert features("x" * 5000 + "hello world") == features("x" * 1989 + "hello world")


def test_fit_classifies_held_out_snippets_and_survives_a_round_trip(tmp_path):
    clf = DomainClassifier.fit(DOCS, chunk_chars=80)
    held = [("code", "def mul(x, y):\n    return x * y\n"), ("data", '{"id": 3, "name": "cy", "tags": ["z"]}'),
            ("prose", "The children ran past the quiet mill by the water.")]
    assert accuracy(clf, held) == 1.0
    clf.save(tmp_path / "c.json")
    again = DomainClassifier.load(tmp_path / "c.json")
    assert [again(t) for _, t in held] == [d for d, _ in held]


def test_unsure_centroids_defer_to_the_cues():
    # Two identical centroids: the margin is zero, so the textual cues decide.
    same = DomainClassifier({"code": [1.0] * 4096, "prose": [1.0] * 4096}, min_margin=0.01)
    assert same("import os\nimport sys\ndef f():\n    return 1\n") == "code"
    assert same("A quiet evening by the lake.") == "prose"
