"""The in-process speculative engine: the engine driver over local drafters and verifiers.

Where it sits: ``specfleet bench engine``, ``EngineBackend.from_config`` and tests
build one; it is ``EngineDriver`` (``driver.py``) with a ``Scheduler`` and an
``InProcessExecutor`` wired from plain ``Drafter`` and ``Verifier`` objects. The Ray
runtime builds the same driver over actors (``cluster/runtime.py``).

Mechanism only: which drafter serves a request is given at ``submit`` or, with
``route=True``, asked of the router (``policy/routing.py``) at admission; how long
each window is comes from a ``DraftLengthPolicy`` (``policy/draft_length.py``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from specfleet.core.clock import Clock
from specfleet.core.serving import GenerationOutput
from specfleet.drafters.base import Drafter
from specfleet.engine.driver import EngineDriver
from specfleet.engine.executor import InProcessExecutor, LocalDraftWorker, LocalVerifyWorker
from specfleet.engine.pipeline import PipelinedScheduler
from specfleet.engine.scheduler import Scheduler
from specfleet.policy.draft_length import DraftLengthPolicy, FixedDraftLength
from specfleet.policy.routing import Router
from specfleet.policy.speculation_width import SpeculationWidth
from specfleet.verifiers.verifier import Verifier

__all__ = ["GenerationOutput", "SpecEngine"]


class SpecEngine(EngineDriver):
    """Runs speculative decoding for many requests in one process."""

    def __init__(
        self,
        verifier: Verifier | Sequence[Verifier],
        drafters: Mapping[str, Drafter],
        *,
        draft_policy: DraftLengthPolicy | None = None,
        router: Router | None = None,
        width: SpeculationWidth | None = None,
        default_drafter: str | None = None,
        max_batch_size: int = 8,
        token_sink: Callable[[str, list[int]], None] | None = None,
        clock: Clock | None = None,
        pipelined: bool = False,
        first_window: int = 1,
    ):
        """``verifier``: one verifier, or one per verifier group (each its own copy of
        the target; requests are spread over them). ``max_batch_size`` is per group.
        ``router`` chooses the drafter of requests submitted with ``route=True`` and no
        drafter; without one, ``default_drafter`` (default: the first drafter) serves them.
        EOS and the text used for stop strings are the (first) verifier's."""
        verifiers = list(verifier) if isinstance(verifier, Sequence) else [verifier]
        self.verifiers = verifiers
        self.verifier = verifiers[0]
        self.drafters = dict(drafters)
        runner = self.verifier.runner  # None for a no-compute fake: nothing to check prompts against
        pipeline = {"first_window": first_window} if pipelined else {}
        scheduler = (PipelinedScheduler if pipelined else Scheduler)(
            **pipeline, drafters=list(self.drafters), draft_length=draft_policy or FixedDraftLength(4),
            router=router, width=width, default_drafter=default_drafter or next(iter(self.drafters), None),
            groups=len(verifiers), max_batch_size=max_batch_size,
            eos_token_ids=self.verifier.eos_token_ids, decode=self.verifier.decode,
            vocab_size=getattr(runner, "vocab_size", None), max_seq_len=getattr(runner, "max_seq_len", None),
            token_sink=token_sink,
        )
        executor = InProcessExecutor(
            {name: LocalDraftWorker(d) for name, d in self.drafters.items()},
            [LocalVerifyWorker(v) for v in verifiers],
        )
        super().__init__(scheduler, executor, clock=clock)
