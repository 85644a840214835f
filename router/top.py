"""``specfleet top --server HOST:PORT``: a live terminal view of a fleet, from /metrics.

Where it sits: outside the request path — an operator's tool. It scrapes a frontend's
Prometheus endpoint (``router/metrics.py``, names in docs/metrics.md) every
``--interval`` seconds, folds the samples into a ``Snapshot`` and renders it with rich:
requests running and waiting, tokens/s (from two scrapes), latency quantiles, KV slots
per verifier group, and acceptance per drafter and per domain. It needs nothing but
the metrics endpoint, so it works against any deployment, Ray or in-process.
"""

from __future__ import annotations

import math
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Group
from rich.table import Table
from rich.text import Text

P = "specfleet:"
SPEC = P + "spec_decode_"


@dataclass
class Spec:
    """Speculation counters of one slice of traffic (a drafter or a domain)."""

    drafts: float = 0.0
    draft_tokens: float = 0.0
    accepted: float = 0.0
    emitted: float = 0.0
    rounds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        return self.emitted / self.rounds if self.rounds else 0.0


_SPEC_FIELDS = {"num_drafts_total": "drafts", "num_draft_tokens_total": "draft_tokens",
                "num_accepted_tokens_total": "accepted", "num_emitted_tokens_total": "emitted",
                "num_rounds_total": "rounds"}
_LATENCIES = {"time_to_first_token_seconds": "TTFT", "inter_token_latency_seconds": "ITL",
              "e2e_request_latency_seconds": "end to end",
              "request_queue_time_seconds": "queue"}


@dataclass
class Snapshot:
    """One scrape, folded into what the view shows (counters are totals since start)."""

    at: float  # when it was scraped (monotonic seconds)
    running: float = 0.0
    waiting: float = 0.0
    generated: float = 0.0  # tokens generated since start
    requests: dict[str, float] = field(default_factory=dict)  # finish reason -> count
    drafters: dict[str, Spec] = field(default_factory=lambda: defaultdict(Spec))
    domains: dict[str, Spec] = field(default_factory=lambda: defaultdict(Spec))
    drafter_running: dict[str, float] = field(default_factory=dict)
    drafter_failures: dict[str, float] = field(default_factory=dict)
    drafter_restarts: dict[str, float] = field(default_factory=dict)
    kv: dict[str, tuple[float, float]] = field(default_factory=dict)  # group -> (in use, capacity)
    # histogram name -> cumulative buckets [(upper bound, count)], summed over labels
    buckets: dict[str, dict[float, float]] = field(default_factory=lambda: defaultdict(dict))


def parse(text: str, at: float = 0.0) -> Snapshot:
    """A Snapshot of one /metrics page."""
    snap = Snapshot(at=at)
    kv_use: dict[str, float] = {}
    kv_cap: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            name, labels, value = s.name, s.labels, s.value
            if name.startswith(SPEC) and name[len(SPEC):] in _SPEC_FIELDS:
                attr = _SPEC_FIELDS[name[len(SPEC):]]
                for table, key in ((snap.drafters, labels.get("drafter")),
                                   (snap.domains, labels.get("domain"))):
                    spec = table[key or "none"]
                    setattr(spec, attr, getattr(spec, attr) + value)
            elif name == P + "num_requests_running":
                snap.running = value
            elif name == P + "num_requests_waiting":
                snap.waiting = value
            elif name == P + "generation_tokens_total":
                snap.generated += value
            elif name == P + "requests_total":
                reason = labels.get("finish_reason", "?")
                snap.requests[reason] = snap.requests.get(reason, 0.0) + value
            elif name == P + "drafter_requests_running":
                snap.drafter_running[labels["drafter"]] = value
            elif name == P + "drafter_failures_total":
                snap.drafter_failures[labels["drafter"]] = value
            elif name == P + "drafter_restarts_total":
                snap.drafter_restarts[labels["drafter"]] = value
            elif name == P + "kv_slots_in_use":
                kv_use[labels["verifier_group"]] = value
            elif name == P + "kv_slots_capacity":
                kv_cap[labels["verifier_group"]] = value
            elif name.endswith("_bucket") and name[len(P):-len("_bucket")] in _LATENCIES:
                hist = snap.buckets[name[len(P):-len("_bucket")]]
                le = float(labels["le"])
                hist[le] = hist.get(le, 0.0) + value
    snap.kv = {g: (kv_use.get(g, 0.0), kv_cap.get(g, 0.0)) for g in sorted(kv_cap, key=str)}
    return snap


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """Prometheus' histogram_quantile over cumulative buckets (linear within a bucket)."""
    if not buckets:
        return None
    bounds = sorted(buckets)
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank, prev_bound, prev_count = q * total, 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return prev_bound
            width = count - prev_count
            return prev_bound + (bound - prev_bound) * ((rank - prev_count) / width if width else 0)
        prev_bound, prev_count = bound, count
    return prev_bound


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.1f} ms"


def render(snap: Snapshot, previous: Snapshot | None = None, *, server: str = "") -> Group:
    """The view of one scrape; with the previous scrape, rates too."""
    rate = "-"
    if previous is not None and snap.at > previous.at:
        rate = f"{(snap.generated - previous.generated) / (snap.at - previous.at):.1f}"
    finished = ", ".join(f"{k} {v:.0f}" for k, v in sorted(snap.requests.items())) or "none"
    head = Text.assemble(
        ("SpecFleet ", "bold"), (server, "cyan"), "   running ", (f"{snap.running:.0f}", "bold"),
        "   waiting ", (f"{snap.waiting:.0f}", "bold"), "   tokens/s ", (rate, "bold"),
        f"   finished: {finished}",
    )
    latency = Table(title="latency", expand=False)
    for col in ("", "p50", "p90", "p99"):
        latency.add_column(col, justify="right")
    for key, label in _LATENCIES.items():
        hist = snap.buckets.get(key, {})
        latency.add_row(label, *(_ms(quantile(q, hist)) for q in (0.5, 0.9, 0.99)))
    kv = Table(title="verifier groups", expand=False)
    for col in ("group", "KV slots in use"):
        kv.add_column(col, justify="right")
    for group, (used, cap) in snap.kv.items():
        kv.add_row(group, f"{used:.0f} / {cap:.0f}")

    def spec_table(title: str, rows: dict[str, Spec], health: bool) -> Table:
        table = Table(title=title, expand=False)
        cols = [title, "drafts", "drafted", "accepted", "accept rate", "mean acc. len"]
        if health:  # drafter health: what it serves now, and how often it failed
            cols += ["running", "failures", "restarts"]
        for i, col in enumerate(cols):
            table.add_column(col, justify="left" if i == 0 else "right")
        names = set(rows)
        if health:
            names |= set(snap.drafter_running) | set(snap.drafter_failures)
        for name in sorted(names):
            s = rows.get(name, Spec())
            row = [name, f"{s.drafts:.0f}", f"{s.draft_tokens:.0f}", f"{s.accepted:.0f}",
                   f"{s.acceptance_rate:.0%}", f"{s.mean_acceptance_length:.2f}"]
            if health:
                row += [f"{snap.drafter_running.get(name, 0):.0f}",
                        f"{snap.drafter_failures.get(name, 0):.0f}",
                        f"{snap.drafter_restarts[name]:.0f}" if name in snap.drafter_restarts else "-"]
            table.add_row(*row)
        return table

    return Group(head, latency, kv, spec_table("drafter", snap.drafters, True),
                 spec_table("domain", snap.domains, False))


def scrape(server: str, timeout: float = 5.0) -> Snapshot:
    url = server if "://" in server else f"http://{server}/metrics"
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return parse(response.read().decode(), at=time.monotonic())


def run(server: str, interval: float, once: bool = False) -> int:
    from rich.console import Console
    from rich.live import Live

    console = Console()
    previous = scrape(server)
    if once:
        console.print(render(previous, server=server))
        return 0
    with Live(render(previous, server=server), console=console, refresh_per_second=4) as live:
        while True:
            time.sleep(interval)
            snap = scrape(server)
            live.update(render(snap, previous, server=server))
            previous = snap
