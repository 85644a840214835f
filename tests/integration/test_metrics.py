"""Prometheus export: after N requests, the exported counters are the sums of the
per-request statistics the clients got back.

The ``stack`` fixture (conftest.py) exports metrics on a free loopback port. gRPC
requests check drafted/accepted tokens and drafts per drafter against the SDK's
``SpeculationStats``; HTTP requests, whose ``speculation`` field carries per-position
counts, domain and verifier group, check the per-position counters and those labels.
"""

from __future__ import annotations

import dataclasses
import urllib.request
from collections import Counter, defaultdict

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from specfleet.client import Client

pytestmark = pytest.mark.integration

PROMPTS = ["def fibonacci(n):\n    ", "The quick brown fox", '{"name": "alice", "id": ',
           "import os\nimport sys\n"]
DRAFTERS = ["general", "code", "ngram", "suffix", None]  # None: the router chooses


def STACK_CONFIG(cfg):  # noqa: N802 - read by conftest's stack fixture
    # A fixed window: the adaptive one soon stops drafting on this CPU (drafts cost more
    # than they save with the tiny zoo), which would leave the speculation counters at 0.
    return dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler, adaptive=False))


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def total(samples, name: str, **labels) -> float:
    """Sum of ``name`` over every series whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def delta(after, before, name: str, **labels) -> float:
    return total(after, name, **labels) - total(before, name, **labels)


def test_counters_equal_the_sums_of_the_sdks_per_request_stats(stack):
    url = stack.metrics_url
    before = scrape(url)
    results, later_tokens = [], 0
    with Client(stack.server.address, timeout=60) as sdk:
        for i, prompt in enumerate(PROMPTS * 2):
            drafter = DRAFTERS[i % len(DRAFTERS)]
            chunks = list(sdk.stream(prompt, max_new_tokens=12, drafter=drafter, speculate=i != 7))
            results.append(chunks[-1])  # the last chunk carries usage and stats
            first = next(len(c.token_ids) for c in chunks if c.token_ids)
            later_tokens += sum(len(c.token_ids) for c in chunks) - first
    after = scrape(url)
    spec = "specfleet:spec_decode_"
    assert delta(after, before, spec + "num_draft_tokens_total") == sum(r.stats.drafted for r in results)
    assert delta(after, before, spec + "num_accepted_tokens_total") == sum(r.stats.accepted for r in results)
    drafts = Counter()
    tokens = defaultdict(lambda: [0, 0])
    for r in results:
        drafts.update(r.stats.drafters)
        if r.stats.drafters:
            (name,) = r.stats.drafters  # one drafter per request
            tokens[name][0] += r.stats.drafted
            tokens[name][1] += r.stats.accepted
    assert sum(drafts.values()) > 0, "nothing was speculated: the test would prove nothing"
    for name in ("general", "code", "ngram", "suffix"):
        assert delta(after, before, spec + "num_drafts_total", drafter=name) == drafts[name], name
        assert delta(after, before, spec + "num_draft_tokens_total", drafter=name) == tokens[name][0]
        assert delta(after, before, spec + "num_accepted_tokens_total", drafter=name) == tokens[name][1]
    assert delta(after, before, spec + "num_drafts_total", drafter="none") == 0
    n = len(results)
    assert delta(after, before, "specfleet:requests_total", api="grpc") == n
    assert delta(after, before, "specfleet:generation_tokens_total", api="grpc") == sum(
        r.usage.completion_tokens for r in results)
    for hist in ("e2e_request_latency_seconds", "time_to_first_token_seconds",
                 "request_queue_time_seconds"):
        assert delta(after, before, f"specfleet:{hist}_count", api="grpc") == n, hist
    # Inter-token latencies: one per token after the first output.
    assert delta(after, before, "specfleet:inter_token_latency_seconds_count", api="grpc") == later_tokens
    assert delta(after, before, "specfleet:round_time_seconds_count") > 0
    assert total(after, "specfleet:num_requests_running") == 0
    assert total(after, "specfleet:kv_slots_capacity", verifier_group="0") == stack.cfg.verifier.max_batch_size


def test_per_position_and_domain_counters_equal_the_http_stats(stack):
    url = stack.metrics_url
    before = scrape(url)
    stats = []
    with openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="x", max_retries=0) as client:
        for i, prompt in enumerate(PROMPTS * 2):
            drafter = DRAFTERS[i % len(DRAFTERS)]
            extra = {"speculation": {"drafter": drafter}} if drafter else {}
            got = client.completions.create(model=stack.cfg.models.target, prompt=prompt,
                                            max_tokens=12, temperature=0, extra_body=extra)
            stats.append(got.speculation)
    after = scrape(url)
    spec = "specfleet:spec_decode_"
    width = max(len(s["position_drafted"]) for s in stats)
    assert width > 1
    for pos in range(width):
        drafted = sum(s["position_drafted"][pos] for s in stats if pos < len(s["position_drafted"]))
        accepted = sum(s["position_accepted"][pos] for s in stats if pos < len(s["position_accepted"]))
        assert delta(after, before, spec + "num_draft_tokens_per_pos_total", position=str(pos)) == drafted
        assert delta(after, before, spec + "num_accepted_tokens_per_pos_total", position=str(pos)) == accepted
    assert delta(after, before, spec + "num_accepted_tokens_per_pos_total",
                 position=str(width)) == 0
    domains = Counter(s["domain"] or "none" for s in stats)
    assert set(domains) - {"none"}, "no request was routed: the domain label is untested"
    for domain in domains:
        assert delta(after, before, spec + "num_rounds_total", domain=domain) == sum(
            s["rounds"] for s in stats if (s["domain"] or "none") == domain), domain
    # The router's table: a score for every (domain, drafter), for the domains it routed.
    scores = {dict(ls)["drafter"]: v for (n, ls), v in after.items()
              if n == "specfleet:router_score" and dict(ls)["domain"] == "code"}
    assert set(scores) == {d.name for d in stack.cfg.drafters} and all(v > 0 for v in scores.values())
    assert delta(after, before, spec + "num_emitted_tokens_total", verifier_group="0") == sum(
        s["emitted"] for s in stats)
    assert delta(after, before, "specfleet:requests_total", api="http", finish_reason="length") + \
        delta(after, before, "specfleet:requests_total", api="http", finish_reason="eos") == len(stats)
