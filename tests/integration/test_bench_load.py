"""``specfleet bench load`` plumbing on the tiny zoo: JSON contract keys and the plot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from specfleet.benchmarks.load_bench import summary
from specfleet.zoo.presets import zoo_dir


def test_summary_ratios_from_scripted_cells():
    def cell(g):
        return {"goodput_tok_s": g}

    loads = [{"arms": {"ar": cell(10), "fixed-1": cell(12), "controller": cell(13)}},
             {"arms": {"ar": cell(10), "fixed-1": cell(8), "controller": cell(11.7)}}]
    s = summary(loads, (1,))
    assert s["min_ratio_vs_best_baseline"] == pytest.approx(13 / 12)
    assert s["max_gain_vs_best_fixed"] == pytest.approx(11.7 / 8)
    assert s["worst_vs_ar"] == pytest.approx(1.17)
    assert s["max_adjacent_drop"] == pytest.approx(0.1)


@pytest.mark.skipif(not (Path(zoo_dir("tiny")) / "manifest.json").exists(), reason="tiny zoo not built")
def test_bench_load_cli_writes_contract_json_and_png(tmp_path):
    out, png = tmp_path / "load.json", tmp_path / "load.png"
    cmd = [sys.executable, "-m", "specfleet.core.cli", "--log-level", "warning", "bench", "load", "--zoo", "tiny", "--target", "target",
           "--repeats", "1", "--requests", "3", "--max-new-tokens", "4", "--fractions", "0.5,1.2",
           "--windows", "2", "--json", str(out), "--plot", str(png)]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    report = json.loads(out.read_text())
    assert len(report["loads"]) == 2 and png.stat().st_size > 0
    for ld in report["loads"]:
        assert ld["offered_qps"] > 0 and set(ld["arms"]) == {"ar", "fixed-2", "controller"}
        for arm in ld["arms"].values():
            assert all(arm[k] > 0 for k in ("goodput_tok_s", "p50_s", "p90_s", "ttft_p50_s"))
    for key in ("min_ratio_vs_best_baseline", "max_gain_vs_best_fixed", "worst_vs_ar", "max_adjacent_drop"):
        assert isinstance(report[key], float)
