"""One place where a config becomes policies, for every composition root.

Where it sits: ``engine/builder.py`` (in-process engine and actors), the Ray runtime
(``cluster/runtime.py``) and benchmarks call ``build_policies`` with a
``SpecFleetConfig``; before this the router and the window policy were built
separately in each of them, with their constants in code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from specfleet.core.config import SpecFleetConfig
from specfleet.policy.domains import classify_domain
from specfleet.policy.draft_length import (
    AdaptiveDraftLength,
    DraftLengthPolicy,
    FixedDraftLength,
    PearlDraftLength,
)
from specfleet.policy.goodput import GoodputDraftLength
from specfleet.policy.learned_routing import LearnedRouter
from specfleet.policy.routing import (
    DrafterProfile,
    ExpertiseRouter,
    RandomRouter,
    Router,
    RouterPriors,
)
from specfleet.policy.speculation_width import SpeculationWidth


@dataclass
class Policies:
    router: Router | None  # None: router.policy is ``fixed``
    default_drafter: str  # serves requests without a preference when there is no router
    draft_length: DraftLengthPolicy
    width: SpeculationWidth  # cooperating drafters and tree nodes per round, from load


def build_draft_length(cfg: SpecFleetConfig) -> DraftLengthPolicy:
    sched = cfg.scheduler
    if not sched.adaptive:
        return FixedDraftLength(sched.draft_length)
    if sched.window_policy == "pearl":
        return PearlDraftLength(max_length=sched.max_draft_length, cost_ratio=sched.cost_ratio_prior,
                                timing_smoothing=sched.timing_smoothing)
    if sched.window_policy == "goodput":
        return GoodputDraftLength(
            max_length=sched.max_draft_length,
            initial_alpha=sched.initial_alpha,
            smoothing=sched.alpha_smoothing,
            timing_smoothing=sched.timing_smoothing,
            switch_margin=sched.switch_margin,
            probe_every=sched.probe_every,
        )
    return AdaptiveDraftLength(
        max_length=sched.max_draft_length,
        initial_alpha=sched.initial_alpha,
        smoothing=sched.alpha_smoothing,
        cost_ratio=sched.cost_ratio_prior,
        probe_every=sched.probe_every,
        timing_smoothing=sched.timing_smoothing,
    )


def build_router(cfg: SpecFleetConfig, decode: Callable[[list[int]], str] | None,
                 classify: Callable[[str], str] | None = None) -> Router | None:
    """The router ``cfg.router`` describes; None for policy ``fixed`` (default drafter).
    ``classify`` (text → domain) replaces the textual cues of the learned router."""
    rc = cfg.router
    profiles = [DrafterProfile(d.name, d.domain) for d in cfg.drafters]
    priors = RouterPriors(rc.prior_specialist, rc.prior_general, rc.prior_other)
    if rc.policy == "learned":
        return LearnedRouter(
            profiles, decode=decode, classify=classify or classify_domain, ucb_c=rc.ucb_c, smoothing=rc.smoothing, load_weight=rc.load_weight,
            reroute_margin=rc.reroute_margin, min_rounds=rc.reroute_min_rounds,
            cooperate_ratio=rc.cooperate_ratio, priors=priors,
        )
    if rc.policy in ("expertise", "random"):
        cls = ExpertiseRouter if rc.policy == "expertise" else RandomRouter
        return cls(profiles, exploration=rc.exploration, decode=decode, seed=rc.seed,
                   smoothing=rc.smoothing, priors=priors)
    return None


def build_width(cfg: SpecFleetConfig) -> SpeculationWidth:
    """Cooperation only under the learned router (the others route one drafter per request)."""
    rc = cfg.router
    return SpeculationWidth(max_width=rc.max_cooperating if rc.policy == "learned" else 1,
                            batch_node_budget=rc.batch_node_budget)


def default_drafter(cfg: SpecFleetConfig) -> str:
    """The drafter serving requests without a preference when nothing routes them."""
    return cfg.router.default_drafter or cfg.drafters[0].name


def build_policies(cfg: SpecFleetConfig, decode: Callable[[list[int]], str] | None,
                   classify: Callable[[str], str] | None = None) -> Policies:
    return Policies(
        router=build_router(cfg, decode, classify),
        default_drafter=default_drafter(cfg),
        draft_length=build_draft_length(cfg),
        width=build_width(cfg),
    )
