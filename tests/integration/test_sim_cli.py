"""``specfleet profile`` → ``simulate`` → ``plan`` end to end, as a user runs them.

The profile is the tiny one (2 batches × 2 contexts × 2 windows on the tiny zoo, one
held-out prompt per domain for acceptance); the simulated deployment is built on the
profile it wrote, so the whole chain — real timings, fitted models, the simulator,
the report, the plots — runs here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "specfleet.core.cli", "--log-level", "warning"]


def cli(*args, timeout=300):
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def profile(tiny_zoo, tmp_path_factory):
    path = tmp_path_factory.mktemp("prof") / "profile.json"
    out = cli("profile", "--config", "configs/tiny.yaml", "--out", str(path), "--grid", "tiny",
              "--acceptance", "--prompts", "1", "--window", "3")
    assert out.returncode == 0, out.stderr[-3000:]
    return path


def test_profile_file_holds_timings_and_curves(profile):
    data = json.loads(profile.read_text())
    assert len(data["verifier"]) >= 16 and {"general", "code"} <= set(data["drafters"])
    assert all(ns > 0 for *_, ns in data["verifier"])
    curves = data["acceptance"]["curves"]
    assert set(curves) == {"general", "code", "ngram", "suffix"}
    assert all(0 <= p <= 1 for by in curves.values() for c in by.values() for p in c)


def test_simulate_and_plan_on_the_measured_profile(profile, tmp_path):
    deployment = tmp_path / "d.yaml"
    body = (f"hardware: {{kind: profile, profile: {profile}}}\n"
            "drafters: [{name: general}, {name: code, domain: code}]\n"
            "verifier: {max_batch_size: 4, max_seq_len: 256, cost_per_hour: 1.0}\n"
            f"acceptance: {{curves: {profile}}}\n"
            "execution: {groups_parallel: false, drafters_parallel: false}\n")
    deployment.write_text("name: one\n" + body)
    report = tmp_path / "r.json"
    out = cli("simulate", "--config", str(deployment), "--workload", "gamma:5:2", "--duration", "20",
              "--prompt-tokens", "32", "--max-new-tokens", "24", "--json", str(report),
              "--plots", str(tmp_path / "plots"), "--no-progress")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "throughput" in out.stdout and "TTFT" in out.stdout
    r = json.loads(report.read_text())
    assert r["requests"] > 50 and r["rejected"] == 0 and r["mean_acceptance_length"] > 1
    assert (tmp_path / "plots" / "latency_cdf.png").stat().st_size > 1000
    candidates = tmp_path / "c.yaml"
    indented = "".join("    " + line + "\n" for line in body.splitlines())
    candidates.write_text("candidates:\n" + "".join(
        f"  - name: {name}\n" + indented.replace("cost_per_hour: 1.0", f"cost_per_hour: {cost}")
        for name, cost in (("pricey", 5.0), ("small", 1.0))))
    out = cli("plan", "--slo", "p90_latency<=30s", "--workload", "poisson:2", "--duration", "10",
              "--prompt-tokens", "32", "--max-new-tokens", "16", "--candidates", str(candidates))
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]
    assert "cheapest meeting p90_latency<=30s: small" in out.stdout
    out = cli("plan", "--slo", "p90_latency<=1ms", "--workload", "poisson:2", "--duration", "10",
              "--candidates", str(candidates))
    assert out.returncode == 1 and "no candidate meets" in out.stdout


@pytest.mark.parametrize("args,message", [
    (("simulate", "--config", "configs/sim/h200-64x8.yaml", "--workload", "zipf:3"), "unknown kind"),
    (("simulate", "--config", "nope.yaml", "--workload", "poisson:1"), "cannot read"),
    (("plan", "--slo", "p90_speed<=2s", "--workload", "poisson:1", "--candidates",
      "configs/sim/plan-candidates.yaml"), "SLO"),
])
def test_bad_input_is_a_one_line_error(args, message):
    out = cli(*args, timeout=120)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr
