"""Pipelined speculation on Ray actors (``scheduler.mode: pipelined``): the drafter
actor drafts the next window while the verifier actor checks this one, and the
output is still the target's, token for token, with a drafter or the verifier
killed while windows are in flight.

One embedded Ray and one deployment of tiny random Llama checkpoints (the
``tests/integration/test_ray_runtime.py`` rig) in pipelined mode.
"""

from __future__ import annotations

import pytest
import torch

from specfleet.core.config import load_config
from specfleet.core.types import SamplingParams
from specfleet.testing.cluster_rigs import (
    greedy_reference,
    tiny_config_dict,
    write_config,
    write_tiny_models,
)

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")
torch.set_num_threads(1)

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9, 10], [11, 12, 13, 14, 15], [40]]
N = 24


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def expected(models):
    return greedy_reference(models["target"], N)


@pytest.fixture(scope="module")
def runtime(models, tmp_path_factory):
    from specfleet.cluster.runtime import RayRuntime

    data = tiny_config_dict(models)
    data["scheduler"].update(mode="pipelined", first_window=1)
    data["cluster"]["restart_max_failures"] = 1000
    cfg = load_config(write_config(tmp_path_factory.mktemp("ray") / "cfg.yaml", data))
    rt = RayRuntime.start(cfg)
    try:
        yield rt
    finally:
        rt.shutdown()
        if ray.is_initialized():
            ray.shutdown()


@pytest.mark.parametrize("drafter", ["self", "random", "ngram"])
def test_pipelined_greedy_equals_target_generate(runtime, expected, drafter):
    scheduler = runtime.scheduler
    hits, rounds = scheduler.pipeline_hits, scheduler.pipeline_rounds
    outs = runtime.engine.generate(PROMPTS, SamplingParams(max_new_tokens=N), drafter=drafter)
    assert [o.token_ids for o in outs] == [expected(p) for p in PROMPTS]
    assert scheduler.pipeline_rounds > rounds
    if drafter == "self":  # always accepted: windows drafted ahead are used
        assert scheduler.pipeline_hits - hits >= (scheduler.pipeline_rounds - rounds) // 2
        assert all(o.stats.acceptance_rate == 1.0 for o in outs)


def test_seeded_sampling_is_the_same_pipelined(runtime):
    params = SamplingParams(temperature=0.9, max_new_tokens=N, seed=123)
    plain = runtime.engine.generate(PROMPTS, params, drafter=None)
    piped = runtime.engine.generate(PROMPTS, params, drafter="random")
    assert [o.token_ids for o in piped] == [o.token_ids for o in plain]


@pytest.mark.parametrize("who", ["drafter", "verifier"])
def test_a_worker_killed_while_windows_are_in_flight_loses_nothing(runtime, expected, who):
    engine = runtime.engine
    runtime.drafters["self"].wait_ready(120)  # killed by the test before, maybe still restarting
    handle = runtime.drafters["self"] if who == "drafter" else runtime.verifier
    before = handle.restarts
    ids = [engine.submit(p, SamplingParams(max_new_tokens=N), drafter="self") for p in PROMPTS]
    done = {}
    for _ in range(2):
        done.update((o.request_id, o) for o in engine.step())
    assert runtime.scheduler._pending  # windows were drafted ahead and wait to be verified
    ray.kill(handle.actor, no_restart=True)
    while engine.has_work:
        done.update((o.request_id, o) for o in engine.step())
    assert [done[i].token_ids for i in ids] == [expected(p) for p in PROMPTS]
    assert handle.restarts == before + 1
