"""Step-time models: how long a simulated draft or verify call takes.

Where it sits: the simulator's workers (``workers.py``) ask a ``StepTimeModel`` for
the duration of every call they answer. Three tiers:

- ``FittedStepTime``: least-squares fit of a small linear model to times measured by
  ``specfleet profile`` on this machine (batch size × tokens per request × context).
  The features are the ones the cost of a transformer forward scales with: a fixed
  launch cost, one term per request (per-sequence bookkeeping), one per token
  (weights streamed / FLOPs), one per token × context (attention).
- ``RooflineStepTime``: for GPUs that cannot be profiled here (A100, H100, H200): a
  forward costs max(FLOPs / peak, bytes / HBM bandwidth) plus, with tensor
  parallelism, two all-reduces per layer over NVLink.
- ``ExponentialStepTime``: exponential service times (the M/M/1 sanity check).

A draft call of ``positions`` sequential steps costs one prefill of the new tokens
plus ``positions`` one-token decode steps of the whole batch.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np


class StepTimeModel(Protocol):
    def draft_ns(self, drafter: str, *, batch: int, new_tokens: int, positions: int, context: int) -> int:
        """A drafter's call: ``batch`` requests, ``new_tokens`` committed tokens to
        ingest in total, ``positions`` sequential draft steps, ``context`` summed lengths."""
        ...

    def verify_ns(self, group: int, *, batch: int, tokens: int, context: int) -> int:
        """A verifier group's forward + accept over ``tokens`` new tokens in total
        (committed delta + drafts) of ``batch`` requests with ``context`` summed lengths."""
        ...


def forward_features(batch: int, tokens: int, context: int) -> list[float]:
    """[launch, per request, per token, per token × context (k-tokens)] of one forward."""
    per_request_ctx = context / max(batch, 1)
    return [1.0, float(batch), float(tokens), tokens * per_request_ctx / 1000.0]


def draft_features(batch: int, new_tokens: int, positions: int, context: int) -> list[float]:
    """A draft call: one forward ingesting the delta (forward_features), then one
    per further position over the batch's one new token each."""
    per_request_ctx = context / max(batch, 1)
    return [*forward_features(batch, new_tokens, context), float(positions), float(positions * batch),
            positions * batch * per_request_ctx / 1000.0]


@dataclass(frozen=True)
class LinearCost:
    """ns = coefficients · features(...) (forward_features or draft_features)."""

    coefficients: tuple[float, ...]

    def forward_ns(self, batch: int, tokens: int, context: int) -> float:
        f = forward_features(batch, tokens, context)
        return max(0.0, sum(c * x for c, x in zip(self.coefficients, f)))

    def draft_ns(self, batch: int, new_tokens: int, positions: int, context: int) -> float:
        f = draft_features(batch, new_tokens, positions, context)
        return max(0.0, sum(c * x for c, x in zip(self.coefficients, f)))

    @classmethod
    def fit(cls, samples, features=forward_features) -> LinearCost:
        """Least squares over samples (features' arguments..., ns); negative
        coefficients (noise on a small grid) are refitted without their feature."""
        x = np.array([features(*s[:-1]) for s in samples])
        y = np.array([s[-1] for s in samples])
        keep = list(range(x.shape[1]))
        while True:
            coef, *_ = np.linalg.lstsq(x[:, keep], y, rcond=None)
            if (coef >= 0).all() or len(keep) == 1:
                break
            keep.pop(int(np.argmin(coef)))
        full = [0.0] * x.shape[1]
        for i, c in zip(keep, coef):
            full[i] = max(0.0, float(c))
        return cls(tuple(full))


class FittedStepTime:
    """Step times fitted to a ``specfleet profile`` file (this machine's timings)."""

    def __init__(self, drafters: dict[str, LinearCost], verifier: LinearCost,
                 round_overhead_ns: float = 0.0, default_drafter: str | None = None):
        self.drafters = drafters  # over draft_features
        self.verifier = verifier  # over forward_features
        self.round_overhead_ns = round_overhead_ns  # driver + executor + Python per round
        self.default_drafter = default_drafter

    def draft_ns(self, drafter: str, *, batch: int, new_tokens: int, positions: int, context: int) -> int:
        cost = self.drafters.get(drafter) or self.drafters.get(self.default_drafter or "")
        if cost is None:  # a drafter without a model (n-gram, suffix): negligible cost
            return 0
        return int(cost.draft_ns(batch, new_tokens, positions, context))

    def verify_ns(self, group: int, *, batch: int, tokens: int, context: int) -> int:
        return int(self.verifier.forward_ns(batch, tokens, context))

    @classmethod
    def from_profile(cls, path: str | Path) -> FittedStepTime:
        try:
            data = json.loads(Path(path).read_text())
        except OSError as exc:
            raise ValueError(f"profile {path}: cannot read: {exc.strerror or exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict) -> FittedStepTime:
        drafters = {name: LinearCost.fit(samples, draft_features)
                    for name, samples in data.get("drafters", {}).items()}
        return cls(drafters, LinearCost.fit(data["verifier"]), float(data.get("round_overhead_ns", 0.0)),
                   data.get("default_drafter"))


# ---- roofline ------------------------------------------------------------------------------
@dataclass(frozen=True)
class GPUSpec:
    name: str
    hbm_bytes_per_s: float  # HBM bandwidth
    bf16_flops: float  # dense bf16 tensor-core peak
    nvlink_bytes_per_s: float  # per-GPU NVLink bandwidth (one direction)
    hbm_bytes: float  # memory per GPU (KV capacity)
    efficiency: float = 0.6  # achievable fraction of peak (memory and compute alike)
    launch_ns: float = 20_000  # kernel launches + framework per forward


# Public datasheet figures (SXM parts).
GPUS = {
    "a100": GPUSpec("a100", 2.039e12, 312e12, 300e9, 80e9),
    "h100": GPUSpec("h100", 3.35e12, 989e12, 450e9, 80e9),
    "h200": GPUSpec("h200", 4.8e12, 989e12, 450e9, 141e9),
}


@dataclass(frozen=True)
class ModelShape:
    """What a roofline needs of a model (bf16 weights and KV)."""

    params: float  # parameters
    layers: int
    hidden: int
    kv_heads: int = 8
    head_dim: int = 128

    @property
    def kv_bytes_per_token(self) -> float:
        return 2 * self.layers * self.kv_heads * self.head_dim * 2  # K and V, bf16

    @classmethod
    def from_dict(cls, d: dict) -> ModelShape:
        return cls(**d)


def roofline_forward_ns(gpu: GPUSpec, model: ModelShape, tp: int, *, batch: int, tokens: int,
                        context: int) -> float:
    """One forward over ``tokens`` new tokens with ``context`` tokens of KV read, on ``tp`` GPUs."""
    flops = 2 * model.params * tokens + 4 * model.layers * model.hidden * tokens * (context / max(batch, 1))
    read = 2 * model.params + model.kv_bytes_per_token * context
    compute = flops / (gpu.bf16_flops * gpu.efficiency * tp)
    memory = read / (gpu.hbm_bytes_per_s * gpu.efficiency * tp)
    ns = max(compute, memory) * 1e9 + gpu.launch_ns
    if tp > 1:
        # Two ring all-reduces per layer of the activations: 2 (tp-1)/tp of the bytes
        # each way, plus a per-collective latency.
        msg = tokens * model.hidden * 2
        per = 2 * (tp - 1) / tp * msg / gpu.nvlink_bytes_per_s * 1e9 + 8_000
        ns += 2 * model.layers * per
    return ns


class RooflineStepTime:
    """Step times of GPUs from their datasheet (no profile possible on this machine)."""

    def __init__(self, gpu: GPUSpec, target: ModelShape, tp: int, drafters: dict[str, ModelShape],
                 round_overhead_ns: float = 0.0):
        self.gpu, self.target, self.tp, self.drafter_shapes = gpu, target, tp, drafters
        self.round_overhead_ns = round_overhead_ns

    def draft_ns(self, drafter: str, *, batch: int, new_tokens: int, positions: int, context: int) -> int:
        shape = self.drafter_shapes.get(drafter)
        if shape is None:
            return 0
        ns = roofline_forward_ns(self.gpu, shape, 1, batch=batch, tokens=new_tokens, context=context) \
            if new_tokens else 0.0
        ns += positions * roofline_forward_ns(self.gpu, shape, 1, batch=batch, tokens=batch, context=context)
        return int(ns)

    def verify_ns(self, group: int, *, batch: int, tokens: int, context: int) -> int:
        return int(roofline_forward_ns(self.gpu, self.target, self.tp, batch=batch, tokens=tokens,
                                       context=context))

    def kv_capacity_tokens(self) -> int:
        free = self.gpu.hbm_bytes * self.tp * 0.9 - 2 * self.target.params
        return max(0, int(free / self.target.kv_bytes_per_token))


class ExponentialStepTime:
    """Exponential verify times of the given mean, no draft cost (M/M/1 checks)."""

    def __init__(self, mean_ns: float, seed: int = 0):
        self.mean_ns = mean_ns
        self._rng = random.Random(seed)
        self.round_overhead_ns = 0.0

    def draft_ns(self, drafter: str, *, batch: int, new_tokens: int, positions: int, context: int) -> int:
        return 0

    def verify_ns(self, group: int, *, batch: int, tokens: int, context: int) -> int:
        return max(1, int(-self.mean_ns * math.log(1.0 - self._rng.random())))


class ScaledStepTime:
    """Another model's times × a factor per kind: a profile re-calibrated to the
    machine's speed of the moment (a shared machine drifts by tens of percent)."""

    def __init__(self, inner: StepTimeModel, draft_factor: float = 1.0, verify_factor: float = 1.0,
                 round_overhead_ns: float | None = None, *, draft_jitter: float = 0.0,
                 verify_jitter: float = 0.0, seed: int = 0):
        """``*_jitter``: σ of a mean-one lognormal factor drawn per call (seeded) — the
        call-to-call spread of real timings. It matters beyond the mean: the adaptive
        window policy thresholds an EMA of measured draft/verify ratios, so noisy
        timings switch speculation off where smooth ones would not."""
        self.inner, self.draft_factor, self.verify_factor = inner, draft_factor, verify_factor
        self.round_overhead_ns = (getattr(inner, "round_overhead_ns", 0.0) if round_overhead_ns is None
                                  else round_overhead_ns)
        self.draft_jitter, self.verify_jitter = draft_jitter, verify_jitter
        self._rng = random.Random(seed)

    def _noise(self, sigma: float) -> float:
        return self._rng.lognormvariate(-sigma * sigma / 2, sigma) if sigma > 0 else 1.0

    def draft_ns(self, drafter: str, *, batch: int, new_tokens: int, positions: int, context: int) -> int:
        ns = self.inner.draft_ns(drafter, batch=batch, new_tokens=new_tokens, positions=positions,
                                 context=context)
        return int(self.draft_factor * ns * self._noise(self.draft_jitter)) if ns else 0

    def verify_ns(self, group: int, *, batch: int, tokens: int, context: int) -> int:
        ns = self.inner.verify_ns(group, batch=batch, tokens=tokens, context=context)
        return int(self.verify_factor * ns * self._noise(self.verify_jitter))


def dump_profile(profile: dict, path: str | Path) -> None:
    Path(path).write_text(json.dumps(profile, indent=1))


__all__ = ["FittedStepTime", "RooflineStepTime", "ExponentialStepTime", "ScaledStepTime", "GPUS", "GPUSpec",
           "ModelShape", "LinearCost", "StepTimeModel", "dump_profile"]
