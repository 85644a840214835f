"""SpecFleet's configuration schema: one YAML file → frozen, typed dataclasses.

Where it sits: ``specfleet serve`` / ``generate`` / ``bench`` load a file with
``load_config`` at start-up and pass the resulting objects down explicitly; nothing
reads configuration from environment variables or globals. ``specfleet config show``
prints the resolved file with every default filled in.

Model paths are either a local Hugging Face checkpoint directory or
``zoo:<size>/<name>`` (a model of SpecFleet's own zoo, built on first use).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from specfleet.core.typed_yaml import ConfigError, load_yaml_file

DrafterKind = Literal["model", "ngram", "suffix", "early_exit"]
Domain = Literal["general", "code", "prose", "data"]
Device = Literal["cpu", "cuda"]
DType = Literal["float32", "bfloat16", "float16"]
Kernel = Literal["default", "mkldnn", "auto"]


def config_field(default, help: str, **meta):
    """A field with help text (and optional ``min``); mutable defaults via factory.
    Every typed YAML config (this one, the simulator's deployments) declares with it."""
    if callable(default) and not isinstance(default, (int, float, str, bool)):
        return field(default_factory=default, metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


_f = config_field  # the short name the many fields below use


def _required(help: str):
    return field(metadata={"help": help})


@dataclass(frozen=True)
class ModelsConfig:
    target: str = _required("target checkpoint: a local HF directory or zoo:<size>/<name>")
    tokenizer: str | None = _f(None, "tokenizer directory; defaults to the target's")


@dataclass(frozen=True)
class ResourcesConfig:
    num_cpus: float = _f(1.0, "CPUs reserved for the actor", min=0)
    num_gpus: float = _f(0.0, "GPUs (fractions allowed) reserved for the actor", min=0)
    custom: dict[str, float] = _f(dict, "custom Ray node resources, e.g. {drafter: 1}")
    torch_threads: int = _f(1, "torch intra-op threads inside the actor", min=1)
    cpu_affinity: list[int] = _f(
        list, "CPU cores the actor's process is pinned to (Linux sched_setaffinity), e.g. [1] so a "
        "drafter and the verifier overlap on cores of their own in pipelined mode; empty = not pinned"
    )


@dataclass(frozen=True)
class DrafterConfig:
    name: str = _required("unique drafter name (used by routing and stats)")
    kind: DrafterKind = _required(
        "model: a small LM; ngram: prompt lookup; suffix: suffix tree; early_exit: the target's own "
        "first exit_layer layers + its final norm and LM head (self-speculation, no second model)"
    )
    model: str | None = _f(None, "checkpoint for kind=model: local directory or zoo:<size>/<name>")
    domain: Domain = _f("general", "the request domain this drafter specialises in")
    max_draft_tokens: int = _f(8, "longest proposal this drafter makes", min=1)
    exit_layer: int | None = _f(
        None, "early_exit: how many of the target's layers the drafter runs; default: a quarter", min=1
    )
    resources: ResourcesConfig = _f(ResourcesConfig, "Ray resources for this drafter's actor")

    def __post_init__(self):
        if self.kind == "model" and not self.model:
            raise ValueError(f"drafter {self.name!r}: kind 'model' needs a 'model' path")
        if self.kind != "model" and self.model:
            raise ValueError(f"drafter {self.name!r}: 'model' is only for kind 'model' "
                             "(an early_exit drafter is cut from models.target)")
        if self.kind != "early_exit" and self.exit_layer is not None:
            raise ValueError(f"drafter {self.name!r}: 'exit_layer' is only for kind 'early_exit'")


@dataclass(frozen=True)
class VerifierConfig:
    tp_size: int = _f(1, "tensor-parallel ranks per verifier group", min=1)
    count: int = _f(1, "verifier groups, each a copy of the target (own placement group on Ray); requests go to the least loaded; max_batch_size is per group", min=1)
    device: Device = _f("cpu", "device for the target model")
    dtype: DType = _f("float32", "target weights/activations dtype")
    kernel: Kernel = _f(
        "default", "linear-layer path of the target's runner (and of the in-process engine's drafters) "
        "(models/kernels.py): default: torch's F.linear (MKL on CPU) and batched SDPA, a verified token's "
        "logits differ from the same token decoded alone in the last bits; mkldnn: CPU only, weights "
        "packed once at load for oneDNN and attention one query row at a time, so logits are bit-identical "
        "however tokens are batched (speculative greedy == autoregressive greedy by construction), "
        "measured in docs/benchmarks.md (issue 21); auto: mkldnn where available, else default. "
        "tp_size > 1 runs default"
    )
    max_batch_size: int = _f(8, "requests verified together in one forward pass", min=1)
    max_seq_len: int | None = _f(
        None, "prompt + generated tokens per request (KV cache size); default: the checkpoint's context "
        "length (max_position_embeddings), lowered so max_batch_size requests fit kv_cache_mb", min=8
    )
    kv_cache_mb: float = _f(
        4096, "memory budget of one group's KV cache; bounds the default max_seq_len", min=1
    )
    resources: ResourcesConfig = _f(ResourcesConfig, "Ray resources for each TP rank")

    def __post_init__(self):
        if self.kernel == "mkldnn" and (self.tp_size > 1 or self.device != "cpu"):
            raise ValueError("kernel: mkldnn runs only with device cpu and tp_size 1 (use default or auto)")


@dataclass(frozen=True)
class RouterConfig:
    policy: Literal["expertise", "learned", "random", "fixed"] = _f(
        "expertise",
        "expertise: per-domain acceptance, chosen once per request (epsilon-greedy); learned: a UCB "
        "bandit on accepted tokens per ms of round, load-aware, re-routing mid-flight and letting "
        "up to max_cooperating drafters cooperate; random: uniform (a baseline); fixed: always default_drafter",
    )
    default_drafter: str | None = _f(None, "drafter used when nothing is known; default: first")
    exploration: float = _f(0.1, "fraction of requests routed to try a non-best drafter", min=0)
    seed: int = _f(0, "seed of the exploration coin (routing never changes output)", min=0)
    smoothing: float = _f(
        0.1, "EMA weight of the newest round in the acceptance table (after the first 1/w rounds)",
        min=0,
    )
    prior_specialist: float = _f(2.5, "score (tokens/round) of an untried drafter of the request's domain", min=0)
    prior_general: float = _f(2.0, "score of an untried general drafter", min=0)
    prior_other: float = _f(1.5, "score of an untried specialist of another domain", min=0)
    domain_signal: Literal["cues", "learned"] = _f(
        "cues", "learned router: how prompts get a domain: cues (text patterns) or learned (nearest "
        "centroid over hashed n-grams, the cues deciding when unsure)"
    )
    domain_centroids: str | None = _f(
        None, "domain_signal learned: centroids JSON; default: fitted from the zoo's corpus for a zoo target"
    )
    max_cooperating: int = _f(
        1, "learned: most drafters whose proposals are fused into one tree per request (1: no fusion)", min=1
    )
    batch_node_budget: int = _f(64, "learned: draft-tree nodes per round for the whole batch, shared", min=1)
    ucb_c: float = _f(0.3, "learned: UCB exploration weight (a fraction of the best arm's reward)", min=0)
    load_weight: float = _f(0.5, "learned: score penalty per unit share of running requests a drafter serves", min=0)
    reroute_margin: float = _f(
        0.25, "learned: move a request when its reward is this fraction below the best alternative's", min=0
    )
    reroute_min_rounds: int = _f(4, "learned: rounds on a drafter before a request may be moved", min=1)
    cooperate_ratio: float = _f(
        0.6, "learned: a drafter cooperates if its score is at least this fraction of the primary's", min=0
    )

    def __post_init__(self):
        if self.exploration > 1:
            raise ValueError(f"exploration: must be <= 1, got {self.exploration}")
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"smoothing: must be in (0, 1], got {self.smoothing}")


@dataclass(frozen=True)
class SchedulerConfig:
    draft_length: int = _f(4, "initial draft window (tokens per round)", min=0)
    max_draft_length: int = _f(8, "upper bound for the adaptive window", min=1)
    adaptive: bool = _f(True, "adapt the window to acceptance and draft/verify speed")
    initial_alpha: float = _f(0.6, "adaptive: per-token acceptance assumed before a request has history", min=0)
    alpha_smoothing: float = _f(0.3, "adaptive: EMA weight of the newest round's acceptance", min=0)
    cost_ratio_prior: float = _f(
        0.1, "adaptive: draft-token/verify-step time ratio assumed until timings are measured", min=0
    )
    timing_smoothing: float = _f(0.2, "adaptive: EMA weight of the newest round's timing", min=0)
    probe_every: int = _f(16, "adaptive: rounds between one-token probes while speculation is off", min=1)
    window_policy: str = _f(
        "adaptive", "adaptive (per request, batch-1 economics), goodput (whole-batch goodput controller) "
        "or pearl (pipelined mode: verify time / draft time per token, PEARL's rule)"
    )
    switch_margin: float = _f(0.03, "goodput: predicted gain a new plan needs over the last one (hysteresis)", min=0)
    mode: str = _f(
        "lockstep", "lockstep (draft, then verify) or pipelined (PEARL: the next window is drafted while "
        "this one is verified; needs separate drafter and verifier processes to overlap: the Ray runtime)"
    )
    first_window: int = _f(
        0, "pipelined: draft of a round after a rejection, verified while the drafter drafts ahead "
        "(1 = PEARL's pre-verify; 0 = from the measured draft/verify cost: 1 when drafting the "
        "window costs over 0.3 of a verify, else the whole window)", min=0,
    )

    def __post_init__(self):
        if self.window_policy not in ("adaptive", "goodput", "pearl"):
            raise ValueError(f"window_policy: must be adaptive, goodput or pearl, got {self.window_policy!r}")
        if self.mode not in ("lockstep", "pipelined"):
            raise ValueError(f"mode: must be lockstep or pipelined, got {self.mode!r}")
        for key in ("initial_alpha", "alpha_smoothing", "timing_smoothing"):
            if getattr(self, key) > 1:
                raise ValueError(f"{key}: must be <= 1, got {getattr(self, key)}")


@dataclass(frozen=True)
class ServerConfig:
    host: str = _f("127.0.0.1", "address the gRPC server binds")
    port: int = _f(50051, "gRPC port (0 picks a free port)", min=0)
    max_concurrent_requests: int = _f(64, "beyond this, requests get RESOURCE_EXHAUSTED", min=1)
    max_new_tokens_limit: int = _f(512, "largest max_new_tokens a request may ask for", min=1)
    max_message_bytes: int = _f(4 * 1024 * 1024, "gRPC message size limit", min=1024)
    auth_token: str | None = _f(None, "bearer token required from clients; none = no auth")
    admin_token: str | None = _f(
        None, "token of the admin API (drafters add/remove, metadata x-specfleet-admin-token); none = admin API off"
    )
    tls_cert: str | None = _f(None, "PEM certificate chain file; with tls_key the server uses TLS")
    tls_key: str | None = _f(None, "PEM private key file of tls_cert")
    http_port: int | None = _f(
        None, "port of the OpenAI-compatible HTTP API on host (0 picks a free port); none = off",
        min=0,
    )
    served_model_name: str | None = _f(
        None, "the model name HTTP clients send (/v1/models lists it); default: models.target"
    )
    metrics_port: int | None = _f(
        None, "port of the Prometheus /metrics endpoint on host (0 picks a free port); none = off",
        min=0,
    )

    def __post_init__(self):
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("server.tls_cert and server.tls_key: set both or neither")
        ports = [("port", self.port), ("http_port", self.http_port), ("metrics_port", self.metrics_port)]
        taken: dict[int, str] = {}
        for key, value in ports:
            if value:  # None is off, 0 is a free port: neither can clash
                if value in taken:
                    raise ValueError(f"server.{key}: {value} is also server.{taken[value]}")
                taken[value] = key


@dataclass(frozen=True)
class ClusterConfig:
    address: str = _f("local", "local: start an embedded Ray; auto or HOST:PORT: join one")
    num_cpus: int | None = _f(2, "CPUs for an embedded Ray (ignored when joining)", min=1)
    num_gpus: int | None = _f(0, "GPUs for an embedded Ray (ignored when joining)", min=0)
    resources: dict[str, float] = _f(dict, "custom resources of an embedded Ray's node")
    compiled_graph: bool = _f(
        True, "run steady rounds as a Ray compiled graph (its actors poll while it exists; "
        "it is built after compile_after_rounds rounds with the same drafters and dropped when idle)"
    )
    compile_after_rounds: int = _f(
        4, "rounds with the same drafters in use before the compiled graph is built", min=1
    )
    compile_min_rounds_left: int = _f(
        64, "build the compiled graph only if the running requests have at least this many "
        "rounds left (compiling costs about as much as this many chained rounds save)", min=0,
    )
    compiled_graph_max_drafters: int = _f(
        1, "compile only while at most this many drafters are in use: every actor in the "
        "graph polls, so it pays only when each has a core to itself", min=1,
    )
    restart_max_failures: int = _f(
        5, "an actor (drafter or verifier group) that fails this many times within "
        "restart_window_s, or this many times in a row, is given up until its oldest failure "
        "leaves the window: a verifier group's requests then move to the other groups (UNAVAILABLE "
        "when none is left), a drafter's go on without its drafts", min=1,
    )
    restart_window_s: float = _f(60.0, "the window of restart_max_failures, in seconds", min=0)
    restart_backoff_s: float = _f(
        0.5, "wait before restarting an actor that failed twice or more in a row; doubles "
        "with each further failure", min=0,
    )
    restart_backoff_max_s: float = _f(5.0, "the longest wait between restarts", min=0)


@dataclass(frozen=True)
class SpecFleetConfig:
    models: ModelsConfig = _required("target model and tokenizer")
    drafters: list[DrafterConfig] = _required("drafter nodes (at least one)")
    verifier: VerifierConfig = _f(VerifierConfig, "verifier groups hosting the target")
    router: RouterConfig = _f(RouterConfig, "per-request drafter choice and fusion")
    scheduler: SchedulerConfig = _f(SchedulerConfig, "draft length and pipelining")
    server: ServerConfig = _f(ServerConfig, "frontend: gRPC server, OpenAI-compatible HTTP API, metrics")
    cluster: ClusterConfig = _f(ClusterConfig, "Ray cluster to run on")

    def __post_init__(self):
        if not self.drafters:
            raise ValueError("drafters: at least one drafter is required")
        names = [d.name for d in self.drafters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"drafters: duplicate name {dupes[0]!r}")
        if self.router.default_drafter and self.router.default_drafter not in names:
            raise ValueError(
                f"router.default_drafter: {self.router.default_drafter!r} is not a drafter name"
            )
        if self.scheduler.draft_length > self.scheduler.max_draft_length:
            raise ValueError("scheduler.draft_length: must be <= scheduler.max_draft_length")


def load_config(path: str | Path) -> SpecFleetConfig:
    """Load and validate a config file; raises ConfigError naming file and key path."""
    return load_yaml_file(path, SpecFleetConfig)


def summarize(cfg: SpecFleetConfig) -> str:
    kinds = ", ".join(f"{d.name}({d.kind})" for d in cfg.drafters)
    v = cfg.verifier
    return (
        f"target={cfg.models.target}; drafters: {kinds}; "
        f"verifier: {v.count} group(s) x tp={v.tp_size} on {v.device}/{v.dtype}; "
        f"server {cfg.server.host}:{cfg.server.port}"
    )


__all__ = ["SpecFleetConfig", "load_config", "summarize", "ConfigError"]
