"""The distributed runtime: deploy a config onto Ray and run ``SpecEngine`` over actors.

Where it sits: ``specfleet serve`` (``router/cli_serve.py``) and tests build a
``RayRuntime`` from a ``SpecFleetConfig``; it starts or joins Ray, places one
drafter actor per configured drafter and one verifier-group actor, and wraps them
in handles (``handles.py``). The round loop is the in-process engine's own
``SpecEngine`` — admit → draft → verify → commit — not a copy: ``ActorSpecEngine``
only changes *when* it waits for drafters (all proposal calls are in flight before
it waits for any). ``RayBackend`` is ``router.backend.EngineBackend`` over that
engine, so the gRPC servicer cannot tell it from the in-process backend.

Control overhead per round (what the actor path adds to compute) is recorded in
``ActorSpecEngine.timings``; ``overhead.py`` measures it against the in-process engine.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from specfleet.cluster.actors import (
    DrafterFactory,
    VerifierFactory,
    create_verifier_group,
    spawn_drafter,
    spawn_verifier,
)
from specfleet.cluster.compiled_round import CompiledRound
from specfleet.cluster.handles import DrafterHandle, VerifierHandle
from specfleet.core.config import ClusterConfig, SpecFleetConfig
from specfleet.core.stats import RoundTiming
from specfleet.core.types import DraftProposal
from specfleet.engine.engine import SpecEngine
from specfleet.policy.factory import build_draft_length, build_router, default_drafter
from specfleet.router.backend import BackendInfo, EngineBackend

logger = logging.getLogger(__name__)
_CLUSTER_DEFAULTS = ClusterConfig()  # the config's defaults, for engines built without one


class ActorSpecEngine(SpecEngine):
    """``SpecEngine`` whose drafters are ``DrafterHandle``s and verifier a ``VerifierHandle``.

    The base round calls each drafter's ``propose`` in turn, then ``verify``. Over
    actors that would serialise drafters that could run side by side, and cost the
    driver a round trip per hop. Here the base ``_draft`` runs unchanged with every
    handle replaced by a recorder, so windows, deltas and bookkeeping are exactly the
    base engine's; then the recorded batches go out in one of two ways:

    - plain calls: every drafter call is sent, and the in-flight calls go straight
      into the verify call as arguments (``VerifierHandle.verify_chained``): drafters
      run in parallel, proposals travel drafter → verifier, the driver waits once;
    - a compiled graph (``compiled_round.py``) once the same drafters have been in
      use for a few rounds: the same payloads over shared-memory channels.
    """

    def __init__(self, *args, concurrent_drafts: bool = True, compiled_graph: bool = True,
                 compiled_graph_max_drafters: int = 1,
                 compile_after_rounds: int = _CLUSTER_DEFAULTS.compile_after_rounds,
                 compile_min_rounds_left: int = _CLUSTER_DEFAULTS.compile_min_rounds_left, **kwargs):
        super().__init__(*args, **kwargs)
        self.concurrent_drafts = concurrent_drafts
        self.compiled_graph = compiled_graph and concurrent_drafts
        self.compiled_graph_max_drafters = compiled_graph_max_drafters
        self.compile_min_rounds_left = compile_min_rounds_left
        self.compile_after_rounds = compile_after_rounds
        self.timings: deque[RoundTiming] = deque(maxlen=4096)
        self.compiled_rounds = 0  # rounds that ran through a compiled graph
        self._draft_ns = 0
        self._compiled: CompiledRound | None = None
        self._last_used: frozenset[str] = frozenset()
        self._same_used = 0  # consecutive rounds with the drafter set _last_used

    def step(self):
        start = time.perf_counter_ns()
        self._draft_ns = 0
        self.verifier.last_compute_ns = 0
        finished = super().step()
        if self.timings.maxlen and self.verifier.last_compute_ns:
            self.timings.append(
                RoundTiming(time.perf_counter_ns() - start, self._draft_ns, self.verifier.last_compute_ns)
            )
        if not self.has_work:
            # Releases normally ride on the next call; with nothing left to run, send
            # them now so idle actors hold no KV slots of finished requests.
            self.verifier.flush()
            for handle in self.drafters.values():
                if isinstance(handle, DrafterHandle):
                    handle.flush()
        return finished

    def generate(self, *args, **kwargs):
        try:
            return super().generate(*args, **kwargs)
        finally:
            self.idle()

    def idle(self) -> None:
        """Nothing to run for a while: drop the compiled graph (its actors poll)."""
        self._drop_compiled()
        self._same_used = 0

    def _rounds_left(self) -> float:
        """Rounds the longest active request may still take (budget / tokens per round)."""
        left = 0.0
        for rid, req in self._active.items():
            budget = req.sampling.max_new_tokens - len(self.verifier.generated(rid))
            left = max(left, budget / max(1.0, req.stats.mean_acceptance_length))
        return left

    def _drop_compiled(self) -> None:
        if self._compiled is not None:
            self._compiled.teardown()
            self._compiled = None

    def _draft_and_verify(self):
        handles = {n: d for n, d in self.drafters.items() if isinstance(d, DrafterHandle)}
        for handle in handles.values():
            handle.last_compute_ns = 0
        if not self.concurrent_drafts or not handles:
            # One drafter call after another, then the verify: the plain engine's order
            # (kept to measure what the chained round saves).
            results, timing = super()._draft_and_verify()
            self._draft_ns = sum(h.last_compute_ns for h in handles.values())
            return results, timing
        recorders = {name: _Recorder(name) for name in handles}
        real, self.drafters = self.drafters, {**self.drafters, **recorders}
        try:
            proposals, _ = self._draft()
        finally:
            self.drafters = real
        batches = {name: r.requests for name, r in recorders.items() if r.requests}
        drafted = {req.request_id for batch in batches.values() for req in batch}
        local = {rid: p for rid, p in proposals.items() if rid not in drafted}
        request_ids = list(self._active)
        out = None
        compiled = self._compiled_for(frozenset(batches), handles)
        if compiled is not None:
            out = compiled.run(self.verifier, handles, request_ids, local, batches)
            if out is None:  # the round did not happen: plain calls below; rebuild later
                self._compiled, self._same_used = None, 0
            else:
                self.compiled_rounds += 1
        if out is None:
            calls = [(handles[name], handles[name].submit(batch)) for name, batch in batches.items()]
            out = self.verifier.verify_chained(request_ids, local, calls)
        results, drafts = out
        # The drafters ran side by side: the round took the slowest, not the sum.
        self._draft_ns = max((ns for ns, _ in drafts), default=0)
        positions = max((n for _, n in drafts), default=0)
        timing = (self._draft_ns / positions, self.verifier.last_compute_ns) if positions else None
        return results, timing

    def _compiled_for(self, used: frozenset[str], handles) -> CompiledRound | None:
        """The compiled graph to run this round on, building one when it pays."""
        if not self.compiled_graph or not used:
            return None
        self._same_used = self._same_used + 1 if used == self._last_used else 1
        self._last_used = used
        current = self._compiled
        if current is not None and current.valid_for(self.verifier, handles) and used <= set(current.names):
            # Requests finishing leave a subset in use: recompiling (~0.2 s) for that
            # would cost more than the idle drafters' empty calls.
            return current
        # Out of date (an actor was replaced) or missing a drafter: its actors would
        # poll for nothing while rounds run over plain calls.
        self._drop_compiled()
        if (self._same_used < self.compile_after_rounds or len(used) > self.compiled_graph_max_drafters
                or not all(handles[n].alive for n in used) or self._rounds_left() < self.compile_min_rounds_left):
            return None
        try:
            self._compiled = CompiledRound(self.verifier, {n: handles[n] for n in used})
        except Exception:
            logger.warning("cannot compile the round graph; using plain actor calls", exc_info=True)
            self.compiled_graph = False
            return None
        self._same_used = self.compile_after_rounds  # keep counting from here, not from 0
        return self._compiled


class _Recorder:
    """Stands in for a ``DrafterHandle`` during ``ActorSpecEngine._draft``: records the
    batch (the base engine's deltas) and answers placeholders."""

    def __init__(self, name: str):
        self.name = name
        self.requests = []

    def propose(self, requests):
        self.requests.extend(requests)
        return [DraftProposal.empty(r.request_id, self.name) for r in requests]


# ---- Ray connection ----------------------------------------------------------------------
def connect(cluster: ClusterConfig, address: str | None = None) -> bool:
    """Start an embedded Ray (``local``) or join one; True if this process started it."""
    import ray

    address = address or cluster.address
    if ray.is_initialized():
        return False
    if address == "local":
        # address="local" starts a new Ray even if one already runs on this machine
        # (plain ray.init() would join it, and then refuse num_cpus).
        ray.init(
            address="local", num_cpus=cluster.num_cpus, num_gpus=cluster.num_gpus, resources=dict(cluster.resources),
            include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False,
        )
        return True
    ray.init(address=address, configure_logging=False)
    return False


# ---- the runtime ---------------------------------------------------------------------------
@dataclass
class Placement:
    role: str  # "drafter" or "verifier"
    name: str
    node_id: str
    node_ip: str
    pid: int
    resources: dict = field(default_factory=dict)


class RayRuntime:
    """One deployment: its actors, their handles and the engine driving them."""

    def __init__(
        self,
        cfg: SpecFleetConfig,
        *,
        drafter_factories: Mapping[str, Callable] | None = None,
        verifier_factory: Callable | None = None,
        concurrent_drafts: bool = True,
        compiled_graph: bool | None = None,
        call_timeout_s: float = 60.0,
        start_timeout_s: float = 600.0,
    ):
        """Deploy ``cfg`` on the Ray this process is connected to (see ``connect``).

        ``drafter_factories`` / ``verifier_factory`` replace the config-driven builders
        (tests, fakes); by default each actor builds its piece with ``engine.builder``.
        """
        from specfleet.engine.builder import build_engine  # noqa: F401 - fail early if missing

        self.cfg = cfg
        self.owns_ray = False
        vcfg = cfg.verifier
        if vcfg.count > 1:
            logger.warning("verifier.count=%d: this runtime drives one verifier group", vcfg.count)
        slots = vcfg.max_batch_size
        self.group = create_verifier_group(vcfg.tp_size, vcfg.resources, name="specfleet-verifier-0")
        vfactory = verifier_factory or VerifierFactory(cfg)
        self.verifier = VerifierHandle(
            lambda: spawn_verifier(vfactory, vcfg.resources, self.group),
            call_timeout_s=call_timeout_s * 2, start_timeout_s=start_timeout_s,
        )
        self.drafters: dict[str, DrafterHandle] = {}
        for dcfg in cfg.drafters:
            factory = (drafter_factories or {}).get(dcfg.name) or DrafterFactory(
                dcfg, cfg.models.target, slots, vcfg.max_seq_len
            )
            self.drafters[dcfg.name] = DrafterHandle(
                dcfg.name,
                lambda f=factory, r=dcfg.resources: spawn_drafter(f, r),
                can_sample=dcfg.kind == "model",
                call_timeout_s=call_timeout_s,
            )
        try:
            self.placements = self._wait_ready(start_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        self.engine = ActorSpecEngine(
            self.verifier, self.drafters, draft_policy=build_draft_length(cfg),
            default_drafter=default_drafter(cfg),
            max_batch_size=slots, concurrent_drafts=concurrent_drafts,
            compiled_graph=cfg.cluster.compiled_graph if compiled_graph is None else compiled_graph,
            compiled_graph_max_drafters=cfg.cluster.compiled_graph_max_drafters,
            compile_after_rounds=cfg.cluster.compile_after_rounds,
            compile_min_rounds_left=cfg.cluster.compile_min_rounds_left,
        )

    @classmethod
    def start(cls, cfg: SpecFleetConfig, address: str | None = None, **kwargs) -> RayRuntime:
        """Connect to Ray as the config (or ``address``) says, then deploy."""
        owns = connect(cfg.cluster, address)
        try:
            runtime = cls(cfg, **kwargs)
        except BaseException:
            if owns:
                import ray

                ray.shutdown()
            raise
        runtime.owns_ray = owns
        return runtime

    def _wait_ready(self, timeout_s: float) -> list[Placement]:
        placements = []
        info = self.verifier.wait_ready(timeout_s)
        placements.append(Placement("verifier", "verifier-0", info["node_id"], info["node_ip"], info["pid"],
                                    _res(self.cfg.verifier.resources)))
        for dcfg in self.cfg.drafters:
            info = self.drafters[dcfg.name].wait_ready(timeout_s)
            placements.append(Placement("drafter", dcfg.name, info["node_id"], info["node_ip"], info["pid"],
                                        _res(dcfg.resources)))
        for p in placements:
            logger.info("placed %s %r on node %s (%s), pid %d, resources %s",
                        p.role, p.name, p.node_id[:12], p.node_ip, p.pid, p.resources)
        return placements

    def backend_info(self) -> BackendInfo:
        cfg = self.cfg
        return BackendInfo(
            target=cfg.models.target,
            tokenizer=cfg.models.tokenizer or cfg.models.target,
            vocab_size=self.verifier.info.get("vocab_size") or 0,
            max_seq_len=self.verifier.info.get("max_seq_len") or cfg.verifier.max_seq_len,
            drafters=[{"name": d.name, "kind": d.kind, "domain": d.domain} for d in cfg.drafters],
            verifier_groups=[{"tp_size": cfg.verifier.tp_size, "device": cfg.verifier.device,
                              "dtype": cfg.verifier.dtype}],
        )

    def backend(self) -> RayBackend:
        return RayBackend(self)

    def shutdown(self) -> None:
        """Release every actor and the placement group; stop Ray if this runtime started it."""
        import ray
        from ray.util.placement_group import remove_placement_group

        if getattr(self, "engine", None) is not None:
            self.engine.idle()  # tear the compiled graph down before its actors go
        for handle in list(getattr(self, "drafters", {}).values()):
            handle.shutdown()
        if getattr(self, "verifier", None) is not None:
            self.verifier.shutdown()
        try:
            remove_placement_group(self.group)
        except Exception:  # already gone with the cluster
            pass
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
        logger.info("runtime shut down: every actor released")


class RayBackend(EngineBackend):
    """``GenerationBackend`` over the Ray runtime: the in-process backend's thread and
    streaming, with an engine whose drafters and verifier are actors."""

    def __init__(self, runtime: RayRuntime, *, router=None):
        """``router`` (built from the config by ``from_config``) chooses drafters for
        requests without a preference; without it the default drafter serves them."""
        self.runtime = runtime
        runtime.engine.router = router
        super().__init__(runtime.engine, runtime.backend_info())

    @classmethod
    def from_config(cls, cfg: SpecFleetConfig, address: str | None = None, **kwargs) -> RayBackend:
        """Start or join Ray, deploy ``cfg``, and route like ``EngineBackend.from_config``."""
        runtime = RayRuntime.start(cfg, address, **kwargs)
        try:
            from specfleet.models.loading import load_tokenizer

            # Routing reads request text in this process; the tokenizer is all it needs.
            tok = load_tokenizer(cfg.models.tokenizer or cfg.models.target, config_key="models.tokenizer")
            router = build_router(cfg, lambda ids: tok.decode(ids, skip_special_tokens=False))
            return cls(runtime, router=router)
        except BaseException:
            runtime.shutdown()
            raise

    async def close(self) -> None:
        """Stop the engine thread (after the caller drained requests) and free every actor."""
        await super().close()
        self.runtime.shutdown()


def _res(res) -> dict:
    out = {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.custom}
    return {k: v for k, v in out.items() if v}
