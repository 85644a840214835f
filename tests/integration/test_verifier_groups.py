"""``verifier.count: 2`` on the tiny zoo: requests spread over both groups, greedy
output equals HF ``generate``, and a dead group's requests resume exactly while the
other group's requests do not notice (in process, and on Ray with each group in its
own placement group).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from specfleet.core.config import load_config
from specfleet.core.types import SamplingParams
from specfleet.core.workers import WorkerUnavailable

pytestmark = pytest.mark.integration

TEXTS = ["def main(argv):\n    ", "The river ran", "for i in range(", "Once upon a time",
         "import os\n", "She said that"]
NEW = 12


def two_groups(base):
    return dataclasses.replace(
        base,
        verifier=dataclasses.replace(base.verifier, count=2),
        # A fixed window: rounds per request do not depend on timing, so an undisturbed
        # group's requests take exactly the rounds of an undisturbed run.
        scheduler=dataclasses.replace(base.scheduler, adaptive=False, draft_length=3),
    )


@pytest.fixture(scope="module")
def zoo_prompts(tiny_zoo):
    from specfleet.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer("zoo:tiny/target")
    prompts = [tokenizer(t)["input_ids"] for t in TEXTS]
    hf = load_causal_lm("zoo:tiny/target")
    with torch.no_grad():
        expected = [hf.generate(torch.tensor([p]), max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                                pad_token_id=1)[0, len(p):].tolist() for p in prompts]
    return prompts, expected


SAMPLING = SamplingParams(max_new_tokens=NEW, ignore_eos=True)


def test_in_process_two_groups_spread_and_stay_exact(zoo_prompts):
    from specfleet.engine.builder import build_engine

    prompts, expected = zoo_prompts
    engine = build_engine(two_groups(load_config("configs/tiny.yaml")))
    assert len(engine.verifiers) == 2
    outs = engine.generate(prompts, SAMPLING, drafter="general")
    assert [o.token_ids for o in outs] == expected
    assert sorted({o.stats.verifier_group for o in outs}) == [0, 1]
    per_group = engine.stats.per_group
    assert per_group[0].emitted == per_group[1].emitted == 3 * NEW  # 6 requests, 3 per group


def _run(engine, prompts, kill=None):
    ids = [engine.submit(p, SAMPLING, drafter="general") for p in prompts]
    done = {}
    done.update((o.request_id, o) for o in engine.step())
    if kill is not None:
        kill()
    while engine.has_work:
        done.update((o.request_id, o) for o in engine.step())
    return [done[i] for i in ids]


def test_ray_two_groups_and_a_killed_group_resumes_exactly(zoo_prompts, tmp_path):
    ray = pytest.importorskip("ray")
    from specfleet.cluster.runtime import RayRuntime
    from specfleet.testing.cluster_rigs import token_auth

    prompts, expected = zoo_prompts
    prompts, expected = prompts[:4], expected[:4]
    cfg = two_groups(load_config("configs/tiny.yaml"))
    with token_auth(tmp_path):
        runtime = RayRuntime.start(cfg)
        try:
            assert len(runtime.groups) == 2 and len({p.node_id for p in runtime.placements}) == 1
            baseline = _run(runtime.engine, prompts)
            assert [o.token_ids for o in baseline] == expected
            groups = [o.stats.verifier_group for o in baseline]
            assert groups == [0, 1, 0, 1]

            victim = runtime.verifiers[1]
            outs = _run(runtime.engine, prompts, kill=lambda: ray.kill(victim.actor, no_restart=True))
            assert [o.token_ids for o in outs] == expected
            assert [o.stats.verifier_group for o in outs] == groups
            assert (runtime.verifiers[0].restarts, victim.restarts) == (0, 1)
            assert dict(runtime.engine.stats.verify_failures) == {1: 1}
            for before, after in zip(baseline, outs):
                if after.stats.verifier_group == 0:  # the other group did not notice
                    assert after.stats.rounds == before.stats.rounds
        finally:
            runtime.shutdown()
            if ray.is_initialized():
                ray.shutdown()


class _GivesUp:
    """Group 1's worker past its restart budget from its second call on, as a Ray
    verifier handle reports it (``WorkerUnavailable(group=1)``); never back."""

    def __init__(self, worker):
        self.worker, self.calls = worker, 0

    def verify(self, calls, drafts):
        self.calls += 1
        if self.calls >= 2:
            raise WorkerUnavailable("verifier group 1 is unavailable; retry later", group=1)
        return self.worker.verify(calls, drafts)

    def release(self, request_ids):
        self.worker.release(request_ids)

    def available(self) -> bool:
        return False


def test_in_process_backend_a_given_up_group_fails_nobody(zoo_prompts):
    """Two groups behind the engine thread; group 1 is given up mid-run: every request
    finishes OK with HF's tokens, group 1's re-served on group 0, no error chunk."""
    import asyncio

    from specfleet.core.serving import GenerationRequest
    from specfleet.core.types import FinishReason
    from specfleet.engine.backend import EngineBackend, backend_info
    from specfleet.engine.builder import build_engine, with_context_length

    prompts, expected = zoo_prompts
    cfg = with_context_length(two_groups(load_config("configs/tiny.yaml")))
    engine = build_engine(cfg)
    victim = _GivesUp(engine.executor.verifiers[1])
    engine.executor.verifiers[1] = victim
    runner = engine.verifier.runner
    backend = EngineBackend(engine, backend_info(cfg, vocab_size=runner.vocab_size,
                                                 max_seq_len=runner.max_seq_len))

    async def collect(i, prompt):
        tokens, last = [], None
        async for chunk in backend.stream(GenerationRequest(f"r{i}", prompt, SAMPLING, drafter="general")):
            tokens += chunk.token_ids
            last = chunk
        return tokens, last

    async def main():
        try:
            return await asyncio.gather(*(collect(i, p) for i, p in enumerate(prompts)))
        finally:
            await backend.close()

    results = asyncio.run(main())
    assert [tokens for tokens, _ in results] == expected
    assert all(last.error is None and last.finish_reason == FinishReason.LENGTH for _, last in results)
    assert victim.calls >= 2 and engine.scheduler.unavailable_groups == [1]
    assert all(last.stats.verifier_group == 0 for _, last in results)


def test_ray_a_given_up_group_moves_its_requests_and_comes_back(zoo_prompts, tmp_path):
    """Group 1 past its restart budget (every replacement dies as it appears): its
    requests finish exactly on group 0 and nobody fails; once the budget allows, a new
    group 1 loads, is restored, and takes admissions again."""
    import time

    ray = pytest.importorskip("ray")
    from specfleet.cluster.runtime import RayRuntime
    from specfleet.cluster.supervisor import RestartBudget
    from specfleet.testing.cluster_rigs import token_auth

    prompts, expected = zoo_prompts
    prompts, expected = prompts[:4], expected[:4]
    cfg = two_groups(load_config("configs/tiny.yaml"))
    with token_auth(tmp_path):
        runtime = RayRuntime.start(cfg)
        engine, victim = runtime.engine, runtime.verifiers[1]
        supervisor = victim.supervisor
        real, saved_budget = supervisor._spawn, supervisor.budget
        try:
            def spawn_dead():
                actor = real()
                ray.kill(actor, no_restart=True)
                return actor

            def give_up():
                supervisor.budget = RestartBudget(max_failures=2, window_s=300.0, backoff_s=0.1)
                supervisor._spawn = spawn_dead
                ray.kill(victim.actor, no_restart=True)

            outs = _run(engine, prompts, kill=give_up)
            assert [o.token_ids for o in outs] == expected
            assert [o.stats.verifier_group for o in outs] == [0, 0, 0, 0]
            assert engine.scheduler.unavailable_groups == [1] and supervisor.given_up
            assert runtime.verifiers[0].restarts == 0

            # The window passes (a fresh budget, due now, stands in for 300 s).
            supervisor._spawn, supervisor.budget, supervisor._next_spawn = real, saved_budget, 0.0
            deadline = time.monotonic() + 120
            while engine.scheduler.unavailable_groups:
                assert time.monotonic() < deadline, "group 1 did not come back"
                engine.step()
                time.sleep(0.2)
            outs = _run(engine, prompts)
            assert [o.token_ids for o in outs] == expected
            assert [o.stats.verifier_group for o in outs] == [0, 1, 0, 1]
        finally:
            supervisor._spawn, supervisor.budget = real, saved_budget
            runtime.shutdown()
            if ray.is_initialized():
                ray.shutdown()
