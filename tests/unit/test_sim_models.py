"""The simulator's parts: queueing theory, workloads, acceptance, step times, deployments."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest

from specfleet.core.typed_yaml import ConfigError
from specfleet.sim.acceptance import AcceptanceCurves
from specfleet.sim.deployment import build_simulation, cost_per_hour, load_deployment
from specfleet.sim.metrics import summarize
from specfleet.sim.mm1 import run_mm1
from specfleet.sim.step_time import GPUS, LinearCost, ModelShape, roofline_forward_ns
from specfleet.sim.workload import WorkloadShape, parse_workload, write_trace

REPO = Path(__file__).resolve().parents[2]


# ---- M/M/1 ---------------------------------------------------------------------------------
@pytest.mark.parametrize("rho,n", [(0.3, 20_000), (0.5, 30_000), (0.8, 100_000)])
def test_mm1_mean_time_in_system_matches_theory(rho, n):
    result = run_mm1(rho, n, seed=0)
    assert result.error < 0.05, (rho, result)


# ---- workloads ------------------------------------------------------------------------------
def test_poisson_and_gamma_rates_and_burstiness():
    for spec, cv in (("poisson:50", 1.0), ("gamma:50:3", 3.0)):
        reqs = parse_workload(spec, count=20_000, seed=1)
        gaps = [(b.arrival_ns - a.arrival_ns) / 1e9 for a, b in zip(reqs, reqs[1:])]
        mean = statistics.fmean(gaps)
        assert mean == pytest.approx(1 / 50, rel=0.05)
        assert statistics.pstdev(gaps) / mean == pytest.approx(cv, rel=0.1)
    assert {r.domain for r in reqs} == {"code", "prose", "data"}


def test_duration_bounds_a_workload_and_traces_round_trip(tmp_path):
    reqs = parse_workload("poisson:20", duration_s=10, seed=2, shape=WorkloadShape(8, 9))
    assert 150 < len(reqs) < 250 and reqs[-1].arrival_ns <= 10e9
    write_trace(reqs, tmp_path / "t.jsonl")
    again = parse_workload(f"trace:{tmp_path / 't.jsonl'}")
    assert [(r.arrival_ns // 1000, r.prompt_tokens, r.max_new_tokens, r.domain) for r in again] == \
        [(r.arrival_ns // 1000, 8, 9, r.domain) for r in reqs]


@pytest.mark.parametrize("spec", ["poisson:-1", "gamma:3", "uniform:4", "poisson:x"])
def test_bad_workload_specs_are_clear_errors(spec):
    with pytest.raises(ValueError, match="workload"):
        parse_workload(spec, count=3)


def test_bad_trace_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"arrival_s": 0.1}\n{"prompt_tokens": 3}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        parse_workload(f"trace:{path}")


# ---- acceptance -----------------------------------------------------------------------------
def test_curves_are_recovered_from_the_rounds_they_generate():
    truth = AcceptanceCurves({"d": {"code": [0.9, 0.8, 0.5, 0.3]}}, seed=3)
    rounds = []
    for i in range(20_000):
        window = 2 + i % 3
        rounds.append(("d", "code", window, truth.accepted(f"r{i}", drafter="d", domain="code",
                                                           round_index=0, window=window)))
    fitted = AcceptanceCurves.from_rounds(rounds)
    assert fitted.curve("d", "code") == pytest.approx([0.9, 0.8, 0.5, 0.3], abs=0.03)
    mean = statistics.fmean(a + 1 for _, _, w, a in rounds if w == 4)
    assert mean == pytest.approx(truth.mean_acceptance_length("d", "code", 4), rel=0.03)


def test_acceptance_draws_depend_on_the_request_not_on_its_neighbours():
    a = AcceptanceCurves({"d": {"prose": [0.7]}}, seed=1)
    b = AcceptanceCurves({"d": {"prose": [0.7]}}, seed=1)
    first = [a.accepted("x", drafter="d", domain="prose", round_index=k, window=5) for k in range(50)]
    for k in range(50):  # interleave another request on b
        b.accepted("y", drafter="d", domain="prose", round_index=k, window=5)
    assert [b.accepted("x", drafter="d", domain="prose", round_index=k, window=5) for k in range(50)] == first


# ---- step times -----------------------------------------------------------------------------
def test_linear_fit_recovers_a_known_cost():
    true = LinearCost((50_000.0, 2_000.0, 700.0, 30.0))
    samples = [(b, b * t, b * c, true.forward_ns(b, b * t, b * c))
               for b in (1, 2, 4, 8) for t in (1, 4, 8) for c in (32, 256)]
    fit = LinearCost.fit(samples)
    assert fit.coefficients == pytest.approx(true.coefficients, rel=1e-6)


def test_roofline_orders_gpus_and_splits_work_over_tensor_parallel_ranks():
    model = ModelShape(7e10, 80, 8192)
    decode = {g: roofline_forward_ns(GPUS[g], model, 4, batch=8, tokens=8, context=8 * 2048)
              for g in ("a100", "h100", "h200")}
    assert decode["a100"] > decode["h100"] > decode["h200"]  # memory-bound: bandwidth decides
    tp1 = roofline_forward_ns(GPUS["h200"], model, 1, batch=8, tokens=8, context=8 * 2048)
    tp4 = roofline_forward_ns(GPUS["h200"], model, 4, batch=8, tokens=8, context=8 * 2048)
    assert tp1 / 4 < tp4 < tp1  # faster, but all-reduces cost something
    # 70B bf16 weights streamed once per decode step at H200 bandwidth (60 % of peak) over 4 GPUs.
    assert tp4 > 2 * 7e10 / (4.8e12 * 0.6 * 4) * 1e9


# ---- deployments ----------------------------------------------------------------------------
def test_the_large_h200_deployment_simulates_with_every_part_reported():
    cfg, base = load_deployment(REPO / "configs" / "sim" / "h200-64x8.yaml")
    sim = build_simulation(cfg, base)
    assert len(sim.scheduler.drafters) == 64 and len(sim.executor.verifiers) == 8
    reqs = parse_workload("poisson:20", count=300, seed=0, shape=WorkloadShape(256, 64))
    report = summarize(sim.run(reqs), cost_per_hour=cost_per_hour(cfg))
    assert report["requests"] == 300 and report["rejected"] == 0
    assert 1.0 < report["mean_acceptance_length"] < 8
    assert 0 < report["ttft"]["p50"] <= report["latency"]["p50"] <= report["latency"]["p90"]
    assert set(report["utilisation"]) >= {"group0", "group7", "general-0", "data-15"}
    assert all(0 <= u <= 1 for u in report["utilisation"].values())
    assert report["cost_per_hour"] == pytest.approx(64 * 3.5 + 8 * 14.0)
    assert report["cost_per_million_tokens"] > 0


def test_kv_capacity_bounds_the_batch(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("hardware: {kind: roofline, gpu: a100}\n"
                    "verifier: {max_batch_size: 64, max_seq_len: 1000, kv_capacity_tokens: 5000}\n")
    cfg, base = load_deployment(path)
    assert build_simulation(cfg, base).scheduler.max_batch_size == 5


def test_deployment_errors_name_the_key(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text("hardware: {kind: profile}\n")
    with pytest.raises(ConfigError, match="hardware.profile"):
        load_deployment(path)
    path.write_text("verifier: {groups: 0}\n")
    with pytest.raises(ConfigError, match="verifier.groups"):
        load_deployment(path)
    path.write_text(json.dumps({"drafters": [{"name": "a", "colour": 1}]}))
    with pytest.raises(ConfigError, match=r"drafters\[0\].colour"):
        load_deployment(path)
