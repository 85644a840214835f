"""``specfleet bench fleet`` end to end on the tiny zoo: every arm's figures and the
issue's ratio keys land in the JSON (a contract: benchmark keys are what dashboards and
docs read). Tiny models and a handful of tokens: this checks the plumbing and the
exactness checks inside the benchmark, not the speed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_bench_fleet_writes_every_arm_and_ratio(tiny_zoo, tmp_path):
    out = tmp_path / "fleet.json"
    arms = "single:general,single:ngram,expertise,learned,learned+fusion,oracle"
    proc = subprocess.run(
        [sys.executable, "-m", "specfleet.core.cli", "--log-level", "warning", "bench", "fleet",
         "--zoo", "tiny", "--runs", "1", "--prompts", "1", "--max-new-tokens", "8", "--loads", "50",
         "--arms", arms, "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert set(report["arms"]) == set(arms.split(","))
    for arm, figures in report["arms"].items():
        for key in ("tokens_per_s", "p50_latency_s", "p90_latency_s", "accepted_per_verify"):
            assert figures[key] > 0, (arm, key)
            assert figures["poisson_50"][key] > 0, (arm, key)
    for key in ("speedup_vs_best_single", "p50_ratio_vs_best_single", "fraction_of_oracle",
                "fusion_gain_accepted_per_verify"):
        assert report[key] > 0, key
    assert "newcomer_requests_to_fair_share" in report
    assert "learned+fusion vs best single" in proc.stdout


def test_bench_fleet_rejects_an_unknown_arm():
    proc = subprocess.run([sys.executable, "-m", "specfleet.core.cli", "bench", "fleet", "--arms", "nope"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 2 and "unknown arm 'nope'" in proc.stderr
