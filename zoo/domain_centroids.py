"""The learned domain signal's training: centroids fitted from a zoo's own corpus.

Where it sits: composition roots (``engine/builder.py``, ``cluster/runtime.py``,
benchmarks) call ``classifier_for(cfg)`` when ``router.domain_signal`` is ``learned``;
the router then classifies prompts with ``policy/domain_signal.DomainClassifier``.
Centroids come from ``router.domain_centroids`` (a JSON file) or, for a zoo target,
from the zoo's training documents, fitted once and saved beside the zoo. The held-out
documents never enter the fit: ``heldout_accuracy`` measures on them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from specfleet.policy.domain_signal import CENTROIDS_FILE, DomainClassifier, accuracy
from specfleet.policy.domains import classify_domain

logger = logging.getLogger(__name__)


def _zoo_of(target: str) -> tuple[str, Path] | None:
    """(size, directory) of a ``zoo:<size>/<model>`` target, if it is one and built."""
    if not target.startswith("zoo:"):
        return None
    from specfleet.zoo.presets import zoo_dir

    size = target[4:].split("/", 1)[0]
    return size, zoo_dir(size)


def _corpus(size: str):
    from specfleet.zoo.corpus import build_corpus
    from specfleet.zoo.presets import recipe_for

    return build_corpus(recipe_for(size).corpus, seed=0)


def fit_for_zoo(size: str, directory: Path) -> DomainClassifier:
    path = directory / CENTROIDS_FILE
    if path.exists():
        return DomainClassifier.load(path)
    corpus = _corpus(size)
    classifier = DomainClassifier.fit({d: text.train for d, text in corpus.items()})
    if directory.exists():
        classifier.save(path)
        logger.info("domain centroids fitted from the %s zoo's corpus: %s", size, path)
    return classifier


def classifier_for(cfg) -> DomainClassifier | None:
    """The classifier ``cfg.router`` asks for; None for the textual cues."""
    rc = cfg.router
    if rc.domain_signal != "learned":
        return None
    if rc.domain_centroids:
        return DomainClassifier.load(rc.domain_centroids)
    zoo = _zoo_of(cfg.models.target)
    if zoo is None:
        raise ValueError("router.domain_signal: 'learned' needs router.domain_centroids "
                         "(a centroids JSON) unless the target is a zoo model")
    return fit_for_zoo(*zoo)


def heldout_accuracy(size: str, classifier: DomainClassifier, chunk_chars: int = 400) -> dict[str, float]:
    """Accuracy on prompt-sized chunks of the held-out documents: learned vs cues."""
    corpus = _corpus(size)
    labelled = [(d, doc[i:i + chunk_chars]) for d, text in corpus.items() for doc in text.heldout
                for i in range(0, max(1, len(doc) - chunk_chars), 4 * chunk_chars)]
    return {"learned": accuracy(classifier, labelled), "cues": accuracy(classify_domain, labelled),
            "chunks": len(labelled)}
