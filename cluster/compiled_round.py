"""A round as one Ray compiled graph: drafters' ``propose`` feed the verifier's ``verify``.

Where it sits: ``ActorSpecEngine`` (``runtime.py``) runs each round either through
plain actor calls (``VerifierHandle.verify_chained``) or, once the set of drafters in
use has been the same for a few rounds and enough rounds are left to repay compiling
it, through a ``CompiledRound``. Both send the
same payloads to the same actor methods, so exactness does not depend on the path.

Why: on this class of machine (a 2-vCPU VM) a plain actor call costs ~0.5 ms when the
actor was just called, but ~2 ms when it had computed for a millisecond or two, as
real drafters and verifiers do; the waker pays the idle process' wake-up. A compiled
graph's actors wait on shared-memory channels instead (measured on a drafter ->
verifier chain of two ~1.6 ms computations: 4.1 ms per round compiled, 7.1 ms with
plain calls). The price is that the graph's actors keep polling while it exists (about
0.6 core each while idle), which is why it is built only for the drafters in use,
only after their set has been stable, and torn down as soon as the engine is idle.

Failures: the compiled graph is torn down, and what happened is worked out
before anything is retried. A dead drafter is restarted by its handle; live ones
re-send their requests whole (their part of the round may or may not have run). The
verifier is asked whether it verified this round (``VerifierActor.last_round``): if
it did, its stored reply is the round's outcome; if not, the engine runs the round
again over plain calls. A timeout restarts everything in the graph (a stuck actor's
graph thread cannot be stopped from outside) and resumes requests from the
committed tokens. No request is lost, nothing is emitted twice.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence

from specfleet.cluster.handles import DrafterHandle, VerifierHandle
from specfleet.core.types import DraftProposal, DraftRequest, VerifyResult

logger = logging.getLogger(__name__)

# When to compile is configured (cluster.compile_after_rounds, compile_min_rounds_left):
# compiling costs ~0.2 s here and a compiled round saves ~1.5 ms, so a graph pays after
# ~100 rounds; once built it lives on across requests until the engine is idle.
_PING_TIMEOUT_S = 10.0


def _actor_id(actor) -> str:
    return actor._actor_id.hex()


class CompiledRound:
    """One compiled graph over the verifier actor and the drafter actors ``names``."""

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
        request_ids: Sequence[str],
        proposals: dict[str, DraftProposal],
        requests: Mapping[str, Sequence[DraftRequest]],
    ) -> tuple[list[VerifyResult], list[tuple[int, int]]] | None:
        """Run one round; None if it did not happen and must be run over plain calls.

        ``proposals`` holds the undrafted requests; ``requests`` each drafter's
        batch (every drafter of the graph gets a payload, empty ones included).
        The graph is torn down if the round fails; the caller drops it then.
        """
        import ray

        payloads = []
        for name in self.names:
            payload = drafters[name].prepare(requests.get(name, ()), always=True)
            if payload is None:  # not ready after all: nothing was sent yet
                for other in self.names:
                    drafters[other].resync()
                return None
            payloads.append(payload)
        payload, round_id = verifier.round_payload(request_ids, proposals)
        timeout = min(drafters[n].call_timeout_s for n in self.names) + verifier.call_timeout_s
        try:
            reply = ray.get(self._dag.execute(payload, *payloads), timeout=timeout)
        except Exception as exc:  # classified in _recover; the round may or may not have run
            reply = self._recover(exc, verifier, drafters, round_id)
            if reply is None:
                return None
        results, infos = verifier.apply_reply(reply)
        for name, (compute_ns, _) in zip(self.names, infos):
            drafters[name].last_compute_ns = compute_ns
        return results, infos

    def _recover(self, error: Exception, verifier, drafters, round_id: int) -> bytes | None:
        import ray
        from ray.exceptions import GetTimeoutError, RayChannelTimeoutError

        why = f"compiled round failed: {type(error).__name__}"
        if isinstance(error, (GetTimeoutError, RayChannelTimeoutError)):
            # Something in the graph is stuck; its graph thread cannot be stopped from
            # outside, so every actor that took part is replaced.
            for name in self.names:
                drafters[name].restart(why)
            verifier.recover(why)
            self.teardown(background=True)  # Ray's teardown waits long on stuck actors
            return None
        for name in self.names:
            try:
                ray.get(drafters[name].actor.ping.remote(), timeout=_PING_TIMEOUT_S)
                drafters[name].resync()  # alive: its part of the round may or may not have run
            except Exception:
                drafters[name].restart(why)
        try:
            ray.get(verifier.actor.ping.remote(), timeout=_PING_TIMEOUT_S)
        except Exception:
            verifier.recover(why)
            self.teardown(background=True)
            return None
        # Teardown waits for the graph loops to exit, so the verifier's answer below
        # is final: no verify of this round can still start after it.
        self.teardown()
        return verifier.round_outcome(round_id, why)
