"""What the engine hands back to whoever serves requests.

Where it sits: the scheduler (``engine/scheduler.py``) builds a ``GenerationOutput``
when a request ends; ``SpecEngine.step``/``generate`` return them, and the serving
backends (``router/backend.py``, the Ray runtime) turn them into the last chunk of a
stream. Plain data: it crosses threads and, in the simulator, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass

from specfleet.core.stats import RequestStats
from specfleet.core.types import FinishReason


@dataclass
class GenerationOutput:
    """A finished request."""

    request_id: str
    prompt: list[int]
    token_ids: list[int]  # generated tokens only
    finish_reason: FinishReason
    stats: RequestStats
