"""When a request is finished: max_new_tokens, EOS, stop sequences.

Where it sits: after the accept rule decides which tokens a verification round
emits, the verifier passes them through ``StopChecker.commit`` one by one, because a
stop can fall *inside* an accepted window: the tokens after it must never reach the
user, and the request ends there.

Semantics follow Hugging Face ``generate`` so outputs compare token for token: the
EOS token is part of the output; for a stop sequence, the output ends with the
token that completed it (the text returned to users is cut before the stop string).
Stop strings are matched on the decoded *generated* text only, never the prompt.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from specfleet.core.types import FinishReason, SamplingParams


@dataclass
class StopChecker:
    sampling: SamplingParams
    eos_token_ids: frozenset[int]
    decode: Callable[[list[int]], str] | None = None  # needed only with stop strings

    def __post_init__(self):
        if self.sampling.stop and self.decode is None:
            raise ValueError("stop sequences need a tokenizer to decode with")
        # The text is re-decoded each time from the token where a stop could still
        # start, so the cost stays bounded by the longest stop string.
        self._longest_stop = max((len(s) for s in self.sampling.stop), default=0)

    def commit(
        self, generated: list[int], emitted: Sequence[int]
    ) -> tuple[list[int], FinishReason | None]:
        """Return the prefix of ``emitted`` to commit and why the request ended, if it did.

        ``generated`` is what was committed before this round (not modified).
        """
        taken: list[int] = []
        for token in emitted:
            taken.append(token)
            total = len(generated) + len(taken)
            if not self.sampling.ignore_eos and token in self.eos_token_ids:
                return taken, FinishReason.EOS
            if self.sampling.stop and self._hits_stop(generated + taken):
                return taken, FinishReason.STOP
            if total >= self.sampling.max_new_tokens:
                return taken, FinishReason.LENGTH
        return taken, None

    def _hits_stop(self, generated: list[int]) -> bool:
        # Any token holds at least one character, so the last `longest + 1` tokens
        # cover every place a stop string completed by the newest token can start.
        tail = self.decode(generated[-(self._longest_stop + 1) :])
        return any(stop in tail for stop in self.sampling.stop)

    def visible_text(self, text: str) -> str:
        """The user-facing text: everything before the first stop string."""
        cut = min((i for i in (text.find(s) for s in self.sampling.stop) if i >= 0), default=-1)
        return text if cut < 0 else text[:cut]
