"""One verifier group vs several on the same batch: does splitting the batch pay?

``python -m specfleet.benchmarks.groups_bench --zoo small --target target-xl --batch 16``

A mixed-domain batch (each request drafted by its domain's specialist, greedy, EOS
ignored) runs to completion with ``verifier.count`` = each of ``--groups``, with
``verifier.max_batch_size`` = batch / count so every request is admitted at once:

- ``inprocess``: the in-process engine (``build_engine``); its executor runs the
  groups' rounds one after another on one thread, so this shows the cost of the
  split (smaller forwards) without any overlap;
- ``ray``: the Ray runtime, every group a verifier actor with one torch thread in
  its own placement group; the groups' rounds are launched together and overlap
  when there are cores to overlap on.

Reports tokens/s (median of ``--runs``) per backend and group count, checks every
run's tokens equal the 1-group in-process run's, and names the machine.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time

from specfleet.benchmarks.engine_bench import heldout_prompts, machine_description
from specfleet.core.config import SpecFleetConfig
from specfleet.core.typed_yaml import from_mapping
from specfleet.core.types import SamplingParams
from specfleet.policy.domains import DOMAINS

logger = logging.getLogger(__name__)


def bench_config(zoo: str, target: str, groups: int, batch: int, window: int,
                 verifier_threads: int = 1) -> SpecFleetConfig:
    drafters = [{"name": d, "kind": "model", "model": f"zoo:{zoo}/drafter-{d}", "domain": d,
                 "resources": {"num_cpus": 0.2}} for d in DOMAINS]
    return from_mapping({
        "models": {"target": f"zoo:{zoo}/{target}", "tokenizer": f"zoo:{zoo}/tokenizer"},
        "drafters": drafters,
        "verifier": {"count": groups, "max_batch_size": batch // groups, "max_seq_len": 256,
                     "resources": {"num_cpus": 0.5, "torch_threads": verifier_threads}},
        "router": {"policy": "fixed", "default_drafter": DOMAINS[0]},
        "scheduler": {"draft_length": window, "adaptive": False},
        "cluster": {"num_cpus": 2, "compiled_graph": False},
    }, SpecFleetConfig, "groups_bench")


def _drive(engine, work: list[tuple[str, list[int]]], params: SamplingParams) -> tuple[float, list]:
    ids = [engine.submit(p, params, drafter=d) for d, p in work]
    done, start = {}, time.perf_counter()
    while engine.has_work:
        done.update((o.request_id, o) for o in engine.step())
    seconds = time.perf_counter() - start
    outs = [done[i] for i in ids]
    return sum(len(o.token_ids) for o in outs) / seconds, [o.token_ids for o in outs]


def run(zoo: str, target: str, batch: int, groups: list[int], backends: list[str], max_new: int,
        runs: int, window: int, verifier_threads: int = 1) -> dict:
    import torch

    from specfleet.models.loading import load_tokenizer

    torch.set_num_threads(verifier_threads)
    tokenizer = load_tokenizer(f"zoo:{zoo}/tokenizer")
    prompts = heldout_prompts(zoo, tokenizer, max(1, batch // len(DOMAINS) + 1), 32)
    work = [(DOMAINS[i % len(DOMAINS)], prompts[DOMAINS[i % len(DOMAINS)]][i // len(DOMAINS)])
            for i in range(batch)]
    params = SamplingParams(max_new_tokens=max_new, ignore_eos=True)
    report = {"machine": machine_description(), "zoo": zoo, "target": target, "batch": batch,
              "max_new_tokens": max_new, "window": window, "runs": runs,
              "verifier_threads": verifier_threads, "results": {}}
    reference = None
    for backend in backends:
        for count in groups:
            cfg = bench_config(zoo, target, count, batch, window, verifier_threads)
            engine, runtime = _build(backend, cfg)
            try:
                _drive(engine, work, params)  # warm-up
                per_run = []
                for _ in range(runs):
                    tps, tokens = _drive(engine, work, params)
                    per_run.append(tps)
                    reference = reference or tokens
                    if tokens != reference:
                        raise AssertionError(f"{backend} with {count} groups changed the output")
            finally:
                if runtime is not None:
                    runtime.shutdown()
            key = f"{backend}-{count}"
            report["results"][key] = {"tokens_per_s": round(statistics.median(per_run), 1),
                                      "runs_tokens_per_s": [round(x, 1) for x in per_run]}
            logger.warning("%s: %.1f tok/s", key, statistics.median(per_run))
    report["exact"] = True
    return report


def _build(backend: str, cfg: SpecFleetConfig):
    if backend == "inprocess":
        from specfleet.engine.builder import build_engine

        return build_engine(cfg), None
    from specfleet.cluster.runtime import RayRuntime

    runtime = RayRuntime.start(cfg)
    return runtime.engine, runtime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", default="small", choices=["tiny", "small"])
    parser.add_argument("--target", default="target-xl", choices=["target", "target-xl"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--groups", default="1,2", help="comma list of verifier.count values")
    parser.add_argument("--backends", default="inprocess,ray", help="comma list: inprocess, ray")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--draft-length", type=int, default=4)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--verifier-threads", type=int, default=1,
                        help="torch threads per Ray verifier actor (in process: this process' threads)")
    parser.add_argument("--json", metavar="FILE", help="write the report as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    groups = [int(g) for g in args.groups.split(",")]
    if any(args.batch % g for g in groups):
        parser.error(f"--batch {args.batch} must split evenly over every --groups value")
    report = run(args.zoo, args.target, args.batch, groups, args.backends.split(","),
                 args.max_new_tokens, args.runs, args.draft_length, args.verifier_threads)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
