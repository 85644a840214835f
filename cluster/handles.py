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


def _failed(ref) -> bool:
    """True if a finished call's result is an error (never blocks: ``ref`` is ready)."""
    import ray

    try:
        ray.get(ref, timeout=0)
        return False
    except Exception:
        return True


def _wait_quietly(ref, timeout_s: float = 10.0) -> None:
    """Wait for a housekeeping call; a failed actor is dealt with on its next real call."""
    import ray

    try:
        ray.get(ref, timeout=timeout_s)
    except Exception:
        logger.debug("housekeeping call failed", exc_info=True)


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
        self._unconfirmed: list[str] = []  # releases sent in the last call
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

    def restart(self, why: str) -> None:
        """Replace the actor (its requests continue unspeculated until it is back)."""
        self._fail(why)

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
        payload = self.prepare(requests)
        return _Pending(list(requests), None if payload is None else self._actor.propose.remote(payload))

    def prepare(self, requests: Sequence[DraftRequest], *, always: bool = False) -> bytes | None:
        """The ``propose`` payload for ``requests`` (only what the actor has not seen,
        plus queued housekeeping), or None if the actor cannot take it now (the
        requests then get empty proposals). With ``always`` an empty batch still
        makes a payload: a compiled round calls every drafter in its graph."""
        for req in requests:
            seq = self._seqs.setdefault(req.request_id, [])
            del seq[req.position :]
            seq.extend(req.new_tokens)
        if (not requests and not always) or not self._ready():
            return None
        sent = []
        for req in requests:
            if req.request_id in self._synced:
                sent.append(req)
            else:  # new request, or state lost with a previous actor: send it whole
                seq = self._seqs[req.request_id]
                sent.append(DraftRequest(req.request_id, 0, list(seq), req.num_draft_tokens, req.sampling))
                self._synced.add(req.request_id)
        payload = _dumps((sent, self._releases, self._observed))
        self._unconfirmed = self._releases
        self._releases, self._observed = [], []
        return payload

    def resync(self) -> None:
        """After a round whose outcome on this actor is unknown (a failed compiled
        round): send every request whole next time and repeat the last releases
        (both are idempotent on the actor)."""
        self._synced.clear()
        self._releases = self._unconfirmed + self._releases
        self._unconfirmed = []

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

    def abandon(self, pending: _Pending, why: str) -> None:
        """Give up on a call that took too long: restart the drafter; ``collect``
        then answers empty proposals for it."""
        self._fail(why)
        pending.ref = None

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
        """Send queued releases/observations now, and wait: a compiled round graph
        runs ``propose`` on another thread of the actor, so nothing may still be
        running here when the next round starts."""
        if self._alive and (self._releases or self._observed):
            _wait_quietly(self._actor.housekeeping.remote(self._releases, self._observed))
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
        self._in_flight: list[str] = []  # releases sent with the round in flight
        self._round = 0  # id of the last round sent (see VerifierActor.last_round)
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
        results, _ = self.verify_chained([p.request_id for p in proposals], {p.request_id: p for p in proposals})
        return results

    def verify_chained(
        self,
        request_ids: Sequence[str],
        proposals: dict[str, DraftProposal],
        drafts: Sequence[tuple[DrafterHandle, _Pending]] = (),
    ) -> tuple[list[VerifyResult], list[tuple[int, int]]]:
        """Verify ``request_ids``; their proposals are in ``proposals`` or come from the
        in-flight drafter calls ``drafts``, whose ObjectRefs go to the verifier actor
        as arguments: the driver waits once per round, not once per hop.

        Returns the results and ``(compute_ns, longest proposal)`` per drafter call.
        If a drafter call failed or hung, the verify call never ran (Ray does not run
        a task whose argument failed): each drafter handle then answers what it has
        (empty proposals for the failed one, which it restarts) and the round is
        verified plainly, so a lost drafter costs one round's speculation only.
        """
        merged = dict(proposals)
        chained = []
        for handle, pending in drafts:
            if pending.ref is None:  # the drafter was not ready: nothing was drafted
                merged.update((p.request_id, p) for p in handle.collect(pending))
            else:
                chained.append((handle, pending))
        payload, _ = self.round_payload(request_ids, merged)
        reply = self._await_chained(self._actor.verify.remote(payload, *[p.ref for _, p in chained]), chained)
        if reply is None:
            # The call did not run on a live verifier (its releases are re-queued), so
            # the round is verified with whatever each drafter can answer.
            infos = []
            for handle, pending in chained:
                got = handle.collect(pending)
                merged.update((p.request_id, p) for p in got)
                infos.append((handle.last_compute_ns, max((len(p) for p in got), default=0)))
            ordered = {rid: merged[rid] for rid in request_ids}
            results, _ = self.apply_reply(self._call(lambda a, rel: a.verify.remote(
                _dumps((list(request_ids), ordered, rel, None)))))
            return results, infos
        results, infos = self.apply_reply(reply)
        for (handle, _), (compute_ns, _) in zip(chained, infos):
            handle.last_compute_ns = compute_ns
        return results, infos

    def round_payload(self, request_ids: Sequence[str], proposals: dict[str, DraftProposal]) -> tuple[bytes, int]:
        """The ``verify`` payload of a new round (queued releases ride along) and its id."""
        self._round += 1
        self._in_flight, self._releases = self._releases, []
        return _dumps((list(request_ids), proposals, self._in_flight, self._round)), self._round

    def apply_reply(self, reply: bytes) -> tuple[list[VerifyResult], list[tuple[int, int]]]:
        """Commit a verify reply to the mirror; returns the results and drafter infos."""
        results, self.last_compute_ns, infos = pickle.loads(reply)
        self._in_flight = []
        for result in results:
            mirror = self._requests[result.request_id]
            mirror.tokens.extend(result.emitted)
            mirror.finished = result.finish_reason is not None
        return results, infos

    def round_outcome(self, round_id: int, why: str) -> bytes | None:
        """After a failed compiled round: the round's reply if the verifier ran it,
        else None (its releases are re-queued; a lost verifier is recovered)."""
        import ray

        try:
            ran_id, reply = ray.get(self._actor.last_round.remote(), timeout=self.call_timeout_s)
        except _failure_types():
            self.recover(why)
            return None
        if ran_id == round_id:
            return reply
        self._requeue_in_flight()
        return None

    def _requeue_in_flight(self) -> None:
        """The round in flight did not run: its releases are still due."""
        self._releases = self._in_flight + self._releases
        self._in_flight = []

    def recover(self, why: str) -> None:
        """Replace the verifier actor and resume every unfinished request (see ``_recover``)."""
        self._in_flight = []
        self._recover(why)

    def _await_chained(self, ref, drafts: Sequence[tuple[DrafterHandle, _Pending]]):
        """The chained call's reply, or None when it did not run on a live
        verifier (a drafter failed or hung, or the verifier was lost and recovered)."""
        import ray
        from ray.exceptions import GetTimeoutError

        draft_timeout = min((h.call_timeout_s for h, _ in drafts), default=0.0)
        deadline = time.monotonic() + draft_timeout + self.call_timeout_s
        refs = [p.ref for _, p in drafts]
        # Wait first as long as a drafter may take (the common case needs no other
        # call: a ray.wait per round costs ~0.05 ms); after that, the verifier's time.
        timeout = draft_timeout if refs else self.call_timeout_s
        while True:
            try:
                return ray.get(ref, timeout=timeout)
            except Exception as exc:  # classified below: drafter, verifier, or a bug
                error = exc
            done = set(ray.wait(refs, num_returns=len(refs), timeout=0)[0]) if refs else set()
            if any(r in done and _failed(r) for r in refs):
                self._requeue_in_flight()
                return None  # an argument failed: the verify never ran
            hung = [(h, p) for (h, p), r in zip(drafts, refs) if r not in done and p.ref is not None]
            if hung and isinstance(error, GetTimeoutError):
                for handle, pending in hung:
                    # Killing it fails its ref, so the verify call fails too: unless it
                    # answered just now, in which case the verify runs; the loop sees which.
                    handle.abandon(pending, f"no answer in {handle.call_timeout_s:.0f}s")
                continue
            if isinstance(error, GetTimeoutError) and time.monotonic() < deadline:
                timeout = deadline - time.monotonic()
                continue  # the drafters have answered; the verifier still has its own time
            if not isinstance(error, _failure_types()):
                raise error  # a bug in the verifier: surfaced like any other call's
            self.recover(type(error).__name__)
            return None

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
        """Send queued releases now (the runtime calls it when idle), and wait for the
        same reason as ``DrafterHandle.flush``."""
        if self._releases:
            _wait_quietly(self._actor.release.remote(self._releases))
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
