"""Ray actors around the plain ``Drafter`` and ``Verifier`` classes, and where they go.

Where it sits: the distributed runtime (``runtime.py``) creates one ``DrafterActor``
per configured drafter and one ``VerifierActor`` per verifier group; the handles in
``handles.py`` are the only callers. Each round a drafter actor gets the committed
token deltas of its requests and answers proposals; the verifier actor gets the
proposals and answers a ``VerifyReply`` (``core/workers.py``). KV caches and n-gram
indexes never leave the actor: only ids, token lists, proposals and small timings cross.

No decoding logic lives here: an actor builds its plain object with a picklable
factory (``DrafterFactory``/``VerifierFactory`` call ``engine.builder``, tests pass
their own) and forwards calls. What exists for the distributed case only:
- piggy-backed housekeeping: releases and finished-sequence observations ride on
  the next ``propose``/``verify`` call instead of costing an actor call each;
- the per-round calls (``propose``, ``verify``) take and return ``bytes`` pickled by
  the caller: Ray's own serialisation of dataclass lists costs ~0.3 ms more per call
  than a plain ``pickle.dumps`` (measured here, 4-request batches);
- a restarted actor holds nothing: calls that assume otherwise are answered as
  ``unknown`` and the scheduler re-sends those requests from position 0.

Placement: every actor reserves its config's ``resources`` (CPUs, GPUs, custom node
resources such as ``{drafter: 1}``); a verifier group is one placement group of
``tp_size`` bundles packed on one node (STRICT_PACK), its leader in bundle 0.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from specfleet.core.config import DrafterConfig, ResourcesConfig, SpecFleetConfig
from specfleet.core.types import DraftProposal
from specfleet.core.workers import DraftReply, ahead_requests

logger = logging.getLogger(__name__)


# ---- factories: picklable recipes that build the plain objects inside an actor -------
@dataclass(frozen=True)
class DrafterFactory:
    """Builds one drafter exactly as the in-process engine would (``build_drafter``)."""

    cfg: DrafterConfig
    target: str
    max_slots: int
    max_seq_len: int

    def __call__(self):
        from specfleet.engine.builder import build_drafter

        device = "cuda" if self.cfg.resources.num_gpus > 0 else "cpu"
        return build_drafter(
            self.cfg, target=self.target, max_slots=self.max_slots,
            max_seq_len=self.max_seq_len, device=device,
        )


@dataclass(frozen=True)
class VerifierFactory:
    """Builds the target's verifier exactly as the in-process engine would.

    With ``tp_size > 1`` that is a ``TPVerifierGroup``: this actor is rank 0 and
    spawns ranks 1..n-1 as its own worker processes. STRICT_PACK has reserved their
    bundles on this same node, which is where child processes run.
    """

    cfg: SpecFleetConfig

    def __call__(self):
        from specfleet.engine.builder import build_verifier

        return build_verifier(self.cfg)


def _set_threads(torch_threads: int) -> None:
    # Ray sets OMP_NUM_THREADS from num_cpus, but fractional CPUs round to 1 and torch
    # may already be initialised; be explicit so actors sharing cores do not thrash.
    import torch

    torch.set_num_threads(torch_threads)
    os.environ["OMP_NUM_THREADS"] = str(torch_threads)


def _where() -> dict[str, Any]:
    import ray

    ctx = ray.get_runtime_context()
    # The node's own address (what it was started with), not a guess from the route table.
    node = getattr(ray._private.worker.global_worker, "node", None)
    ip = getattr(node, "node_ip_address", None) or ray.util.get_node_ip_address()
    return {"node_id": ctx.get_node_id(), "node_ip": ip, "pid": os.getpid()}


# ---- actors (plain classes; ray.remote is applied at placement) ---------------------
@dataclass(frozen=True)
class DraftSummary:
    """What the driver needs of a drafter reply that went straight to the verifier
    (the proposals themselves stay there)."""

    compute_ns: int  # the drafter's own time for the call
    positions: int  # longest proposal in the call (sequential draft positions)
    unknown: tuple[str, ...]  # requests the drafter held no state for (re-sent whole next time)


class DrafterActor:
    """Holds one ``Drafter``; every method forwards to it."""

    def __init__(self, factory: Callable[[], Any], torch_threads: int = 1):
        _set_threads(torch_threads)
        from specfleet.drafters.base import Drafter

        start = time.perf_counter()
        self.drafter = factory()
        self.load_s = time.perf_counter() - start
        # Only drafters that override the hook learn across requests; the handle skips
        # shipping whole finished sequences to the others.
        self.learns = type(self.drafter).observe_output is not Drafter.observe_output
        self.incarnation = uuid.uuid4().hex
        self._known: set[str] = set()  # requests this incarnation holds state for

    def ping(self) -> dict[str, Any]:
        return {
            "name": self.drafter.name, "can_sample": self.drafter.can_sample,
            "learns": self.learns, "incarnation": self.incarnation, "load_s": self.load_s,
            **_where(),
        }

    def propose(self, payload: bytes) -> bytes:
        """``pickle((calls, releases, observed))`` → ``pickle(DraftReply)``.

        A call that assumes state this actor does not hold (``position > 0`` for a
        request it never saw: it was restarted) is answered with an empty proposal
        and named in ``unknown``; the scheduler re-sends that request whole."""
        start = time.perf_counter_ns()
        calls, releases, observed = pickle.loads(payload)
        self.housekeeping(releases, observed)
        served, unknown = [], []
        for call in calls:
            if call.position > 0 and call.request_id not in self._known:
                unknown.append(call.request_id)
            else:
                served.append(call)
                self._known.add(call.request_id)
        drafted = {p.request_id: p for p in self.drafter.propose(served)} if served else {}
        proposals = [drafted.get(c.request_id) or DraftProposal.empty(c.request_id, self.drafter.name)
                     for c in calls]
        return _dumps(DraftReply(proposals, time.perf_counter_ns() - start, tuple(unknown)))

    def propose_ahead(self, payload: bytes, *own_reply: bytes) -> bytes:
        """``pickle([AheadCall])`` (and the raw reply of this round's ``propose`` call,
        when there was one: Ray resolves its ref first, which also orders the two
        calls) → ``pickle(DraftReply)``: the next window, drafted while the verifier
        checks this one (pipelined mode, ``engine/pipeline.py``)."""
        calls = pickle.loads(payload)
        reply = pickle.loads(own_reply[0]) if own_reply else None
        return self.propose(_dumps((ahead_requests(calls, reply), [], [])))

    def housekeeping(self, releases: Sequence[str] = (), observed: Sequence[list[int]] = ()) -> None:
        for request_id in releases:
            self._known.discard(request_id)
            self.drafter.release(request_id)
        for tokens in observed:
            self.drafter.observe_output(tokens)


class VerifierActor:
    """Holds a verifier group's leader: a ``Verifier`` (or a ``TPVerifierGroup``)."""

    def __init__(self, factory: Callable[[], Any], torch_threads: int = 1):
        _set_threads(torch_threads)
        start = time.perf_counter()
        self.verifier = factory()
        self.load_s = time.perf_counter() - start
        self.incarnation = uuid.uuid4().hex
        self._last_round: tuple[int | None, bytes | None] = (None, None)

    def ping(self) -> dict[str, Any]:
        runner = getattr(self.verifier, "runner", None)
        return {
            "vocab_size": getattr(runner, "vocab_size", None),
            "max_seq_len": getattr(runner, "max_seq_len", None),
            "eos_token_ids": list(getattr(self.verifier, "eos_token_ids", ())),
            "incarnation": self.incarnation, "load_s": self.load_s, **_where(),
        }

    def verify(self, payload: bytes, *drafter_replies: bytes) -> bytes:
        """``pickle((calls, releases, round_id))`` plus the raw replies of this round's
        drafter calls → ``pickle((VerifyReply, [DraftSummary per drafter reply]))``.

        The driver passes each drafter call's ObjectRef straight through as an
        argument, so proposals go drafter → verifier without the driver waiting for,
        unpickling and re-sending them (one driver round trip less per round). Ray
        resolves the refs before this runs; if a drafter call failed, this method
        never runs and the executor falls back (``cluster/executor.py``). A reply
        may cover requests of other verifier groups: the verifier takes only its
        calls' proposals. The reply is kept under ``round_id`` until the next round
        (``last_round``).
        """
        calls, releases, round_id = pickle.loads(payload)
        drafts: list[DraftReply] = [pickle.loads(reply) for reply in drafter_replies]
        self.release(releases)
        result = self.verifier.verify(calls, drafts)
        summaries = [DraftSummary(d.compute_ns, max((len(p) for p in d.proposals), default=0), d.unknown)
                     for d in drafts]
        reply = _dumps((result, summaries))
        self._last_round = (round_id, reply)
        return reply

    def last_round(self) -> tuple[int | None, bytes | None]:
        """The id and reply of the last verified round: after a compiled round failed,
        the executor asks whether it ran here (then its reply is the round's outcome)."""
        return self._last_round

    def release(self, releases: Sequence[str]) -> None:
        for request_id in releases:
            self.verifier.release(request_id)

    def active(self) -> list[str]:
        return list(self.verifier.active)


def _dumps(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


# ---- placement ------------------------------------------------------------------------
def actor_options(res: ResourcesConfig, *, name: str | None = None) -> dict[str, Any]:
    """Ray ``.options()`` for one actor from its config resources.

    Restarts are the handles' job (they recreate and re-sync state), so Ray's own
    restart is off: a restarted actor would silently come back without its caches.
    """
    options: dict[str, Any] = {
        "num_cpus": res.num_cpus,
        "num_gpus": res.num_gpus,
        "max_restarts": 0,
        "max_task_retries": 0,
    }
    if res.custom:
        options["resources"] = dict(res.custom)
    if name:
        options["name"] = name
    return options


def bundle(res: ResourcesConfig) -> dict[str, float]:
    """One placement-group bundle for one TP rank (zero amounts are not allowed)."""
    out = {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.custom}
    out = {k: float(v) for k, v in out.items() if v > 0}
    return out or {"CPU": 0.01}


def spawn_drafter(factory: Callable[[], Any], res: ResourcesConfig, *, name: str | None = None):
    """Start a drafter actor (returns at once; ``ping`` tells when it is loaded)."""
    import ray

    cls = ray.remote(DrafterActor).options(**actor_options(res, name=name))
    return cls.remote(factory, res.torch_threads)


def create_verifier_group(tp_size: int, res: ResourcesConfig, *, name: str | None = None):
    """Reserve one verifier group: ``tp_size`` bundles on one node. Returns the group."""
    from ray.util.placement_group import placement_group

    return placement_group([bundle(res)] * tp_size, strategy="STRICT_PACK", name=name or "")


def spawn_verifier(factory: Callable[[], Any], res: ResourcesConfig, group=None, *, name: str | None = None):
    """Start a verifier-group leader, in bundle 0 of ``group`` when given."""
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    options = actor_options(res, name=name)
    if group is not None:
        # The bundle already holds the custom resources; asking again would double count.
        options.pop("resources", None)
        options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=0,
            placement_group_capture_child_tasks=True,
        )
        if not options["num_cpus"] and not options["num_gpus"]:
            options["num_cpus"] = 0.01  # bundle() reserved CPU 0.01 for an all-zero rank
    cls = ray.remote(VerifierActor).options(**options)
    return cls.remote(factory, res.torch_threads)
