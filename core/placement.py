"""Will this deployment's actors fit the cluster? Checked before anything is placed.

Where it sits: at the start of ``RayRuntime`` (before the first placement group or
actor is created, against the live nodes), in ``specfleet serve`` before it starts an
embedded Ray, and in ``specfleet config validate --cluster`` (offline, for the
embedded cluster a config describes). Without it, a deployment that asks for more
than the cluster has makes Ray wait forever for resources, silently: three actors at
one CPU each on a two-CPU embedded cluster hang ``specfleet serve``. The check packs
every actor's demand onto the cluster's nodes first-fit-decreasing (verifier groups
as one STRICT_PACK unit on one node, as they are placed) and fails with a message
naming the actors, what they ask and what the cluster has.

First-fit is a heuristic: it may call a packable deployment unpackable only in
contrived cases with several nodes; on one node (the embedded cluster) it is exact.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from specfleet.core.config import ResourcesConfig, SpecFleetConfig

_EPS = 1e-9


class PlacementError(RuntimeError):
    """The deployment's actors cannot all be placed on the cluster."""


@dataclass(frozen=True)
class Demand:
    """One unit that must land on one node: a verifier group (all its ranks) or a drafter."""

    name: str
    resources: dict[str, float]


def _amounts(res: ResourcesConfig, times: int = 1) -> dict[str, float]:
    out = {"CPU": res.num_cpus, "GPU": res.num_gpus, **res.custom}
    return {k: float(v) * times for k, v in out.items() if v > 0}


def deployment_demands(cfg: SpecFleetConfig) -> list[Demand]:
    v = cfg.verifier
    demands = [Demand(f"verifier-{g} ({v.tp_size} rank{'s' if v.tp_size > 1 else ''})",
                      _amounts(v.resources, v.tp_size)) for g in range(v.count)]
    demands += [Demand(f"drafter {d.name!r}", _amounts(d.resources)) for d in cfg.drafters]
    return demands


def embedded_cluster_nodes(cfg: SpecFleetConfig) -> list[dict[str, float]]:
    """The one node an embedded (``cluster.address: local``) Ray would have."""
    import os

    c = cfg.cluster
    cpus = c.num_cpus if c.num_cpus is not None else os.cpu_count()  # Ray's own default
    node = {"CPU": float(cpus or 0), "GPU": float(c.num_gpus or 0), **c.resources}
    return [{k: float(v) for k, v in node.items()}]


def _fmt(resources: Mapping[str, float]) -> str:
    shown = {k: v for k, v in resources.items() if v and not k.startswith(("memory", "object_store"))}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(shown.items())) + "}" if shown else "{}"


def check_fits(demands: Sequence[Demand], nodes: Sequence[Mapping[str, float]]) -> None:
    """Raise ``PlacementError`` unless every demand can be packed onto ``nodes``."""
    free = [dict(n) for n in nodes]
    unplaced: list[Demand] = []
    order = sorted(demands, key=lambda d: -sum(d.resources.values()))
    for demand in order:
        for node in free:
            if all(node.get(k, 0.0) + _EPS >= v for k, v in demand.resources.items()):
                for k, v in demand.resources.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            unplaced.append(demand)
    if not unplaced:
        return
    total: dict[str, float] = {}
    for d in demands:
        for k, v in d.resources.items():
            total[k] = total.get(k, 0.0) + v
    asks = "; ".join(f"{d.name} asks {_fmt(d.resources)}" for d in demands)
    has = ", ".join(_fmt(n) for n in nodes) or "no alive nodes"
    cpu_total = total.get("CPU", 0.0)
    cpu_have = sum(n.get("CPU", 0.0) for n in nodes)
    hint = ""
    if cpu_total > cpu_have + _EPS and cpu_have > 0:
        share = cpu_have / max(len(demands), 1)
        hint = (f" Ask for fractional CPUs (e.g. resources.num_cpus: {share:.2g} on each actor; "
                "torch_threads stays as set) or give the cluster more (cluster.num_cpus for the embedded one).")
    raise PlacementError(
        f"the deployment does not fit the cluster: {', '.join(d.name for d in unplaced)} cannot be "
        f"placed. {asks} (total {_fmt(total)}); the cluster has {has}.{hint}"
    )
