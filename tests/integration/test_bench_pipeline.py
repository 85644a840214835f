"""``specfleet bench pipeline`` plumbing on the tiny zoo over Ray: the JSON contract's
keys, every arm's output equal to autoregressive decoding, and the bound's arithmetic."""

import json
import subprocess
import sys

import pytest

from specfleet.benchmarks.pipeline_bench import _fraction_of_bound

pytestmark = pytest.mark.integration


def test_fraction_of_the_pipelined_bound_uses_warm_rounds():
    timing = {"warm_rounds": 4, "ahead_tokens": 4, "draft_ms_per_token_overlapped": 20.0,
              "verify_ms_overlapped": 100.0, "comm_ms": 0.0, "tokens_per_warm_round": 3.0}
    # Bound: 3 tokens per max(4 x 20, 100) ms = 30 tok/s.
    assert _fraction_of_bound([{"tokens_per_s": 24.0, "timing": timing}]) == pytest.approx(0.8)
    assert _fraction_of_bound([{"tokens_per_s": 24.0, "timing": {**timing, "warm_rounds": 0}}]) is None


def test_bench_pipeline_cli_writes_the_contract_keys(tiny_zoo, tmp_path):
    out = tmp_path / "pipeline.json"
    cmd = [sys.executable, "-m", "specfleet.core.cli", "--log-level", "warning", "bench", "pipeline",
           "--zoo", "tiny", "--runs", "1", "--prompts", "1", "--max-new-tokens", "8", "--windows", "2",
           "--batch-size", "2", "--json", str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["outputs_identical"] is True and report["mismatched_arms"] == []
    for pair in ("pearl", "cheap"):
        for arm in ("autoregressive", "vanilla", "pipelined"):
            assert report["pairs"][pair][arm]["tokens_per_s"] > 0
            assert report["pairs"][pair][arm]["mean_acceptance_length"] >= 0
    for key in ("pipelined_vs_vanilla_batch1", "cheap_pair_pipelined_vs_vanilla", "pipelined_vs_lockstep_batch2"):
        assert report[key] > 0, key
    for key in ("fraction_of_pipelined_bound", "cohorts_vs_lockstep_batch8", "outcome_cache_hit_rate"):
        assert key in report
