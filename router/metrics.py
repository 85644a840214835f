"""Prometheus export of the frontend: speculation counters, latencies, load.

Where it sits: ``SpecFleetServer`` builds one ``Metrics`` when ``server.metrics_port``
is set and passes it to the servicer as its ``RequestObserver``, so every request
that ends — through gRPC or the HTTP API — is counted once, from the same
``RequestStats`` the client receives. Rounds' timings and the load come from the
backend's engine thread (``EngineBackend.round_observer`` / ``load_snapshot``), never
by touching the engine. ``/metrics`` is served by prometheus_client's own HTTP
server on its own port and thread, in a registry of this frontend (not the global
one, so several servers in one process — tests — do not collide).

Names follow vLLM's (``vllm:spec_decode_num_drafts`` ...) under a ``specfleet:``
prefix, with SpecFleet's labels ``drafter``, ``domain`` and ``verifier_group``;
docs/metrics.md lists each with its meaning. A request's speculation counts carry
the labels of that request: the drafter that served its drafted rounds (requests
keep one drafter; the rare request served by several is labelled with their names
joined by ``+``), the router's domain (``none`` when no router classified it), its
verifier group. Per-position counters have one more label, ``position`` (0-based).
"""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from specfleet.core.stats import RoundTiming
from specfleet.router.servicer import RequestRecord

logger = logging.getLogger(__name__)

PREFIX = "specfleet:"
SPEC_LABELS = ("drafter", "domain", "verifier_group")
NO_LABEL = "none"  # a request without a drafter (not speculated), domain or group

# Seconds; latency buckets as vLLM's, spanning a CPU zoo's tens of ms to a cluster's minutes.
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
                   2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ROUND_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def spec_labels(record: RequestRecord) -> dict[str, str]:
    """The drafter/domain/verifier_group labels of a finished request."""
    s = record.stats
    drafters = sorted(name for name, rounds in s.drafters.items() if rounds)
    return {
        "drafter": "+".join(drafters) or NO_LABEL,
        "domain": s.domain or NO_LABEL,
        "verifier_group": NO_LABEL if s.verifier_group is None else str(s.verifier_group),
    }


class Metrics:
    """Every metric of one frontend, and the endpoint that exports them."""

    def __init__(self, backend, *, port: int = 0, host: str = "127.0.0.1"):
        self.backend = backend
        self.host = host
        self.port = port
        self.registry = reg = CollectorRegistry()
        self._httpd = None
        spec = list(SPEC_LABELS)

        def counter(name: str, doc: str, labels=spec) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=reg)

        def histogram(name: str, doc: str, buckets=LATENCY_BUCKETS, labels=("api",)) -> Histogram:
            return Histogram(PREFIX + name, doc, list(labels), buckets=buckets, registry=reg)

        self.num_drafts = counter(
            "spec_decode_num_drafts", "Rounds in which a drafter proposed at least one token.")
        self.num_draft_tokens = counter(
            "spec_decode_num_draft_tokens", "Draft tokens proposed (longest path per round).")
        self.num_accepted_tokens = counter(
            "spec_decode_num_accepted_tokens", "Draft tokens the target accepted.")
        self.num_emitted_tokens = counter(
            "spec_decode_num_emitted_tokens",
            "Tokens committed (accepted + one recovered/bonus per round), all rounds.")
        self.num_rounds = counter(
            "spec_decode_num_rounds", "Verification rounds (target forward passes) of requests.")
        self.draft_tokens_per_pos = counter(
            "spec_decode_num_draft_tokens_per_pos",
            "Rounds with a draft token at this position (0-based).", spec + ["position"])
        self.accepted_tokens_per_pos = counter(
            "spec_decode_num_accepted_tokens_per_pos",
            "Rounds accepting the draft token at this position (0-based).", spec + ["position"])
        self.requests = counter("requests", "Requests that ended, by finish reason and API.",
                                ["finish_reason", "api"])
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of ended requests.", ["api"])
        self.generation_tokens = counter("generation_tokens", "Tokens generated.", ["api"])
        self.ttft = histogram("time_to_first_token_seconds",
                              "Request received by the frontend -> its first token.")
        self.itl = histogram(
            "inter_token_latency_seconds",
            "Per token after the request's first output: the gap between two outputs "
            "divided by the tokens the later one brought (sum = first output -> last).")
        self.e2e = histogram("e2e_request_latency_seconds",
                             "Request received by the frontend -> its end.")
        self.queue = histogram("request_queue_time_seconds",
                               "Arrival at the scheduler -> admission into a verifier group.")
        self.round_time = histogram("round_time_seconds", "Wall time of one engine round.",
                                    ROUND_BUCKETS, ("verifier_group",))
        self.draft_time = histogram("round_draft_compute_seconds",
                                    "Drafting compute on a round's critical path.",
                                    ROUND_BUCKETS, ("verifier_group",))
        self.verify_time = histogram("round_verify_compute_seconds",
                                     "The verifier's own compute time of a round.",
                                     ROUND_BUCKETS, ("verifier_group",))
        reg.register(_LoadCollector(backend))
        if hasattr(backend, "round_observer"):
            backend.round_observer = self.observe_round

    # ---- sinks --------------------------------------------------------------------------------
    def observe_request(self, record: RequestRecord) -> None:
        api = record.api
        self.requests.labels(record.finish_reason, api).inc()
        self.prompt_tokens.labels(api).inc(record.prompt_tokens)
        self.generation_tokens.labels(api).inc(record.completion_tokens)
        self.e2e.labels(api).observe(record.total_ns / 1e9)
        if record.first_token_ns is not None:
            self.ttft.labels(api).observe(record.first_token_ns / 1e9)
        itl = self.itl.labels(api)
        for gap_ns, tokens in record.token_gaps:
            for _ in range(tokens):
                itl.observe(gap_ns / tokens / 1e9)
        s = record.stats
        if s is None:  # failed or cancelled: no speculation statistics came back
            return
        self.queue.labels(api).observe(s.queue_ns / 1e9)
        labels = spec_labels(record)
        drafts = s.position_drafted[0] if s.position_drafted else 0
        for metric, value in ((self.num_drafts, drafts), (self.num_draft_tokens, s.drafted),
                              (self.num_accepted_tokens, s.accepted),
                              (self.num_emitted_tokens, s.emitted), (self.num_rounds, s.rounds)):
            metric.labels(**labels).inc(value)
        for pos, (drafted, accepted) in enumerate(zip(s.position_drafted, s.position_accepted)):
            self.draft_tokens_per_pos.labels(**labels, position=str(pos)).inc(drafted)
            self.accepted_tokens_per_pos.labels(**labels, position=str(pos)).inc(accepted)

    def observe_round(self, timing: RoundTiming) -> None:
        group = str(timing.group)
        self.round_time.labels(group).observe(timing.wall_ns / 1e9)
        self.draft_time.labels(group).observe(timing.draft_compute_ns / 1e9)
        self.verify_time.labels(group).observe(timing.verify_compute_ns / 1e9)

    # ---- endpoint ------------------------------------------------------------------------------
    def start(self) -> int:
        """Serve /metrics on host:port (0 picks a free port); returns the port."""
        self._httpd, _thread = start_http_server(self.port, addr=self.host, registry=self.registry)
        self.port = self._httpd.server_address[1]
        logger.info("Prometheus metrics on %s", self.url)
        return self.port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def stop(self) -> None:
        if getattr(self.backend, "round_observer", None) == self.observe_round:
            self.backend.round_observer = None  # the backend may outlive this frontend (tests)
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None


class _LoadCollector:
    """Gauges read at scrape time from the backend's latest load snapshot."""

    def __init__(self, backend):
        self._backend = backend

    def describe(self):
        return []  # collected on demand; nothing to declare up front

    def collect(self):
        load = getattr(self._backend, "load_snapshot", None)
        running = GaugeMetricFamily(PREFIX + "num_requests_running",
                                    "Requests admitted into a verifier group.")
        waiting = GaugeMetricFamily(PREFIX + "num_requests_waiting",
                                    "Requests waiting for a verifier group.")
        in_use = GaugeMetricFamily(PREFIX + "kv_slots_in_use",
                                   "KV-cache request slots in use per verifier group.",
                                   labels=["verifier_group"])
        capacity = GaugeMetricFamily(PREFIX + "kv_slots_capacity",
                                     "KV-cache request slots per verifier group.",
                                     labels=["verifier_group"])
        drafter_requests = GaugeMetricFamily(PREFIX + "drafter_requests_running",
                                             "Running requests each drafter serves.",
                                             labels=["drafter"])
        router_score = GaugeMetricFamily(
            PREFIX + "router_score",
            "The router's current score of a drafter for a domain (expected tokens per round, "
            "observed or prior): its learned expertise table.", labels=["domain", "drafter"])
        draft_failures = CounterMetricFamily(PREFIX + "drafter_failures",
                                             "Failed draft calls (the round went on without them).",
                                             labels=["drafter"])
        verify_failures = CounterMetricFamily(PREFIX + "verifier_failures",
                                              "Failed verify calls (the group's requests are re-sent).",
                                              labels=["verifier_group"])
        drafter_restarts = CounterMetricFamily(PREFIX + "drafter_restarts",
                                               "Drafter actors restarted by their supervisor.",
                                               labels=["drafter"])
        verifier_restarts = CounterMetricFamily(PREFIX + "verifier_restarts",
                                                "Verifier group leaders restarted by their supervisor.",
                                                labels=["verifier_group"])
        if load is not None:
            running.add_metric([], load.running)
            waiting.add_metric([], load.waiting)
            for group, g in enumerate(load.groups):
                in_use.add_metric([str(group)], g.running)
                capacity.add_metric([str(group)], g.capacity)
            for name, count in sorted(load.drafter_requests.items()):
                drafter_requests.add_metric([name], count)
        fleet = getattr(self._backend, "fleet_snapshot", None)
        if fleet is not None:
            for domain, row in sorted(fleet.router_table.items()):
                for drafter, score in sorted(row.items()):
                    router_score.add_metric([domain, drafter], score)
            for name, count in sorted(fleet.draft_failures.items()):
                draft_failures.add_metric([name], count)
            for group, count in sorted(fleet.verify_failures.items()):
                verify_failures.add_metric([str(group)], count)
        restarts = getattr(self._backend, "worker_restarts", None)
        if restarts is not None:
            drafters, groups = restarts()
            for name, count in sorted(drafters.items()):
                drafter_restarts.add_metric([name], count)
            for group, count in sorted(groups.items()):
                verifier_restarts.add_metric([str(group)], count)
        yield from (running, waiting, in_use, capacity, drafter_requests, router_score,
                    draft_failures, verify_failures, drafter_restarts, verifier_restarts)
