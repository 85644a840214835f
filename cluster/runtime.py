"""The distributed runtime: deploy a config onto Ray and drive it with the engine driver.

Where it sits: ``specfleet serve`` (``router/server.py``) and tests build a
``RayRuntime`` from a ``SpecFleetConfig``; it starts or joins Ray, places one
drafter actor per configured drafter and ``verifier.count`` verifier groups (each
its own placement group of ``tp_size`` bundles), wraps them in handles
(``handles.py``) and runs them with the same ``EngineDriver`` and ``Scheduler`` as
the in-process engine, over a ``RayExecutor`` (``executor.py``). ``RayBackend`` is
the in-process ``EngineBackend`` over that driver, so the gRPC servicer cannot tell
them apart.

Control overhead per round (what the actor path adds to compute) is in
``engine.timings``; ``benchmarks/overhead.py`` measures it against the in-process engine.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from specfleet.cluster.actors import (
    DrafterFactory,
    VerifierFactory,
    create_verifier_group,
    spawn_drafter,
    spawn_verifier,
)
from specfleet.cluster.executor import RayExecutor
from specfleet.cluster.handles import DrafterHandle, VerifierHandle
from specfleet.cluster.supervisor import RestartBudget
from specfleet.core.config import ClusterConfig, DrafterConfig, SpecFleetConfig
from specfleet.core.placement import check_fits, deployment_demands
from specfleet.core.serving import BackendInfo
from specfleet.engine.backend import EngineBackend, backend_info
from specfleet.engine.driver import EngineDriver
from specfleet.engine.pipeline import PipelinedScheduler
from specfleet.engine.scheduler import Scheduler
from specfleet.policy.factory import build_policies

logger = logging.getLogger(__name__)


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
        with _loopback_only():
            ray.init(
                address="local", num_cpus=cluster.num_cpus, num_gpus=cluster.num_gpus,
                resources=dict(cluster.resources), include_dashboard=False,
                _node_ip_address="127.0.0.1", configure_logging=False,
            )
        return True
    ray.init(address=address, configure_logging=False)
    return False


def live_cluster_nodes() -> list[dict[str, float]]:
    """Total resources of every alive node of the Ray this process is connected to."""
    import ray

    return [{k: float(v) for k, v in n.get("Resources", {}).items() if not k.startswith("node:")}
            for n in ray.nodes() if n.get("Alive")]


def _wait_until_fits(cfg: SpecFleetConfig, wait_s: float, poll_s: float = 1.0) -> None:
    """Return once the deployment fits the alive nodes; raise ``PlacementError`` (what
    each actor asks, what the cluster has) if it still does not after ``wait_s``."""
    import time

    from specfleet.core.placement import PlacementError

    deadline = time.monotonic() + wait_s
    logged = False
    while True:
        try:
            check_fits(deployment_demands(cfg), live_cluster_nodes())
            return
        except PlacementError as exc:
            if time.monotonic() >= deadline:
                raise PlacementError(f"{exc} (waited {wait_s:.0f} s for nodes to join)") from None
            if not logged:
                logger.warning("waiting up to %.0f s for the cluster to fit the deployment: %s", wait_s, exc)
                logged = True
            time.sleep(poll_s)


# Ray's switch for single-machine mode (its default on macOS/Windows): node IP 127.0.0.1.
_SINGLE_HOST_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def _loopback_only():
    """Make an embedded Ray listen on loopback only, every process of it.

    Ray (2.60) rewrites ``_node_ip_address="127.0.0.1"`` to the machine's routable
    address (``services.resolve_ip_for_localhost``) unless clusters are disabled, and
    then GCS, raylet, workers and the driver listen on all interfaces and the agents on
    the host IP. With clusters disabled (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read
    by Ray at import) the node IP stays 127.0.0.1, and every C++ gRPC server and both
    agents bind 127.0.0.1 (tested: ``tests/integration/test_ray_serve.py`` lists the
    listening sockets of the serve process tree). Ray is usually imported by now, so
    its constant is set here too; the environment variable reaches the processes
    ``ray.init`` starts (GCS, raylet, agents; workers inherit the raylet's). Both are
    put back afterwards: joining a cluster later must not be loopback-bound.
    """
    from ray._private import ray_constants

    saved_env, saved_flag = os.environ.get(_SINGLE_HOST_ENV), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[_SINGLE_HOST_ENV] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_flag
        if saved_env is None:
            os.environ.pop(_SINGLE_HOST_ENV, None)
        else:
            os.environ[_SINGLE_HOST_ENV] = saved_env


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
    """One deployment: its actors, their handles and the engine driver over them."""

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
        placement_wait_s: float = 120.0,
    ):
        """Deploy ``cfg`` on the Ray this process is connected to (see ``connect``).

        ``drafter_factories`` / ``verifier_factory`` replace the config-driven builders
        (tests, fakes); by default each actor builds its piece with ``engine.builder``.
        """
        from specfleet.engine.builder import with_context_length

        cfg = with_context_length(cfg)  # the actors and the frontend size KV from one value
        # Fail with what is missing instead of Ray waiting forever for resources; a
        # joined cluster may still be gaining nodes (ray up, autoscaling), so it gets
        # a bounded wait for them first.
        _wait_until_fits(cfg, placement_wait_s)
        self.cfg = cfg
        self.owns_ray = False
        self._call_timeout_s = call_timeout_s
        self._extra_drafters: dict[str, DrafterHandle] = {}  # joined at run time
        vcfg = cfg.verifier
        slots = vcfg.max_batch_size
        vfactory = verifier_factory or VerifierFactory(cfg)
        self.groups = []  # one placement group per verifier group
        self.verifiers: list[VerifierHandle] = []
        self.drafters: dict[str, DrafterHandle] = {}
        try:
            for g in range(vcfg.count):
                self.groups.append(create_verifier_group(vcfg.tp_size, vcfg.resources,
                                                         name=f"specfleet-verifier-{g}"))
                self.verifiers.append(VerifierHandle(
                    lambda pg=self.groups[g]: spawn_verifier(vfactory, vcfg.resources, pg), group=g,
                    call_timeout_s=call_timeout_s * 2, start_timeout_s=start_timeout_s,
                    budget=RestartBudget.from_config(cfg.cluster),
                ))
            for dcfg in cfg.drafters:
                factory = (drafter_factories or {}).get(dcfg.name) or DrafterFactory(
                    dcfg, cfg.models.target, slots * vcfg.count, vcfg.max_seq_len
                )
                self.drafters[dcfg.name] = DrafterHandle(
                    dcfg.name, lambda f=factory, r=dcfg.resources: spawn_drafter(f, r),
                    call_timeout_s=call_timeout_s, budget=RestartBudget.from_config(cfg.cluster),
                )
            self.placements = self._wait_ready(start_timeout_s)
            decode = _target_decode(cfg)
            from specfleet.zoo.domain_centroids import classifier_for

            policies = build_policies(cfg, decode, classifier_for(cfg))
            info = self.verifier.info
            pipeline = {"first_window": cfg.scheduler.first_window} if cfg.scheduler.mode == "pipelined" else {}
            self.scheduler = (PipelinedScheduler if pipeline else Scheduler)(
                **pipeline, drafters=list(self.drafters), draft_length=policies.draft_length, router=policies.router,
                width=policies.width, default_drafter=policies.default_drafter, groups=vcfg.count, max_batch_size=slots,
                eos_token_ids=info.get("eos_token_ids") or (), decode=decode,
                vocab_size=info.get("vocab_size"), max_seq_len=info.get("max_seq_len") or vcfg.max_seq_len,
            )
            self.executor = RayExecutor(
                self.drafters, self.verifiers, concurrent_drafts=concurrent_drafts,
                compiled_graph=cfg.cluster.compiled_graph if compiled_graph is None else compiled_graph,
                compiled_graph_max_drafters=cfg.cluster.compiled_graph_max_drafters,
                compile_after_rounds=cfg.cluster.compile_after_rounds,
                compile_min_rounds_left=cfg.cluster.compile_min_rounds_left,
            )
            self.engine = EngineDriver(self.scheduler, self.executor)
        except BaseException:
            self.shutdown()
            raise

    @property
    def verifier(self) -> VerifierHandle:
        """Verifier group 0 (the only one unless ``verifier.count > 1``)."""
        return self.verifiers[0]

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
        for g, handle in enumerate(self.verifiers):
            info = handle.wait_ready(timeout_s)
            placements.append(Placement("verifier", f"verifier-{g}", info["node_id"], info["node_ip"],
                                        info["pid"], _res(self.cfg.verifier.resources)))
        for dcfg in self.cfg.drafters:
            info = self.drafters[dcfg.name].wait_ready(timeout_s)
            placements.append(Placement("drafter", dcfg.name, info["node_id"], info["node_ip"], info["pid"],
                                        _res(dcfg.resources)))
        for p in placements:
            logger.info("placed %s %r on node %s (%s), pid %d, resources %s",
                        p.role, p.name, p.node_id[:12], p.node_ip, p.pid, p.resources)
        return placements

    def start_drafter(self, dcfg: DrafterConfig, timeout_s: float = 300.0) -> DrafterHandle:
        """Place a drafter actor for a drafter joining at run time and wait until it is
        up (the caller then hands it to the engine). Raises if it cannot start."""
        vcfg = self.cfg.verifier
        factory = DrafterFactory(dcfg, self.cfg.models.target, vcfg.max_batch_size * vcfg.count, vcfg.max_seq_len)
        handle = DrafterHandle(dcfg.name, lambda: spawn_drafter(factory, dcfg.resources),
                               call_timeout_s=self._call_timeout_s,
                               budget=RestartBudget.from_config(self.cfg.cluster))
        try:
            info = handle.wait_ready(timeout_s)
        except BaseException:
            handle.shutdown()
            raise
        self.placements.append(Placement("drafter", dcfg.name, info["node_id"], info["node_ip"], info["pid"],
                                         _res(dcfg.resources)))
        self._extra_drafters[dcfg.name] = handle
        logger.info("drafter %r joined on node %s, pid %d", dcfg.name, info["node_id"][:12], info["pid"])
        return handle

    def stop_drafter(self, handle: DrafterHandle) -> None:
        """Stop a drafter the engine has let go of."""
        handle.shutdown()
        self.drafters.pop(handle.name, None)
        self._extra_drafters.pop(handle.name, None)
        self.placements = [p for p in self.placements if not (p.role == "drafter" and p.name == handle.name)]
        logger.info("drafter %r left", handle.name)

    def backend_info(self) -> BackendInfo:
        info = self.verifier.info
        return backend_info(self.cfg, vocab_size=info.get("vocab_size") or 0,
                            max_seq_len=info.get("max_seq_len") or self.cfg.verifier.max_seq_len)

    def backend(self) -> RayBackend:
        return RayBackend(self)

    def shutdown(self) -> None:
        """Release every actor and placement group; stop Ray if this runtime started it."""
        import ray
        from ray.util.placement_group import remove_placement_group

        if getattr(self, "executor", None) is not None:
            self.executor.idle()  # tear the compiled graph down before its actors go
        joined = getattr(self, "_extra_drafters", {})
        for handle in {**getattr(self, "drafters", {}), **joined}.values():
            handle.shutdown()
        for handle in getattr(self, "verifiers", []):
            handle.shutdown()
        for group in getattr(self, "groups", []):
            try:
                remove_placement_group(group)
            except Exception:  # already gone with the cluster
                pass
        if self.owns_ray and ray.is_initialized():
            ray.shutdown()
        logger.info("runtime shut down: every actor released")


class RayBackend(EngineBackend):
    """``GenerationBackend`` over the Ray runtime: the in-process backend's thread and
    streaming, with an engine driver whose workers are actors."""

    def __init__(self, runtime: RayRuntime):
        self.runtime = runtime
        super().__init__(runtime.engine, runtime.backend_info(), start_drafter=runtime.start_drafter)

    def _stop_drafter(self, worker: DrafterHandle) -> None:
        self.runtime.stop_drafter(worker)

    @classmethod
    def from_config(cls, cfg: SpecFleetConfig, address: str | None = None, **kwargs) -> RayBackend:
        """Start or join Ray and deploy ``cfg`` (routing as ``EngineBackend.from_config``)."""
        runtime = RayRuntime.start(cfg, address, **kwargs)
        try:
            return cls(runtime)
        except BaseException:
            runtime.shutdown()
            raise

    def worker_restarts(self) -> tuple[dict[str, int], dict[int, int]]:
        """Actor restarts by the supervisors: plain ints, safe to read from any thread."""
        runtime = self.runtime
        return ({name: h.restarts for name, h in runtime.drafters.items()},
                {g: h.restarts for g, h in enumerate(runtime.verifiers)})

    async def close(self) -> None:
        """Stop the engine thread (after the caller drained requests) and free every actor."""
        await super().close()
        self.runtime.shutdown()


def _target_decode(cfg: SpecFleetConfig) -> Callable[[list[int]], str] | None:
    """Token ids → text with the target's tokenizer, for stop strings and routing (both
    run in this process); None when the deployment has no tokenizer on this machine."""
    from specfleet.models.loading import load_tokenizer

    spec = cfg.models.tokenizer or cfg.models.target
    try:
        tok = load_tokenizer(spec, config_key="models.tokenizer" if cfg.models.tokenizer else "models.target")
    except Exception as exc:
        logger.warning("no tokenizer for %s here (%s): stop strings and routing by text are off", spec, exc)
        return None
    return lambda ids: tok.decode(ids, skip_special_tokens=False)


def _res(res) -> dict:
    out = {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.custom}
    return {k: v for k, v in out.items() if v}
