"""End to end on loopback: SDK → gRPC server → in-process engine with the tiny zoo.

One server for the module (the ``stack`` fixture of conftest.py: configs/tiny.yaml
through ``make_backend``, exactly what ``specfleet serve --backend inprocess`` runs). The invariants: greedy output through
the API is the target's own Hugging Face ``generate`` output, token for token, for
every drafter and without one; streamed text joins to the unary text; cancels and
deadlines free the request in the engine; bad input is INVALID_ARGUMENT naming the
field and the server keeps serving.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import grpc
import pytest

from specfleet.client import AsyncClient, Client, SpecFleetError

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["def fibonacci(n):\n    ", "The quick brown fox", "import os\nimport sys\n",
           '{"name": "alice", "id": ']
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def client(stack):
    with Client(stack.server.address, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def expected(stack):
    return {p: stack.expected(p) for p in PROMPTS}


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.mark.parametrize("drafter", ["general", "code", "ngram", "suffix", None])
def test_greedy_output_is_the_targets_own(stack, client, expected, drafter):
    for prompt in PROMPTS:
        result = client.generate(prompt, max_new_tokens=NEW_TOKENS, drafter=drafter,
                                 speculate=drafter is not None)
        assert result.token_ids == expected[prompt], (prompt, drafter)
        assert result.text == stack.tokenizer.decode(result.token_ids, skip_special_tokens=True)
        assert result.usage.prompt_tokens == len(stack.tokenizer.encode(prompt))
        assert result.usage.completion_tokens == len(result.token_ids)
        assert result.finish_reason in ("length", "eos")
        if drafter is None:
            assert result.stats.drafted == 0
        elif result.stats.drafted:
            assert set(result.stats.drafters) == {drafter}
            assert result.stats.mean_acceptance_length >= 1.0


def test_stream_joins_to_the_unary_result(client, expected):
    prompt = PROMPTS[0]
    chunks = list(client.stream(prompt, max_new_tokens=NEW_TOKENS))
    result = client.generate(prompt, max_new_tokens=NEW_TOKENS)
    assert [t for c in chunks for t in c.token_ids] == expected[prompt] == result.token_ids
    assert "".join(c.text for c in chunks) == result.text
    assert [c.finish_reason is not None for c in chunks].count(True) == 1
    assert chunks[-1].usage == result.usage and chunks[-1].stats.rounds > 0


def test_token_id_prompt_and_stop_sequence(stack, client, expected):
    prompt = PROMPTS[0]
    ids = stack.tokenizer.encode(prompt)
    assert client.generate(ids, max_new_tokens=NEW_TOKENS).token_ids == expected[prompt]
    full = stack.tokenizer.decode(expected[prompt], skip_special_tokens=True)
    stop = full.strip()[len(full.strip()) // 2:][:3]  # some text from the middle
    assume = full.index(stop)
    result = client.generate(prompt, max_new_tokens=NEW_TOKENS, stop=[stop])
    assert result.finish_reason == "stop" and result.text == full[:assume]
    assert "".join(c.text for c in client.stream(prompt, max_new_tokens=NEW_TOKENS,
                                                 stop=[stop])) == full[:assume]


def test_sampling_with_a_seed_is_reproducible(client):
    kwargs = dict(max_new_tokens=12, temperature=0.9, top_k=50, top_p=0.95, seed=1234)
    first = client.generate(PROMPTS[1], **kwargs)
    assert client.generate(PROMPTS[1], drafter="ngram", **kwargs).token_ids == first.token_ids


def test_32_concurrent_streams_all_complete_correctly(stack, expected):
    async def one(client: AsyncClient, prompt: str) -> tuple[list[int], str]:
        tokens, text = [], ""
        async for chunk in client.stream(prompt, max_new_tokens=NEW_TOKENS):
            tokens += chunk.token_ids
            text += chunk.text
        return tokens, text

    async def scenario():
        async with AsyncClient(stack.server.address, timeout=120) as client:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(32)]
            return prompts, await asyncio.gather(*(one(client, p) for p in prompts))

    prompts, outputs = asyncio.run(scenario())
    for prompt, (tokens, text) in zip(prompts, outputs):
        assert tokens == expected[prompt]
        assert text == stack.tokenizer.decode(tokens, skip_special_tokens=True)
    assert wait_until(lambda: not stack.backend.active_request_ids())


@pytest.fixture
def slow_engine(stack):
    """Each engine round takes >= 50 ms, so a request is reliably still running when
    its deadline expires or its client goes away."""
    engine = stack.backend.engine
    step = engine.step

    def slow_step():
        time.sleep(0.05)
        return step()

    engine.step = slow_step
    yield
    del engine.step  # back to the class's method


class Watch:
    """Records whether ``request_id`` was ever active in the backend."""

    def __init__(self, backend, request_id):
        self.seen = False
        self._stop = threading.Event()

        def run():
            while not self._stop.is_set():
                self.seen = self.seen or request_id in backend.active_request_ids()
                time.sleep(0.005)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()


def test_deadline_frees_the_request(stack, client, slow_engine):
    for rid, call in [
        ("deadline-unary", lambda: client.generate(PROMPTS[0], max_new_tokens=100,
                                                   speculate=False, request_id="deadline-unary",
                                                   timeout=0.6)),
        ("deadline-stream", lambda: list(client.stream(PROMPTS[0], max_new_tokens=100,
                                                       speculate=False,
                                                       request_id="deadline-stream",
                                                       timeout=0.6))),
    ]:
        watch = Watch(stack.backend, rid)
        with pytest.raises(SpecFleetError) as err:
            call()
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
        assert wait_until(lambda rid=rid: rid not in stack.backend.active_request_ids())
        watch.stop()
        assert watch.seen, "the request never reached the engine"


def test_client_cancel_frees_the_request(stack, client, slow_engine):
    stream = client.stream(PROMPTS[1], max_new_tokens=100, speculate=False, request_id="cancel-1")
    first = next(stream)
    assert first.finish_reason is None
    assert "cancel-1" in stack.backend.active_request_ids()
    stream.close()  # leaving the loop cancels the call
    assert wait_until(lambda: "cancel-1" not in stack.backend.active_request_ids())


def test_engine_failure_is_internal_and_the_engine_keeps_serving(stack, client, expected):
    engine = stack.backend.engine
    step = engine.step
    failed = []

    def failing_once():
        if not failed:
            failed.append(True)
            raise RuntimeError("injected verifier failure")
        return step()

    engine.step = failing_once
    try:
        with pytest.raises(SpecFleetError) as err:
            client.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS)
    finally:
        del engine.step
    assert err.value.code == grpc.StatusCode.INTERNAL
    assert "injected verifier failure" in err.value.message
    assert client.generate(PROMPTS[0], max_new_tokens=NEW_TOKENS).token_ids == expected[PROMPTS[0]]
    assert not stack.backend.active_request_ids()


def _bad_requests(vocab: int, limit: int, context: int):
    return [
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt.token_ids"),
        ({"max_new_tokens": 0}, "sampling.max_new_tokens"),
        ({"max_new_tokens": -3}, "sampling.max_new_tokens"),
        ({"max_new_tokens": limit + 1}, "sampling.max_new_tokens"),
        ({"temperature": -0.5}, "sampling.temperature"),
        ({"temperature": float("nan")}, "sampling.temperature"),
        ({"temperature": float("inf")}, "sampling.temperature"),
        ({"top_p": 0.0}, "sampling.top_p"),
        ({"top_p": 1.5}, "sampling.top_p"),
        ({"top_k": -1}, "sampling.top_k"),
        ({"stop": [""]}, "sampling.stop"),
        ({"drafter": "nope"}, "speculation.drafter"),
        ({"drafter": "x" * 100_000}, "speculation.drafter"),  # answered in a short message
        ({"stop": ["a"] * 17}, "sampling.stop"),
        ({"stop": ["a" * 257]}, "sampling.stop"),
        ({"prompt": [1] * context}, "prompt"),
        ({"prompt": " ".join(str(i) for i in range(context))}, "prompt"),
        ({"prompt": [1, -1]}, "prompt.token_ids"),
        ({"prompt": [1, vocab]}, "prompt.token_ids"),
    ]


def test_bad_input_is_invalid_argument_and_the_server_keeps_serving(stack, client, expected):
    info = client.info()
    cases = _bad_requests(info.vocab_size, info.limits.max_new_tokens, info.limits.max_seq_len)
    for overrides, field in cases:
        kwargs = {"prompt": "hello", "max_new_tokens": 4, **overrides}
        for call in (client.generate, lambda **kw: list(client.stream(**kw))):
            with pytest.raises(SpecFleetError) as err:
                call(**kwargs)
            assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT, (overrides, err.value)
            assert err.value.message.startswith(field), (overrides, err.value.message)
            assert len(err.value.message) < 600, (field, len(err.value.message))  # never echoes unbounded input
    assert client.health() == "SERVING"
    result = client.generate(PROMPTS[2], max_new_tokens=NEW_TOKENS)
    assert result.token_ids == expected[PROMPTS[2]]
    assert not stack.backend.active_request_ids()


def test_info_health_and_reflection(stack, client):
    info = client.info()
    cfg = stack.cfg
    assert info.target == cfg.models.target
    assert [d.name for d in info.drafters] == [d.name for d in cfg.drafters]
    assert info.vocab_size == len(stack.tokenizer)
    assert info.limits.max_new_tokens == cfg.server.max_new_tokens_limit
    assert info.limits.max_seq_len == cfg.verifier.max_seq_len
    assert info.verifier_groups[0].device == "cpu"
    assert client.health() == "SERVING" and client.health("specfleet.v1.SpecFleet") == "SERVING"

    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    with grpc.insecure_channel(stack.server.address) as channel:
        db = ProtoReflectionDescriptorDatabase(channel)
        services = set(db.get_services())
        assert {"specfleet.v1.SpecFleet", "grpc.health.v1.Health"} <= services
        generate = db.FindFileContainingSymbol("specfleet.v1.SpecFleet")
        assert generate.package == "specfleet.v1"


# ---- seeded sampling through the API ---------------------------------------------------------
SAMPLED = [dict(temperature=0.7), dict(temperature=1.0, top_k=40, top_p=0.9)]


@pytest.mark.parametrize("params", SAMPLED, ids=["t0.7", "t1.0-topk-topp"])
def test_same_seed_same_tokens_through_the_api(stack, client, params):
    prompt, seed = PROMPTS[0], 2**64 - 1
    off = client.generate(prompt, max_new_tokens=NEW_TOKENS, seed=seed, speculate=False, **params)
    assert off.seed == seed and len(off.token_ids) >= 1
    for drafter in ["general", "code", "ngram", "suffix", None]:  # None: the router's choice
        for max_draft in [1, 3, 6, None]:
            got = client.generate(prompt, max_new_tokens=NEW_TOKENS, seed=seed, drafter=drafter,
                                  max_draft_length=max_draft, **params)
            assert got.token_ids == off.token_ids, (drafter, max_draft)

    async def crowd():  # among 32 concurrent requests (other prompts, other seeds)
        async with AsyncClient(stack.server.address, timeout=120) as aclient:
            others = [aclient.generate(PROMPTS[i % 4], max_new_tokens=NEW_TOKENS, seed=i, **params)
                      for i in range(31)]
            mine = aclient.generate(prompt, max_new_tokens=NEW_TOKENS, seed=seed, **params)
            return (await asyncio.gather(mine, *others))[0]

    assert asyncio.run(crowd()).token_ids == off.token_ids


def test_unseeded_request_returns_the_seed_that_reproduces_it(client):
    first = client.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS, temperature=1.0)
    assert first.seed is not None
    again = client.generate(PROMPTS[1], max_new_tokens=NEW_TOKENS, temperature=1.0, seed=first.seed)
    assert again.token_ids == first.token_ids
    chunks = list(client.stream(PROMPTS[1], max_new_tokens=NEW_TOKENS, temperature=1.0, seed=first.seed))
    assert chunks[-1].seed == first.seed and [t for c in chunks for t in c.token_ids] == first.token_ids
    assert client.generate(PROMPTS[1], max_new_tokens=4).seed is None  # greedy: no seed involved


# ---- fuzzing the request message through the real server --------------------------------------
def _requests():
    from hypothesis import strategies as st

    from specfleet.proto import specfleet_pb2 as pb

    floats = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                       st.sampled_from([0.0, 1e-300, 1e-40, 5e-324, 0.7, 1.0, 2.0, -1.0]))
    text = st.text(max_size=64)

    @st.composite
    def build(draw):
        req = pb.GenerateRequest()
        if draw(st.booleans()):
            req.text = draw(text)
        else:
            req.token_ids.ids.extend(draw(st.lists(st.integers(-3, 2**31 - 1) | st.integers(0, 600),
                                                   max_size=40)))
        s = req.sampling
        s.temperature = draw(floats)
        s.top_k = draw(st.integers(-5, 2**31 - 1) | st.integers(0, 50))
        if draw(st.booleans()):
            s.top_p = draw(floats)
        if draw(st.booleans()):
            s.seed = draw(st.integers(0, 2**64 - 1))
        if draw(st.booleans()):
            s.max_new_tokens = draw(st.integers(-(2**31), 2**31 - 1) | st.integers(-2, 8))
        else:
            s.max_new_tokens = 4
        s.stop.extend(draw(st.lists(st.text(max_size=300), max_size=20)))
        req.request_id = draw(st.text(max_size=200))
        spec = req.speculation
        spec.disable = draw(st.booleans())
        if draw(st.booleans()):
            spec.max_draft_length = draw(st.integers(0, 2**32 - 1) | st.integers(0, 10))
        spec.drafter = draw(st.sampled_from(["", "general", "code", "ngram", "suffix"]) | text)
        return req

    return build()


def test_fuzzed_requests_get_ok_or_a_client_error_never_internal(stack):
    import grpc as grpc_mod
    from hypothesis import HealthCheck, given, settings

    from specfleet.proto import specfleet_pb2_grpc as pb_grpc

    allowed = {grpc_mod.StatusCode.INVALID_ARGUMENT, grpc_mod.StatusCode.RESOURCE_EXHAUSTED}
    with grpc_mod.insecure_channel(stack.server.address) as channel:
        stub = pb_grpc.SpecFleetStub(channel)

        # Derandomized: CI runs the same 80 examples; FUZZ_EXAMPLES=N runs a longer random search.
        examples = int(os.environ.get("FUZZ_EXAMPLES", "0"))

        @settings(max_examples=examples or 80, derandomize=not examples, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(_requests())
        def check(request):
            try:
                stub.Generate(request, timeout=60)  # a hang shows up as DEADLINE_EXCEEDED
            except grpc_mod.RpcError as err:
                assert err.code() in allowed, (err.code(), err.details()[:300], request)
                assert len(err.details()) < 600

        check()
    assert wait_until(lambda: not stack.backend.active_request_ids())
