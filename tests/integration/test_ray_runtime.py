"""The Ray runtime is the in-process engine over actors: exact output, streaming
through ``RayBackend``, and no request lost when a drafter or the verifier dies.

One embedded Ray and one deployment (tiny random Llama checkpoints written to a
temp dir, token auth on with a test-owned token) serve the whole module.
"""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from specfleet.core.config import load_config
from specfleet.core.types import FinishReason, SamplingParams
from specfleet.testing.cluster_rigs import (
    greedy_reference,
    tiny_config_dict,
    token_auth,
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

    tmp = tmp_path_factory.mktemp("ray")
    data = tiny_config_dict(models)
    # Many tests below kill the verifier within a minute: the default budget (5 in 60 s)
    # would give it up. The budget itself is tested on its own handle below.
    data["cluster"]["restart_max_failures"] = 1000
    cfg = load_config(write_config(tmp / "cfg.yaml", data))
    with token_auth(tmp):
        rt = RayRuntime.start(cfg)
        # These requests are short; let them compile the round graph anyway (the
        # default waits for enough rounds left to repay compiling).
        rt.executor.compile_min_rounds_left = 0
        try:
            yield rt
        finally:
            rt.shutdown()
            if ray.is_initialized():
                ray.shutdown()


@pytest.mark.parametrize("drafter", ["self", "random", "ngram", None])
def test_greedy_equals_target_generate(runtime, expected, drafter):
    compiled_before = runtime.executor.compiled_rounds
    outs = runtime.engine.generate(PROMPTS, SamplingParams(max_new_tokens=N), drafter=drafter)
    assert [o.token_ids for o in outs] == [expected(p) for p in PROMPTS]
    if drafter == "self":  # the target as drafter is always accepted, across actors too
        assert all(o.stats.acceptance_rate == 1.0 and o.stats.accepted > 0 for o in outs)
    if drafter is not None:  # steady rounds ran through the compiled graph, exactly
        assert runtime.executor.compiled_rounds > compiled_before
    assert runtime.executor._compiled is None  # dropped when generate returns: no idle polling


def test_short_requests_do_not_compile_a_graph(runtime):
    from specfleet.core.config import ClusterConfig

    runtime.executor.compile_min_rounds_left = ClusterConfig().compile_min_rounds_left
    try:
        before = runtime.executor.compiled_rounds
        runtime.engine.generate(PROMPTS, SamplingParams(max_new_tokens=N), drafter="random")
        assert runtime.executor.compiled_rounds == before  # N=24 < 64 rounds: not worth 0.2 s
    finally:
        runtime.executor.compile_min_rounds_left = 0


def test_plain_calls_equal_compiled_graph(runtime, expected):
    runtime.executor.compiled_graph = False
    try:
        before = runtime.executor.compiled_rounds
        outs = runtime.engine.generate(PROMPTS, SamplingParams(max_new_tokens=N), drafter="random")
        assert runtime.executor.compiled_rounds == before
    finally:
        runtime.executor.compiled_graph = True
    assert [o.token_ids for o in outs] == [expected(p) for p in PROMPTS]


def test_mixed_drafters_in_one_round_run_concurrently(runtime, expected):
    engine = runtime.engine
    ids = [engine.submit(p, SamplingParams(max_new_tokens=N), drafter=d)
           for p, d in zip(PROMPTS, ["self", "random", "ngram", "self"])]
    done = {}
    while engine.has_work:
        done.update((o.request_id, o) for o in engine.step())
    assert [done[i].token_ids for i in ids] == [expected(p) for p in PROMPTS]
    timing = engine.timings[-1]
    assert timing.wall_ns >= timing.draft_compute_ns + timing.verify_compute_ns > 0


def test_actors_hold_nothing_after_requests_finish(runtime):
    runtime.engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=4), drafter="self")
    assert ray.get(runtime.verifier.actor.active.remote()) == []
    assert runtime.engine.request_ids == []


def test_backend_streams_exact_tokens(runtime, expected):
    from specfleet.core.serving import GenerationRequest

    backend = runtime.backend()

    async def run(i, prompt):
        tokens, last = [], None
        async for chunk in backend.stream(GenerationRequest(f"s{i}", prompt, SamplingParams(max_new_tokens=N))):
            tokens += chunk.token_ids
            last = chunk
        return tokens, last

    async def main():
        try:
            return await asyncio.gather(*(run(i, p) for i, p in enumerate(PROMPTS)))
        finally:
            # close() would shut the shared runtime down: stop only the engine thread.
            backend._closed.set()
            backend._inbox.put(("stop", None))
            await asyncio.to_thread(backend._thread.join, 30)

    results = asyncio.run(main())
    assert [t for t, _ in results] == [expected(p) for p in PROMPTS]
    assert all(last.finish_reason == FinishReason.LENGTH and last.stats.rounds > 0 for _, last in results)
    assert backend.info().vocab_size == 97


def _run_killing(runtime, kill, drafter="self", rounds_before=2, sampling=None, after_step=None):
    engine = runtime.engine
    sampling = sampling or SamplingParams(max_new_tokens=N)
    ids = [engine.submit(p, sampling, drafter=drafter) for p in PROMPTS]
    done = {}
    for _ in range(rounds_before):
        done.update((o.request_id, o) for o in engine.step())
    kill()
    while engine.has_work:
        done.update((o.request_id, o) for o in engine.step())
        if after_step is not None:
            after_step()
    return [done[i] for i in ids]


def test_drafter_death_loses_nothing_and_restarts(runtime, expected):
    handle = runtime.drafters["self"]
    before = handle.restarts
    outs = _run_killing(runtime, lambda: ray.kill(handle.actor, no_restart=True))
    assert [o.token_ids for o in outs] == [expected(p) for p in PROMPTS]
    assert handle.restarts == before + 1
    deadline = time.monotonic() + 120
    while not handle._ready() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert handle.alive
    # The restarted drafter re-learns each request whole and is accepted again.
    outs = runtime.engine.generate(PROMPTS, SamplingParams(max_new_tokens=N), drafter="self")
    assert [o.token_ids for o in outs] == [expected(p) for p in PROMPTS]
    assert all(o.stats.acceptance_rate == 1.0 for o in outs)


def test_verifier_death_resumes_from_committed_tokens(runtime, expected):
    handle = runtime.verifier
    before, old = handle.restarts, handle.actor
    outs = _run_killing(runtime, lambda: ray.kill(handle.actor, no_restart=True), drafter="random")
    assert [o.token_ids for o in outs] == [expected(p) for p in PROMPTS]
    assert all(o.finish_reason == FinishReason.LENGTH for o in outs)
    assert handle.restarts == before + 1 and handle.actor != old


def test_a_replacement_that_dies_while_starting_is_retried(runtime, expected):
    handle = runtime.verifier
    real, before, doomed = handle.supervisor._spawn, handle.restarts, []

    def spawn_then_die_once():
        actor = real()
        if not doomed:  # the first replacement dies as soon as it appears
            doomed.append(actor)
            ray.kill(actor, no_restart=True)
        return actor

    handle.supervisor._spawn = spawn_then_die_once
    try:
        outs = _run_killing(runtime, lambda: ray.kill(handle.actor, no_restart=True), drafter="random")
    finally:
        handle.supervisor._spawn = real
    assert [o.token_ids for o in outs] == [expected(p) for p in PROMPTS]
    assert doomed and handle.restarts == before + 2


@pytest.mark.parametrize("when", ["while_loading", "after_two_rounds"])
def test_a_replacement_killed_shortly_after_it_appears_is_replaced_again(runtime, expected, when):
    """The issue's crash: kill the verifier, then its replacement soon after it appears
    (0.5 s after it is spawned, loaded or not; or after it served two rounds). The
    in-flight requests keep their committed tokens and finish equal to HF greedy."""
    import threading

    handle = runtime.verifier
    real, before, timers, killed = handle.supervisor._spawn, handle.restarts, [], []
    rounds_since = []

    def kill(actor):
        killed.append(actor)
        ray.kill(actor, no_restart=True)

    def spawn_and_arm():
        actor = real()
        if when == "while_loading" and not timers:
            timers.append(threading.Timer(0.5, kill, (actor,)))
            timers[0].start()
        return actor

    def after_step():
        time.sleep(0.05)  # rounds slow enough that a timed kill lands while requests run
        if when == "after_two_rounds" and not killed and handle.restarts == before + 1:
            rounds_since.append(1)
            if len(rounds_since) == 2:
                kill(handle.actor)

    handle.supervisor._spawn = spawn_and_arm
    try:
        outs = _run_killing(runtime, lambda: ray.kill(handle.actor, no_restart=True), drafter="random",
                            after_step=after_step)
    finally:
        handle.supervisor._spawn = real
        for timer in timers:
            timer.join()
    assert killed, "the replacement was never killed"
    assert [o.token_ids for o in outs] == [expected(p) for p in PROMPTS]
    assert all(o.finish_reason == FinishReason.LENGTH for o in outs)
    assert handle.restarts == before + 2 and handle.alive


def test_seeded_sampling_is_reproduced_across_a_verifier_death(runtime):
    params = SamplingParams(temperature=1.0, top_p=0.95, max_new_tokens=N, seed=2**64 - 1)
    calm = runtime.engine.generate(PROMPTS, params, drafter="random")
    handle = runtime.verifier
    outs = _run_killing(runtime, lambda: ray.kill(handle.actor, no_restart=True), drafter="random",
                        sampling=params)
    assert [o.token_ids for o in outs] == [o.token_ids for o in calm]
    plain = runtime.engine.generate(PROMPTS, params, drafter=None)
    assert [o.token_ids for o in plain] == [o.token_ids for o in calm]


# ---- failures while rounds run through the compiled graph --------------------------------
def _run_compiled_then(runtime, fail, drafter="random"):
    """Step until rounds run compiled, call ``fail()``, finish; outputs in prompt order."""
    engine = runtime.engine
    deadline = time.monotonic() + 120  # an earlier test may have restarted the drafter
    while not runtime.drafters[drafter]._ready():
        assert time.monotonic() < deadline, "drafter did not come back"
        time.sleep(0.2)
    ids = [engine.submit(p, SamplingParams(max_new_tokens=N), drafter=drafter) for p in PROMPTS]
    done = {}
    while runtime.executor.compiled_rounds == 0 or runtime.executor._compiled is None:
        assert engine.has_work, "no round ran compiled"
        done.update((o.request_id, o) for o in engine.step())
    fail()
    while engine.has_work:
        done.update((o.request_id, o) for o in engine.step())
    engine.idle()
    return [done[i] for i in ids]


@pytest.fixture
def fresh_counters(runtime):
    runtime.executor.compiled_rounds = 0
    return runtime


def test_compiled_round_survives_drafter_death(fresh_counters, expected):
    runtime = fresh_counters
    handle = runtime.drafters["random"]
    before = handle.restarts
    outs = _run_compiled_then(runtime, lambda: ray.kill(handle.actor, no_restart=True))
    assert [o.token_ids for o in outs] == [expected(p) for p in PROMPTS]
    assert handle.restarts == before + 1


def test_compiled_round_survives_verifier_death(fresh_counters, expected):
    runtime = fresh_counters
    handle = runtime.verifier
    before = handle.restarts
    outs = _run_compiled_then(runtime, lambda: ray.kill(handle.actor, no_restart=True))
    assert [o.token_ids for o in outs] == [expected(p) for p in PROMPTS]
    assert handle.restarts == before + 1


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "plain"])
def test_hung_drafter_times_out_and_loses_nothing(fresh_counters, expected, compiled):
    """A drafter that stops answering (SIGSTOP) is given up after its timeout and
    replaced; the requests finish exactly."""
    import os
    import signal

    runtime = fresh_counters
    handle, verifier = runtime.drafters["random"], runtime.verifier
    saved = handle.call_timeout_s, verifier.call_timeout_s
    handle.call_timeout_s, verifier.call_timeout_s = 2.0, 5.0
    runtime.executor.compiled_graph = compiled
    before = handle.restarts

    pid = None

    def hang():
        nonlocal pid
        if not compiled:  # run plain rounds from here on
            runtime.engine.idle()
            runtime.executor.compiled_graph = False
        pid = handle.info["pid"]  # the actor as of now (earlier tests restarted it)
        os.kill(pid, signal.SIGSTOP)

    try:
        runtime.executor.compiled_graph = True
        outs = _run_compiled_then(runtime, hang)
    finally:
        handle.call_timeout_s, verifier.call_timeout_s = saved
        runtime.executor.compiled_graph = True
        if pid is not None:
            try:
                os.kill(pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
    assert [o.token_ids for o in outs] == [expected(p) for p in PROMPTS]
    assert handle.restarts >= before + 1


def test_seeded_request_through_grpc_is_reproduced_across_a_verifier_death(runtime, models):
    """The API path on Ray: a seeded sampled stream whose verifier is killed after its
    first chunk gives exactly the tokens of the undisturbed unary call."""
    from specfleet.core.config import ServerConfig
    from specfleet.models.loading import load_tokenizer
    from specfleet.proto.client import Client
    from specfleet.router.server import ServerThread

    backend = runtime.backend()
    engine, step = runtime.engine, runtime.engine.step

    def slow_step():  # a round every >= 50 ms: the stream is still running when the kill lands
        time.sleep(0.05)
        return step()

    kwargs = dict(max_new_tokens=N, temperature=0.8, top_k=30, seed=2**64 - 2, drafter="random")
    restarts = runtime.verifier.restarts
    prompt = PROMPTS[0]
    try:
        with ServerThread(backend, load_tokenizer(str(models["target"])), ServerConfig(port=0)) as server:
            with Client(server.address, timeout=120) as client:
                calm = client.generate(prompt, **kwargs)
                plain = client.generate(prompt, speculate=False, **kwargs)
                tokens, killed = [], False
                engine.step = slow_step
                for chunk in client.stream(prompt, **kwargs):
                    tokens += chunk.token_ids
                    if not killed:
                        ray.kill(runtime.verifier.actor, no_restart=True)
                        killed = True
    finally:
        engine.__dict__.pop("step", None)
        # The runtime is shared by the module: stop only the engine thread.
        backend._closed.set()
        backend._inbox.put(("stop", None))
        backend._thread.join(30)
    assert killed and calm.seed == 2**64 - 2 and runtime.verifier.restarts == restarts + 1
    assert tokens == calm.token_ids == plain.token_ids and tokens


def test_n_failures_within_t_end_requests_unavailable_and_serving_goes_on(runtime, models, expected):
    """A verifier group that fails restart_max_failures times within restart_window_s
    (every replacement dies at once) is given up: the request in flight ends with
    UNAVAILABLE and a short message, a new one too (fast, without restarting again);
    once the budget allows, the group comes back and serves exactly."""
    import grpc

    from specfleet.cluster.supervisor import RestartBudget
    from specfleet.core.config import ServerConfig
    from specfleet.models.loading import load_tokenizer
    from specfleet.proto.client import Client, RetryPolicy, SpecFleetError
    from specfleet.router.server import ServerThread

    handle = runtime.verifier
    supervisor = handle.supervisor
    real, saved_budget = supervisor._spawn, supervisor.budget
    spawned = []

    def spawn_dead():  # every replacement dies as it appears
        actor = real()
        spawned.append(actor)
        ray.kill(actor, no_restart=True)
        return actor

    backend = runtime.backend()
    prompt = PROMPTS[0]
    try:
        with ServerThread(backend, load_tokenizer(str(models["target"])), ServerConfig(port=0)) as server:
            with Client(server.address, timeout=120, retry=RetryPolicy(attempts=1)) as client:
                assert client.generate(prompt, max_new_tokens=N, drafter="random").token_ids == expected(prompt)
                supervisor.budget = RestartBudget(max_failures=3, window_s=300.0, backoff_s=0.1)
                supervisor._spawn = spawn_dead
                ray.kill(handle.actor, no_restart=True)
                with pytest.raises(SpecFleetError) as err:
                    client.generate(prompt, max_new_tokens=N, drafter="random")
                assert err.value.code == grpc.StatusCode.UNAVAILABLE
                assert "verifier group 0 is unavailable" in err.value.message
                assert len(err.value.message) < 200 and "Traceback" not in err.value.message
                assert len(spawned) == 2 and supervisor.budget.recent() == 3  # loss + 2 failed starts
                start = time.monotonic()
                with pytest.raises(SpecFleetError) as again:  # given up: no new restart
                    client.generate(prompt, max_new_tokens=N, drafter="random")
                assert again.value.code == grpc.StatusCode.UNAVAILABLE
                assert len(spawned) == 2 and time.monotonic() - start < 10
                assert client.health() == "SERVING"
                # The window passes (a fresh budget stands in for 300 s): the group comes back.
                supervisor._spawn = real
                supervisor.budget = saved_budget
                out = client.generate(prompt, max_new_tokens=N, drafter="random")
                assert out.token_ids == expected(prompt)
    finally:
        supervisor._spawn, supervisor.budget = real, saved_budget
        backend._closed.set()
        backend._inbox.put(("stop", None))
        backend._thread.join(30)
    assert handle.alive
