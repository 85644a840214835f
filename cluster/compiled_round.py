"""A round as one Ray compiled graph: drafters' ``propose`` feed the verifier's ``verify``.

Where it sits: the Ray executor (``executor.py``) runs each round either through
plain actor calls (drafter calls chained into the verify call) or, once the set of
drafters in use has been the same for a few rounds and enough rounds are left to
repay compiling it, through a ``CompiledRound``. Both send the same payloads to the
same actor methods, so exactness does not depend on the path. Only a single
verifier group compiles: a graph binds one verifier actor.

Why: on this class of machine (a 2-vCPU VM) a plain actor call costs ~0.5 ms when the
actor was just called, but ~2 ms when it had computed for a millisecond or two, as
real drafters and verifiers do; the waker pays the idle process' wake-up. A compiled
graph's actors wait on shared-memory channels instead (measured on a drafter ->
verifier chain of two ~1.6 ms computations: 4.1 ms per round compiled, 7.1 ms with
plain calls). The price is that the graph's actors keep polling while it exists (about
0.6 core each while idle), which is why it is built only for the drafters in use,
only after their set has been stable, and torn down as soon as the engine is idle.

Failures: the compiled graph is torn down, and what happened is worked out before
anything is retried. A dead drafter is restarted; a live one answers ``ERROR`` (its
part of the round may or may not have run, so the scheduler re-sends its requests
whole). The verifier is asked whether it verified this round
(``VerifierActor.last_round``): if it did, its stored reply is the round's outcome;
if not, the group's requests are re-sent from their committed tokens. A timeout
replaces everything in the graph (a stuck actor's graph thread cannot be stopped
from outside). No request is lost, nothing is emitted twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence

from specfleet.cluster.handles import DrafterHandle, VerifierHandle
from specfleet.core.types import DraftRequest
from specfleet.core.workers import FailureKind, VerifyCall, WorkerFailure

logger = logging.getLogger(__name__)

# When to compile is configured (cluster.compile_after_rounds, compile_min_rounds_left):
# compiling costs ~0.2 s here and a compiled round saves ~1.5 ms, so a graph pays after
# ~100 rounds; once built it lives on across requests until the engine is idle.
_PING_TIMEOUT_S = 10.0


def _actor_id(actor) -> str:
    return actor._actor_id.hex()


class CompiledRound:
    """One compiled graph over a verifier actor and the drafter actors ``names``."""

    def __init__(self, verifier: VerifierHandle, drafters: Mapping[str, DrafterHandle]):
        from ray.dag import InputNode

        self.names = tuple(sorted(drafters))
        self._ids = (_actor_id(verifier.actor), *(_actor_id(drafters[n].actor) for n in self.names))
        with InputNode() as inp:
            replies = [drafters[n].actor.propose.bind(inp[i + 1]) for i, n in enumerate(self.names)]
            out = verifier.actor.verify.bind(inp[0], *replies)
        self._dag = out.experimental_compile()
        logger.info("compiled the round graph for drafters %s", ", ".join(self.names))

    def valid_for(self, verifier: VerifierHandle, drafters: Mapping[str, DrafterHandle]) -> bool:
        """False once any of its actors was replaced (the graph holds the old ones)."""
        ids = (_actor_id(verifier.actor), *(_actor_id(drafters[n].actor) for n in self.names))
        return ids == self._ids and all(drafters[n].alive for n in self.names)

    def teardown(self, *, background: bool = False) -> None:
        """Stop the graph's loops on its actors. ``background``: after a timeout, when
        Ray's teardown may wait a long time on actors that were just killed; they are
        all replaced, so nothing waits for it."""
        if background:
            threading.Thread(target=self.teardown, name="specfleet-dag-teardown", daemon=True).start()
            return
        try:
            self._dag.teardown()
        except Exception:  # an actor of the graph is already gone
            logger.debug("compiled graph teardown", exc_info=True)

    def run(
        self,
        verifier: VerifierHandle,
        drafters: Mapping[str, DrafterHandle],
        calls: Sequence[VerifyCall],
        drafts: Mapping[str, Sequence[DraftRequest]],
        failures: dict[str, WorkerFailure],
    ) -> bytes | WorkerFailure | None:
        """Run one round: the verifier's raw reply, the group's failure, or None if
        nothing was sent (run it over plain calls). Every drafter of the graph gets a
        payload, empty ones included. Drafters whose part failed are added to
        ``failures``. The graph is torn down if the round fails; the caller drops it.
        """
        import ray

        payloads = []
        for name in self.names:
            payload = drafters[name].prepare(drafts.get(name, ()))
            if payload is None:  # not ready after all: nothing was sent yet
                for other in self.names[: len(payloads)]:
                    drafters[other].requeue()
                return None
            payloads.append(payload)
        payload, round_id = verifier.round_payload(calls)
        timeout = min(drafters[n].call_timeout_s for n in self.names) + verifier.call_timeout_s
        try:
            return ray.get(self._dag.execute(payload, *payloads), timeout=timeout)
        except Exception as exc:  # classified in _recover; the round may or may not have run
            return self._recover(exc, verifier, drafters, round_id, failures)

    def _recover(self, error: Exception, verifier, drafters, round_id: int,
                 failures: dict[str, WorkerFailure]) -> bytes | WorkerFailure:
        import ray
        from ray.exceptions import GetTimeoutError, RayChannelTimeoutError

        why = f"compiled round failed: {type(error).__name__}"
        if isinstance(error, (GetTimeoutError, RayChannelTimeoutError)):
            # Something in the graph is stuck; its graph thread cannot be stopped from
            # outside, so every actor that took part is replaced.
            for name in self.names:
                drafters[name].supervisor.restart(why)
                failures[name] = WorkerFailure(FailureKind.LOST, why)
            lost = verifier.recover(why)
            self.teardown(background=True)  # Ray's teardown waits long on stuck actors
            return lost
        for name in self.names:
            try:
                ray.get(drafters[name].actor.ping.remote(), timeout=_PING_TIMEOUT_S)
                failures[name] = WorkerFailure(FailureKind.ERROR, why)  # may or may not have run
                drafters[name].requeue()  # releases are idempotent: send them again
            except Exception:
                drafters[name].supervisor.restart(why)
                failures[name] = WorkerFailure(FailureKind.LOST, why)
        try:
            ray.get(verifier.actor.ping.remote(), timeout=_PING_TIMEOUT_S)
        except Exception:
            self.teardown(background=True)
            return verifier.recover(why)
        # Teardown waits for the graph loops to exit, so the verifier's answer below
        # is final: no verify of this round can still start after it.
        self.teardown()
        return verifier.round_outcome(round_id, why)
