"""A simulated deployment: YAML → frozen dataclasses → a ready ``Simulator``.

Where it sits: ``specfleet simulate --config FILE`` and each candidate of ``specfleet
plan --candidates FILE`` load one of these; ``build_simulation`` wires the real
``Scheduler`` with the real policies (``policy/factory.py``, from the same
``router`` / ``scheduler`` sections a serving config has) to simulated workers, a
step-time model (a ``specfleet profile`` file or a GPU roofline), acceptance curves,
a network model and node costs. Validation errors name the file and key path.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

from specfleet.core.config import Domain, RouterConfig, SchedulerConfig
from specfleet.core.config import config_field as _f
from specfleet.core.typed_yaml import load_yaml_file
from specfleet.engine.pipeline import PipelinedScheduler
from specfleet.engine.scheduler import Scheduler
from specfleet.policy.factory import build_draft_length, build_router, build_width
from specfleet.sim.acceptance import AcceptanceCurves, AcceptanceModel
from specfleet.sim.executor import NetworkModel, SimExecutor
from specfleet.sim.simulator import Simulator, decode_synthetic
from specfleet.sim.step_time import (
    GPUS,
    FittedStepTime,
    ModelShape,
    RooflineStepTime,
    ScaledStepTime,
    StepTimeModel,
)


@dataclass(frozen=True)
class ShapeConfig:
    params: float = _f(1e9, "parameters", min=1)
    layers: int = _f(16, "transformer layers", min=1)
    hidden: int = _f(2048, "hidden size", min=1)
    kv_heads: int = _f(8, "key/value heads", min=1)
    head_dim: int = _f(128, "head dimension", min=1)

    def shape(self) -> ModelShape:
        return ModelShape(self.params, self.layers, self.hidden, self.kv_heads, self.head_dim)


@dataclass(frozen=True)
class HardwareConfig:
    kind: Literal["profile", "roofline"] = _f("profile", "profile: timings measured by `specfleet "
                                              "profile`; roofline: a GPU's datasheet")
    profile: str | None = _f(None, "profile file (kind profile); relative to the config file")
    gpu: Literal["a100", "h100", "h200"] = _f("h200", "GPU of every node (kind roofline)")
    target: ShapeConfig = _f(ShapeConfig, "the target model's shape (kind roofline)")
    round_overhead_us: float = _f(0.0, "per-round driver/RPC overhead added on top (roofline)", min=0)
    draft_speed_factor: float = _f(1.0, "multiply profiled draft times (re-calibration to the moment)", min=0)
    verify_speed_factor: float = _f(1.0, "multiply profiled verify times (re-calibration)", min=0)
    round_overhead_override_us: float | None = _f(None, "replace the profile's per-round overhead", min=0)
    draft_jitter: float = _f(0.0, "σ of a per-call lognormal noise on draft times (0: deterministic)", min=0)
    verify_jitter: float = _f(0.0, "σ of a per-call lognormal noise on verify times", min=0)

    def __post_init__(self):
        if self.kind == "profile" and not self.profile:
            raise ValueError("hardware.profile: kind 'profile' needs a profile file")


@dataclass(frozen=True)
class SimDrafterConfig:
    name: str = field(metadata={"help": "drafter name (copies are name-0, name-1, ...)"})
    domain: Domain = _f("general", "the request domain it specialises in (routing prior, curves)")
    count: int = _f(1, "identical copies (nodes) of this drafter", min=1)
    profile_as: str | None = _f(None, "the profiled/curve drafter whose timings and acceptance it has")
    shape: ShapeConfig | None = _f(None, "model shape (roofline); none = a model-free drafter")
    cost_per_hour: float = _f(0.0, "price of one copy's node per hour", min=0)


@dataclass(frozen=True)
class SimVerifierConfig:
    groups: int = _f(1, "verifier groups (copies of the target)", min=1)
    tp_size: int = _f(1, "GPUs per group (tensor parallel)", min=1)
    max_batch_size: int = _f(8, "requests verified together per group", min=1)
    max_seq_len: int = _f(1024, "prompt + output tokens a request may hold in KV", min=1)
    kv_capacity_tokens: int = _f(0, "KV tokens per group; 0 = from the roofline (or unbounded)", min=0)
    cost_per_hour: float = _f(0.0, "price of one group's nodes per hour", min=0)


@dataclass(frozen=True)
class NetworkConfig:
    hop_us: float = _f(0.0, "one-way latency of a drafter ↔ verifier message", min=0)
    gbps: float = _f(0.0, "link bandwidth (0: size is free)", min=0)


@dataclass(frozen=True)
class ExecutionConfig:
    lockstep: bool = _f(True, "groups step together, as EngineDriver does; false: each re-plans alone")
    groups_parallel: bool = _f(True, "groups run side by side (false: in-process, one after another)")
    drafters_parallel: bool = _f(True, "drafters run side by side (false: in-process, one after another)")


@dataclass(frozen=True)
class AcceptanceConfig:
    curves: str | None = _f(None, "curves file from `specfleet profile --acceptance`; relative to the config")
    default: float = _f(0.6, "per-token acceptance where no curve is known", min=0)
    seed: int = _f(0, "seed of the acceptance draws", min=0)


@dataclass(frozen=True)
class SimDeploymentConfig:
    name: str = _f("deployment", "label in reports and plan tables")
    hardware: HardwareConfig = _f(HardwareConfig, "where step times come from")
    drafters: list[SimDrafterConfig] = _f(list, "drafter nodes (none: plain decoding)")
    verifier: SimVerifierConfig = _f(SimVerifierConfig, "verifier groups")
    router: RouterConfig = _f(RouterConfig, "the serving config's router section")
    scheduler: SchedulerConfig = _f(SchedulerConfig, "the serving config's scheduler section")
    network: NetworkConfig = _f(NetworkConfig, "drafter ↔ verifier network")
    execution: ExecutionConfig = _f(ExecutionConfig, "how rounds run side by side")
    acceptance: AcceptanceConfig = _f(AcceptanceConfig, "acceptance curves")


@dataclass(frozen=True)
class CandidatesConfig:
    candidates: list[SimDeploymentConfig] = _f(list, "deployments `specfleet plan` compares")


def load_deployment(path: str | Path) -> tuple[SimDeploymentConfig, Path]:
    """The deployment and the directory its relative paths are resolved against."""
    return load_yaml_file(path, SimDeploymentConfig), Path(path).resolve().parent


def load_candidates(path: str | Path) -> tuple[list[SimDeploymentConfig], Path]:
    cfg = load_yaml_file(path, CandidatesConfig)
    if not cfg.candidates:
        raise ValueError(f"{path}: candidates: at least one deployment is required")
    return cfg.candidates, Path(path).resolve().parent


def drafter_names(cfg: SimDeploymentConfig) -> list[tuple[str, SimDrafterConfig]]:
    out = []
    for d in cfg.drafters:
        out += [(d.name if d.count == 1 else f"{d.name}-{i}", d) for i in range(d.count)]
    return out


def cost_per_hour(cfg: SimDeploymentConfig) -> float:
    return (sum(d.cost_per_hour * d.count for d in cfg.drafters)
            + cfg.verifier.cost_per_hour * cfg.verifier.groups)


def _resolve(base: Path, path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else base / p


def build_step_time(cfg: SimDeploymentConfig, base: Path) -> StepTimeModel:
    hw = cfg.hardware
    if hw.kind == "profile":
        fitted = FittedStepTime.from_profile(_resolve(base, hw.profile))
        if hw.draft_speed_factor == 1.0 and hw.verify_speed_factor == 1.0 and \
                hw.round_overhead_override_us is None and not hw.draft_jitter and not hw.verify_jitter:
            return fitted
        overhead = None if hw.round_overhead_override_us is None else hw.round_overhead_override_us * 1e3
        return ScaledStepTime(fitted, hw.draft_speed_factor, hw.verify_speed_factor, overhead,
                              draft_jitter=hw.draft_jitter, verify_jitter=hw.verify_jitter,
                              seed=cfg.acceptance.seed)
    # Keyed as the executor asks: by the drafter a copy is profiled as.
    shapes = {d.profile_as or d.name: d.shape.shape() for d in cfg.drafters if d.shape is not None}
    return RooflineStepTime(GPUS[hw.gpu], hw.target.shape(), cfg.verifier.tp_size, shapes,
                            round_overhead_ns=hw.round_overhead_us * 1e3)


def build_acceptance(cfg: SimDeploymentConfig, base: Path) -> AcceptanceModel:
    a = cfg.acceptance
    curves = AcceptanceCurves.from_file(_resolve(base, a.curves), seed=a.seed) if a.curves else \
        AcceptanceCurves({}, seed=a.seed, default=(a.default,))
    # Copies and stand-ins take the curves of the drafter they are profiled as.
    for name, d in drafter_names(cfg):
        source = d.profile_as or d.name
        if name not in curves.curves and source in curves.curves:
            curves.curves[name] = curves.curves[source]
    return curves


def effective_batch(cfg: SimDeploymentConfig, step_time: StepTimeModel) -> int:
    """Requests a group holds: its batch size, bounded by its KV capacity."""
    v = cfg.verifier
    kv = v.kv_capacity_tokens
    if not kv and isinstance(step_time, RooflineStepTime):
        kv = step_time.kv_capacity_tokens()
    return max(1, min(v.max_batch_size, kv // v.max_seq_len)) if kv else v.max_batch_size


def build_simulation(cfg: SimDeploymentConfig, base: Path = Path("."), *,
                     decode: Callable[[list[int]], str] | None = None) -> Simulator:
    """``decode``: how the router reads prompts — a real tokenizer's, when requests
    carry real prompts (validation); by default synthetic prompts name their domain."""
    names = drafter_names(cfg)
    step_time = build_step_time(cfg, base)
    # The factories take a serving config; they read only these three sections.
    policy_cfg = SimpleNamespace(router=cfg.router, scheduler=cfg.scheduler,
                                 drafters=[SimpleNamespace(name=n, domain=d.domain) for n, d in names])
    router = build_router(policy_cfg, decode or decode_synthetic) if names else None
    pipelined = cfg.scheduler.mode == "pipelined"
    scheduler = (PipelinedScheduler if pipelined else Scheduler)(
        **({"first_window": cfg.scheduler.first_window} if pipelined else {}),
        drafters=[n for n, _ in names], draft_length=build_draft_length(policy_cfg), router=router,
        width=build_width(policy_cfg), default_drafter=cfg.router.default_drafter or (names[0][0] if names else None),
        groups=cfg.verifier.groups, max_batch_size=effective_batch(cfg, step_time),
        max_seq_len=cfg.verifier.max_seq_len)
    net = cfg.network
    executor = SimExecutor(
        [n for n, _ in names], cfg.verifier.groups, step_time, build_acceptance(cfg, base),
        network=NetworkModel(int(net.hop_us * 1e3), net.gbps * 1e9 / 8),
        drafters_parallel=cfg.execution.drafters_parallel,
        drafter_cost_names={n: d.profile_as or d.name for n, d in names})
    return Simulator(scheduler, executor, lockstep=cfg.execution.lockstep,
                     groups_parallel=cfg.execution.groups_parallel, route=bool(names))
