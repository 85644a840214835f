"""The metrics' contract with their readers: docs/metrics.md, the Grafana dashboard and
``specfleet top``, checked against what ``router/metrics.py`` really exports.

Samples come from a real ``Metrics`` registry fed with ``RequestStats`` built round by
round (``observe_round``, as the scheduler does) and rendered by prometheus_client's
own exposition, i.e. exactly the text a scrape returns.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from rich.console import Console

from specfleet.core.load import GroupLoad, LoadSnapshot
from specfleet.core.stats import RequestStats, RoundTiming
from specfleet.engine.backend import FleetSnapshot
from specfleet.router.metrics import Metrics, spec_labels
from specfleet.router.servicer import RequestRecord
from specfleet.router.top import parse, quantile, render

REPO = Path(__file__).resolve().parents[2]
NAME = re.compile(r"specfleet:[a-z0-9_]+")


class _Backend:
    """What Metrics reads of a backend: the engine thread's published load."""

    def __init__(self):
        self.round_observer = None
        self.load_snapshot = LoadSnapshot(waiting=2, groups=(GroupLoad(3, 8),),
                                          drafter_requests={"code": 2, "ngram": 1})
        self.fleet_snapshot = FleetSnapshot({"ngram": 3}, {0: 1},
                                            {"code": {"code": 3.5, "ngram": 1.25}})

    def worker_restarts(self):
        return {"code": 0, "ngram": 2}, {0: 1}


def _record(drafter: str | None, rounds: list[tuple[int, int, int]], domain: str | None,
            api: str = "grpc") -> RequestRecord:
    stats = RequestStats(verifier_group=0, domain=domain, queue_ns=2_000_000)
    for drafted, accepted, emitted in rounds:
        stats.observe_round(drafted, accepted, emitted, drafter)
    emitted = sum(r[2] for r in rounds)
    return RequestRecord(api=api, finish_reason="length", prompt_tokens=5,
                         completion_tokens=emitted, stats=stats, total_ns=90_000_000,
                         first_token_ns=10_000_000, token_gaps=[(8_000_000, 2)] * 3)


@pytest.fixture
def metrics():
    m = Metrics(_Backend())
    m.observe_request(_record("code", [(0, 0, 1), (4, 3, 4), (4, 1, 2)], "code"))
    m.observe_request(_record("ngram", [(0, 0, 1), (2, 2, 3)], None, api="http"))
    m.observe_request(_record(None, [(0, 0, 1)] * 4, None))
    m.observe_round(RoundTiming(wall_ns=5_000_000, draft_compute_ns=1_000_000,
                                verify_compute_ns=3_000_000, group=0))
    return m


def exported_names(metrics: Metrics) -> set[str]:
    """Every sample name a scrape can contain, from the registry's declared families."""
    names = set()
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
                "gauge": ("",)}
    for family in metrics.registry.collect():
        names |= {family.name + s for s in suffixes[family.type]}
    return names


def test_the_counters_are_the_records_sums(metrics):
    page = generate_latest(metrics.registry).decode()
    assert 'specfleet:spec_decode_num_draft_tokens_total{domain="code",drafter="code",verifier_group="0"} 8.0' in page
    assert 'specfleet:spec_decode_num_accepted_tokens_per_pos_total{domain="code",drafter="code",position="2",verifier_group="0"} 1.0' in page
    assert 'specfleet:spec_decode_num_drafts_total{domain="none",drafter="ngram",verifier_group="0"} 1.0' in page
    assert 'specfleet:spec_decode_num_rounds_total{domain="none",drafter="none",verifier_group="0"} 4.0' in page
    assert 'specfleet:inter_token_latency_seconds_count{api="grpc"} 12.0' in page
    assert "specfleet:num_requests_waiting 2.0" in page
    assert 'specfleet:router_score{domain="code",drafter="ngram"} 1.25' in page
    assert 'specfleet:drafter_failures_total{drafter="ngram"} 3.0' in page
    assert 'specfleet:drafter_restarts_total{drafter="ngram"} 2.0' in page
    assert 'specfleet:verifier_restarts_total{verifier_group="0"} 1.0' in page


def test_a_request_of_several_drafters_is_labelled_with_all():
    record = _record("code", [(2, 1, 2)], "code")
    record.stats.observe_round(3, 0, 1, "ngram")
    assert spec_labels(record) == {"drafter": "code+ngram", "domain": "code", "verifier_group": "0"}


def test_every_exported_metric_is_documented(metrics):
    doc = (REPO / "docs" / "metrics.md").read_text()
    for family in metrics.registry.collect():
        assert f"`{family.name}`" in doc, family.name


def test_the_grafana_dashboard_parses_and_uses_only_exported_metrics(metrics):
    dashboard = json.loads((REPO / "configs" / "grafana" / "specfleet.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10 and dashboard["uid"]
    used = {name for expr in exprs for name in NAME.findall(expr)}
    exported = exported_names(metrics)
    assert used and used <= exported, sorted(used - exported)
    # Every speculation counter and latency histogram is on the dashboard.
    for family in metrics.registry.collect():
        if family.type in ("counter", "histogram") and family.name != "specfleet:prompt_tokens":
            assert any(family.name in expr for expr in exprs), family.name


def test_quantile_is_prometheus_histogram_quantile():
    buckets = {0.1: 10.0, 0.2: 30.0, 0.5: 40.0, float("inf"): 40.0}
    assert quantile(0.25, buckets) == pytest.approx(0.1)  # rank 10: the end of the first bucket
    assert quantile(0.5, buckets) == pytest.approx(0.15)  # rank 20: halfway through (0.1, 0.2]
    assert quantile(1.0, buckets) == pytest.approx(0.5)
    assert quantile(0.5, {}) is None


def test_top_renders_a_scraped_page(metrics):
    page = generate_latest(metrics.registry).decode()
    snap = parse(page, at=10.0)
    assert snap.running == 3 and snap.waiting == 2 and snap.kv == {"0": (3, 8)}
    assert snap.drafters["code"].draft_tokens == 8 and snap.drafters["code"].accepted == 4
    assert snap.domains["code"].rounds == 3 and snap.domains["none"].rounds == 6
    assert snap.generated == 7 + 4 + 4
    earlier = parse(page.replace("specfleet:generation_tokens_total{api=\"grpc\"} 11.0",
                                 "specfleet:generation_tokens_total{api=\"grpc\"} 1.0"), at=8.0)
    console = Console(record=True, width=160)
    console.print(render(snap, earlier, server="127.0.0.1:9400"))
    out = console.export_text()
    assert "127.0.0.1:9400" in out and "tokens/s 5.0" in out  # (15 - 5) tokens in 2 s
    def row(label: str) -> list[str]:  # the first table row starting with label
        line = next(ln for ln in out.splitlines() if ln.startswith(f"│ {label} "))
        return [cell.strip() for cell in line.strip("│").split("│")]

    # 4/8 accepted; 7 tokens in 3 rounds; running, failures, restarts
    assert row("code") == ["code", "2", "8", "4", "50%", "2.33", "2", "0", "0"]
    assert row("ngram") == ["ngram", "1", "2", "2", "100%", "2.00", "1", "3", "2"]
    # Every TTFT was 10 ms, in the (5 ms, 10 ms] bucket: interpolated as Prometheus does.
    ttft = next(ln for ln in out.splitlines() if "TTFT" in ln)
    assert [c.strip() for c in ttft.strip("│").split("│")] == ["TTFT", "7.5 ms", "9.5 ms", "10.0 ms"]
