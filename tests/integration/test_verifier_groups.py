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
