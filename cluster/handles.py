"""``DrafterHandle`` / ``VerifierHandle``: the Drafter interface and the Verifier API on
top of actor calls, so ``SpecEngine`` runs unchanged against actors.

Where it sits: between the engine's round loop (``engine/engine.py``, driven by
``runtime.py``) and the actors of ``actors.py``. The engine thinks it talks to a
local ``Drafter`` and ``Verifier``; each handle turns a call into one actor call
and owns what the distributed case adds:

- a mirror of every request's committed tokens. ``SpecEngine`` asks the verifier for
  ``tokens(rid)`` for every request every round; the mirror answers locally (an
  actor call each would cost ~1 ms × batch per round), and it is what failed actors
  are rebuilt from;
- piggy-backing: releases (and finished sequences for drafters that learn) ride on
  the next call instead of costing a round trip each;
- failure handling. A drafter that dies, hangs past ``call_timeout_s`` or raises
  answers empty proposals (the round is a plain verification step: still exact),
  is recreated in the background, and re-learns each request's full committed
  sequence on its next proposal. A verifier that dies is recreated at once (no
  round can run without it) and every in-flight request is resumed from the
  mirror, then the failed call is retried: nothing is lost, nothing re-emitted.

The handles do not import the engine and take a ``spawn`` callable, so tests can
exercise them against any actor class.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from specfleet.core.types import DraftProposal, DraftRequest, SamplingParams, VerifyResult
from specfleet.drafters.base import Drafter

logger = logging.getLogger(__name__)

# Beyond this many queued releases a drafter gets them in a call of their own, so an
# idle drafter does not hold KV slots of finished requests indefinitely.
_MAX_PIGGYBACK = 16


def _failure_types() -> tuple[type[BaseException], ...]:
    """Errors meaning "this actor is gone or stuck", as opposed to a bug in a call."""
    from ray.exceptions import GetTimeoutError, RayActorError

    return (RayActorError, GetTimeoutError)


def _dumps(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _kill(actor) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # already dead, or the cluster is shutting down
        pass


class DrafterHandle(Drafter):
    """A ``Drafter`` whose work happens in a drafter actor.

    ``propose`` is ``collect(submit(requests))``; the runtime's engine calls
    ``submit`` on every drafter first and ``collect`` afterwards, so drafters on
    different actors compute in parallel.
    """

    def __init__(
        self,
        name: str,
        spawn: Callable[[], object],
        *,
        can_sample: bool = True,
        call_timeout_s: float = 60.0,
        restart_backoff_s: float = 1.0,
    ):
        self.name = name
        self.can_sample = can_sample
        self._spawn = spawn
        self.call_timeout_s = call_timeout_s
        self.restart_backoff_s = restart_backoff_s
        self._seqs: dict[str, list[int]] = {}  # committed tokens sent, per request
        self._synced: set[str] = set()  # requests the current actor holds state for
        self._releases: list[str] = []
        self._observed: list[list[int]] = []
        self.learns = True  # until the actor says otherwise
        self.info: dict = {}
        self.restarts = 0
        self.last_compute_ns = 0  # actor-side time of the last proposal call
        self._actor = None
        self._ready_ref = None
        self._alive = False
        self._next_spawn = 0.0
        self._start()

    # ---- lifecycle -----------------------------------------------------------------------
    def _start(self) -> None:
        self._actor = self._spawn()
        self._ready_ref = self._actor.ping.remote()
        self._alive = False
        # The new actor holds nothing: every request is re-sent whole next time.
        self._synced.clear()
        self._releases.clear()
        self._observed.clear()

    def wait_ready(self, timeout_s: float | None = None) -> dict:
        """Block until the actor is loaded; returns its ping (name, node, pid)."""
        import ray

        self._accept_ping(ray.get(self._ready_ref, timeout=timeout_s))
        return self.info

    def _accept_ping(self, info: dict) -> None:
        self.info = info
        self.learns = info["learns"]
        self.can_sample = info["can_sample"]
        self._alive = True

    def _ready(self) -> bool:
        """True when the actor can take calls; never blocks the round loop."""
        if self._alive:
            return True
        import ray

        if self._ready_ref is None:  # a failed restart: try again after the backoff
            if time.monotonic() >= self._next_spawn:
                self._start()
            return False
        done, _ = ray.wait([self._ready_ref], timeout=0)
        if not done:
            return False
        try:
            self._accept_ping(ray.get(self._ready_ref))
            logger.info("drafter %r is back on node %s", self.name, self.info.get("node_id"))
            return True
        except Exception:
            logger.exception("drafter %r failed to start; retrying in %.1fs", self.name, self.restart_backoff_s)
            self._ready_ref = None
            self._next_spawn = time.monotonic() + self.restart_backoff_s
            return False

    def _fail(self, why: str) -> None:
        logger.warning("drafter %r lost (%s): its requests continue unspeculated; restarting it", self.name, why)
        _kill(self._actor)
        self.restarts += 1
        self._start()

    @property
    def actor(self):
        return self._actor

    @property
    def alive(self) -> bool:
        return self._alive

    def shutdown(self) -> None:
        _kill(self._actor)
        self._alive = False

    # ---- the Drafter interface -------------------------------------------------------------
    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        return self.collect(self.submit(requests))

    def submit(self, requests: Sequence[DraftRequest]) -> _Pending:
        """Send the proposal call without waiting for it."""
        for req in requests:
            seq = self._seqs.setdefault(req.request_id, [])
            del seq[req.position :]
            seq.extend(req.new_tokens)
        if not requests or not self._ready():
            return _Pending(list(requests), None)
        sent = []
        for req in requests:
            if req.request_id in self._synced:
                sent.append(req)
            else:  # new request, or state lost with a previous actor: send it whole
                seq = self._seqs[req.request_id]
                sent.append(DraftRequest(req.request_id, 0, list(seq), req.num_draft_tokens, req.sampling))
                self._synced.add(req.request_id)
        ref = self._actor.propose.remote(_dumps((sent, self._releases, self._observed)))
        self._releases, self._observed = [], []
        return _Pending(list(requests), ref)

    def collect(self, pending: _Pending) -> list[DraftProposal]:
        """The proposals of a submitted call; empty ones if the drafter failed."""
        if pending.ref is not None:
            import ray

            try:
                proposals, self.last_compute_ns = pickle.loads(ray.get(pending.ref, timeout=self.call_timeout_s))
                return proposals
            except _failure_types() as exc:
                self._fail(type(exc).__name__)
            except Exception:
                # A bug inside the drafter must not cost the requests: drop its state for
                # them (it may be inconsistent) and verify without drafts this round.
                logger.exception("drafter %r failed a proposal call", self.name)
                for req in pending.requests:
                    if req.request_id in self._synced:
                        self._synced.discard(req.request_id)
                        self._releases.append(req.request_id)
        return [DraftProposal.empty(req.request_id, self.name) for req in pending.requests]

    def rollback(self, request_id: str, length: int) -> None:
        seq = self._seqs.get(request_id)
        if seq is not None:
            del seq[length:]
        if self._alive and request_id in self._synced:
            self._actor.rollback.remote(request_id, length)

    def release(self, request_id: str) -> None:
        self._seqs.pop(request_id, None)
        if request_id in self._synced:
            self._synced.discard(request_id)
            self._releases.append(request_id)
        self._maybe_flush()

    def observe_output(self, tokens: Sequence[int]) -> None:
        if self.learns:
            self._observed.append(list(tokens))
            self._maybe_flush()

    def _maybe_flush(self) -> None:
        if len(self._releases) + len(self._observed) >= _MAX_PIGGYBACK and self._alive:
            self.flush()

    def flush(self) -> None:
        """Send queued releases/observations now (fire and forget)."""
        if self._alive and (self._releases or self._observed):
            self._actor.housekeeping.remote(self._releases, self._observed)
        self._releases, self._observed = [], []


@dataclass
class _Pending:
    requests: list[DraftRequest]
    ref: object | None  # ObjectRef of the actor call; None = answer empty proposals


@dataclass
class _Mirror:
    prompt_len: int
    tokens: list[int]  # prompt + committed
    sampling: SamplingParams
    finished: bool = False


class VerifierHandle:
    """The ``Verifier`` API over a verifier-group actor (the group's leader)."""

    def __init__(
        self, spawn: Callable[[], object], *, call_timeout_s: float = 120.0,
        start_timeout_s: float = 300.0, max_recoveries: int = 3,
    ):
        self._spawn = spawn
        self.call_timeout_s = call_timeout_s
        self.start_timeout_s = start_timeout_s
        self.max_recoveries = max_recoveries  # per call: a crash loop must end in an error
        self._requests: dict[str, _Mirror] = {}
        self._releases: list[str] = []
        self.info: dict = {}
        self.restarts = 0
        self.last_compute_ns = 0  # actor-side time of the last verify call
        self._actor = self._spawn()
        self._ready_ref = self._actor.ping.remote()

    def wait_ready(self, timeout_s: float | None = None) -> dict:
        import ray

        self.info = ray.get(self._ready_ref, timeout=timeout_s if timeout_s is not None else self.start_timeout_s)
        return self.info

    @property
    def actor(self):
        return self._actor

    def shutdown(self) -> None:
        _kill(self._actor)

    # ---- the Verifier API --------------------------------------------------------------------
    def add_requests(self, requests: Sequence[tuple[str, list[int], SamplingParams]]) -> None:
        self._call(lambda a, rel: a.add_requests.remote(list(requests), rel))
        for request_id, prompt, sampling in requests:
            self._requests[request_id] = _Mirror(len(prompt), list(prompt), sampling)

    def verify(self, proposals: Sequence[DraftProposal]) -> list[VerifyResult]:
        reply = self._call(lambda a, rel: a.verify.remote(_dumps((list(proposals), rel))))
        results, self.last_compute_ns = pickle.loads(reply)
        for result in results:
            mirror = self._requests[result.request_id]
            mirror.tokens.extend(result.emitted)
            mirror.finished = result.finish_reason is not None
        return results

    def release(self, request_id: str) -> None:
        if self._requests.pop(request_id, None) is not None:
            self._releases.append(request_id)

    def tokens(self, request_id: str) -> list[int]:
        return list(self._requests[request_id].tokens)

    def generated(self, request_id: str) -> list[int]:
        mirror = self._requests[request_id]
        return mirror.tokens[mirror.prompt_len :]

    def has(self, request_id: str) -> bool:
        return request_id in self._requests

    def flush(self) -> None:
        """Send queued releases now (fire and forget); the runtime calls it when idle."""
        if self._releases:
            self._actor.release.remote(self._releases)
        self._releases = []

    @property
    def active(self) -> list[str]:
        return list(self._requests)

    # ---- calls and recovery --------------------------------------------------------------------
    def _call(self, make_call):
        """Run ``make_call(actor, releases)``; on actor loss recover and retry."""
        import ray

        for attempt in range(self.max_recoveries + 1):
            releases, self._releases = self._releases, []
            try:
                return ray.get(make_call(self._actor, releases), timeout=self.call_timeout_s)
            except _failure_types() as exc:
                if attempt == self.max_recoveries:
                    raise
                self._recover(type(exc).__name__)
        raise AssertionError("unreachable")

    def _recover(self, why: str) -> None:
        """Replace the verifier actor and re-admit every unfinished request from the mirror."""
        import ray

        active = [(rid, m) for rid, m in self._requests.items() if not m.finished]
        logger.warning("verifier lost (%s): recreating it and resuming %d request(s)", why, len(active))
        _kill(self._actor)
        self.restarts += 1
        self._actor = self._spawn()
        self._ready_ref = self._actor.ping.remote()
        self.wait_ready()
        if active:
            items = [(rid, m.prompt_len, list(m.tokens), m.sampling) for rid, m in active]
            ray.get(self._actor.resume_requests.remote(items), timeout=self.call_timeout_s)
        # Finished-but-unreleased requests are gone with the old actor: nothing to free.
        self._releases = [r for r in self._releases if r in self._requests]
