"""The OpenAI-compatible HTTP API on loopback, driven by the official ``openai`` client.

The ``stack`` fixture (conftest.py) serves gRPC and HTTP from one servicer over the
in-process engine with the tiny zoo. Invariants: greedy output through HTTP is the
gRPC SDK's and the target's own Hugging Face ``generate``, token for token, for
completions and chat (whose prompt is the tokenizer's chat template); streaming joins
to the whole response; every bad request gets OpenAI's error JSON with the right
status and ``param``, and the server keeps serving; a client that goes away cancels
its request in the engine.
"""

from __future__ import annotations

import dataclasses
import json
import time

import httpx
import openai
import pytest

from specfleet.client import Client

pytestmark = pytest.mark.integration

PROMPTS = ["def fibonacci(n):\n    ", "The quick brown fox", '{"name": "alice", "id": ']
CHAT = [{"role": "system", "content": "You write Python."},
        {"role": "user", "content": "def add(a, b):"}]
NEW_TOKENS = 16
GREEDY = dict(temperature=0, max_tokens=NEW_TOKENS, extra_body={"return_token_ids": True})


@pytest.fixture(scope="module")
def oai(stack):
    with openai.OpenAI(base_url=f"{stack.http_url}/v1", api_key="unused", max_retries=0,
                       timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def sdk(stack):
    with Client(stack.server.address, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def model(stack):
    return stack.cfg.models.target


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def test_models_and_health(stack, oai, model):
    assert [m.id for m in oai.models.list().data] == [model]
    assert oai.models.retrieve(model).id == model
    with pytest.raises(openai.NotFoundError) as err:
        oai.models.retrieve("gpt-4o")
    assert err.value.body["code"] == "model_not_found"
    assert httpx.get(f"{stack.http_url}/health").json() == {"status": "ok"}


@pytest.mark.parametrize("drafter", ["general", "code", "ngram", "suffix", None])
def test_greedy_completion_is_the_sdks_and_hf(stack, oai, sdk, model, drafter):
    spec = {"drafter": drafter} if drafter else {"disable": True}
    for prompt in PROMPTS:
        expected = stack.expected(prompt)
        got = oai.completions.create(model=model, prompt=prompt, temperature=0,
                                     max_tokens=NEW_TOKENS,
                                     extra_body={"return_token_ids": True, "speculation": spec})
        grpc_result = sdk.generate(prompt, max_new_tokens=NEW_TOKENS, drafter=drafter,
                                   speculate=drafter is not None)
        choice = got.choices[0]
        assert choice.token_ids == expected == grpc_result.token_ids, (prompt, drafter)
        assert choice.text == grpc_result.text
        assert choice.finish_reason in ("length", "stop")
        assert got.usage.prompt_tokens == len(stack.tokenizer.encode(prompt))
        assert got.usage.completion_tokens == len(expected)
        assert got.usage.total_tokens == got.usage.prompt_tokens + got.usage.completion_tokens
        assert got.id.startswith("cmpl-") and got.object == "text_completion"
        stats = got.speculation
        assert stats["emitted"] == len(expected)
        if drafter is None:
            assert stats["drafted"] == 0 and stats["drafters"] == {}
        elif stats["drafted"]:
            assert set(stats["drafters"]) == {drafter}
            assert stats["accepted"] == sum(stats["position_accepted"])
            assert stats["drafted"] == sum(stats["position_drafted"])


def test_chat_uses_the_template_and_is_the_targets_greedy_output(stack, oai, sdk, model):
    from specfleet.router.chat import render_chat

    ids = render_chat(stack.tokenizer, CHAT)
    bos = stack.tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1  # the template's BOS, not doubled
    assert stack.tokenizer.decode(ids).endswith("user: def add(a, b):\nassistant:")
    expected = stack.expected_ids(ids)
    got = oai.chat.completions.create(model=model, messages=CHAT, **GREEDY)
    choice = got.choices[0]
    assert choice.token_ids == expected == sdk.generate(ids, max_new_tokens=NEW_TOKENS).token_ids
    assert choice.message.role == "assistant"
    assert choice.message.content == stack.tokenizer.decode(expected, skip_special_tokens=True)
    assert got.usage.prompt_tokens == len(ids) and got.object == "chat.completion"
    # Content as a list of text parts means the same.
    parts = [{**m, "content": [{"type": "text", "text": m["content"]}]} for m in CHAT]
    again = oai.chat.completions.create(model=model, messages=parts, **GREEDY)
    assert again.choices[0].token_ids == expected


def test_streaming_chat_joins_to_the_whole_response(stack, oai, model):
    whole = oai.chat.completions.create(model=model, messages=CHAT, **GREEDY)
    chunks = list(oai.chat.completions.create(model=model, messages=CHAT, stream=True,
                                              stream_options={"include_usage": True}, **GREEDY))
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == whole.choices[0].message.content
    tokens = [t for c in chunks if c.choices for t in (c.choices[0].token_ids or [])]
    assert tokens == whole.choices[0].token_ids
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finished) == 1 and finished[0].choices[0].finish_reason == whole.choices[0].finish_reason
    assert finished[0].speculation["emitted"] == len(tokens)
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"


def test_streaming_completion_with_a_stop_sequence(stack, oai, model):
    prompt = PROMPTS[0]
    full = stack.tokenizer.decode(stack.expected(prompt), skip_special_tokens=True)
    stop = full.strip()[len(full.strip()) // 2:][:3]
    kwargs = dict(model=model, prompt=prompt, temperature=0, max_tokens=NEW_TOKENS, stop=[stop])
    whole = oai.completions.create(**kwargs)
    assert whole.choices[0].text == full[:full.index(stop)]
    assert whole.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in oai.completions.create(stream=True, **kwargs))
    assert streamed == whole.choices[0].text


def test_seeded_sampling_is_the_sdks(oai, sdk, model):
    kwargs = dict(temperature=0.9, top_p=0.95, seed=1234)
    got = oai.completions.create(model=model, prompt=PROMPTS[1], max_tokens=12,
                                 extra_body={"return_token_ids": True, "top_k": 50}, **kwargs)
    grpc_result = sdk.generate(PROMPTS[1], max_new_tokens=12, top_k=50, **kwargs)
    assert got.choices[0].token_ids == grpc_result.token_ids and got.seed == 1234
    unseeded = oai.completions.create(model=model, prompt=PROMPTS[1], max_tokens=8)
    assert isinstance(unseeded.seed, int)  # OpenAI's default temperature is 1: sampled


def _bad(model: str, limit: int, context: int):
    """(request arguments, HTTP status, param) of requests that must be refused."""
    ok = dict(model=model, prompt="hello", max_tokens=4)
    return [
        ({**ok, "model": "gpt-4o"}, 404, "model"),
        ({**ok, "max_tokens": -3}, 400, "max_tokens"),
        ({**ok, "max_tokens": 0}, 400, "max_tokens"),
        ({**ok, "max_tokens": limit + 1}, 400, "max_tokens"),
        ({**ok, "max_tokens": 2**40}, 400, "max_tokens"),
        ({**ok, "extra_body": {"frobnicate": 1}}, 400, "frobnicate"),
        ({**ok, "extra_body": {"speculation": {"drafter": "nope"}}}, 400, "speculation.drafter"),
        ({**ok, "extra_body": {"speculation": {"dratfer": "code"}}}, 400, "speculation.dratfer"),
        ({**ok, "extra_body": {"top_k": -1}}, 400, "top_k"),
        ({**ok, "temperature": -0.5}, 400, "temperature"),
        ({**ok, "top_p": 1.5}, 400, "top_p"),
        ({**ok, "stop": [""]}, 400, "stop"),
        ({**ok, "n": 2}, 400, "n"),
        ({**ok, "presence_penalty": 0.5}, 400, "presence_penalty"),
        ({**ok, "logprobs": 2}, 400, "logprobs"),
        ({**ok, "seed": -1}, 400, "seed"),
        ({**ok, "prompt": ""}, 400, "prompt"),
        ({**ok, "prompt": [1, -1]}, 400, "prompt"),
        ({**ok, "prompt": [1, 2**40]}, 400, "prompt.1"),
        ({**ok, "prompt": [[1, 2**40]]}, 400, "prompt.0.1"),
        ({**ok, "prompt": ["a", "b"]}, 400, "prompt"),
        ({**ok, "prompt": [1] * context}, 400, "prompt"),
        ({**ok, "prompt": "x", "extra_body": {"prompt": {"a": 1}}}, 400, "prompt"),
    ]


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(stack, oai, sdk, model):
    info = sdk.info()
    for kwargs, status, param in _bad(model, info.limits.max_new_tokens, info.limits.max_seq_len):
        for stream in (False, True):  # refused before a stream starts: an HTTP error too
            with pytest.raises(openai.APIStatusError) as err:
                oai.completions.create(stream=stream, **kwargs)
            assert err.value.status_code == status, (kwargs, err.value.body)
            body = err.value.body
            assert body["param"] == param, (kwargs, body)
            assert body["type"] == "invalid_request_error" and len(body["message"]) < 700
            if status == 404:
                assert body["code"] == "model_not_found"
    chat_cases = [
        (dict(messages=[]), "messages"),
        (dict(messages=[{"role": "wizard", "content": "hi"}]), "messages.0.role"),
        (dict(messages=CHAT, max_completion_tokens=-1), "max_completion_tokens"),
        (dict(messages=CHAT, max_tokens=-1), "max_tokens"),
        (dict(messages=CHAT, max_tokens=4, extra_body={"tools": []}), "tools"),
    ]
    for kwargs, param in chat_cases:
        with pytest.raises(openai.BadRequestError) as err:
            oai.chat.completions.create(model=model, **kwargs)
        assert err.value.body["param"] == param, (kwargs, err.value.body)
    # What the openai client cannot send: bodies that are not JSON, unknown routes.
    raw = httpx.post(f"{stack.http_url}/v1/completions", content=b"{not json",
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    big = httpx.post(f"{stack.http_url}/v1/completions",
                     content=b" " * (stack.cfg.server.max_message_bytes + 1))
    assert big.status_code == 413 and "error" in big.json()
    missing = httpx.get(f"{stack.http_url}/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    got = oai.completions.create(model=model, prompt=PROMPTS[2], **GREEDY)
    assert got.choices[0].token_ids == stack.expected(PROMPTS[2])
    assert wait_until(lambda: not stack.backend.active_request_ids())


def test_bearer_token_is_the_grpcs(stack, model):
    from specfleet.router.server import ServerThread

    config = dataclasses.replace(stack.cfg.server, auth_token="s3cret", served_model_name="tiny")
    with ServerThread(stack.backend, stack.tokenizer, config, http_port=0) as server:
        url = f"{server.server.http.url}/v1"
        model = "tiny"  # served_model_name: the name clients use instead of models.target
        with openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0) as client:
            assert [m.id for m in client.models.list().data] == ["tiny"]
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model=stack.cfg.models.target, prompt="hi", max_tokens=2)
        with openai.OpenAI(base_url=url, api_key="wrong", max_retries=0) as client:
            with pytest.raises(openai.AuthenticationError) as err:
                client.completions.create(model=model, prompt="hi", max_tokens=2)
            assert err.value.body["code"] == "invalid_api_key"
        missing = httpx.post(f"{url}/completions", json={"model": model, "prompt": "hi"})
        assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
        with openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0) as client:
            assert client.completions.create(model=model, prompt="hi", max_tokens=2).usage
        assert httpx.get(f"{server.server.http.url}/health").status_code == 200
        with Client(server.address, token="s3cret", timeout=30) as grpc_client:
            assert grpc_client.generate("hi", max_new_tokens=2).usage.completion_tokens >= 1


@pytest.fixture
def slow_engine(stack):
    engine = stack.backend.engine
    step = engine.step

    def slow_step():
        time.sleep(0.05)
        return step()

    engine.step = slow_step
    yield
    del engine.step


def test_a_client_that_goes_away_cancels_its_request(stack, model, slow_engine):
    body = {"model": model, "prompt": PROMPTS[1], "max_tokens": 100, "temperature": 0,
            "speculation": {"disable": True}}
    with httpx.Client(base_url=stack.http_url, timeout=30) as client:
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as events:
            lines = events.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"][0]["finish_reason"] is None
            assert len(stack.backend.active_request_ids()) == 1
    assert wait_until(lambda: not stack.backend.active_request_ids())
    # A whole (non-streamed) completion whose client times out is cancelled as well.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{stack.http_url}/v1/completions", json=body, timeout=0.5)
    assert wait_until(lambda: not stack.backend.active_request_ids())


def test_the_concurrency_limit_is_a_429_on_both_apis(stack, model, slow_engine):
    from specfleet.client import SpecFleetError
    from specfleet.router.server import ServerThread

    config = dataclasses.replace(stack.cfg.server, max_concurrent_requests=1)
    with ServerThread(stack.backend, stack.tokenizer, config, http_port=0) as server:
        url = f"{server.server.http.url}/v1"
        with openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=30) as client:
            holding = client.completions.create(model=model, prompt="hi", max_tokens=50,
                                                stream=True, extra_body={"speculation": {"disable": True}})
            next(iter(holding))  # the one slot is taken while this stream runs
            with pytest.raises(openai.RateLimitError) as err:
                client.completions.create(model=model, prompt="hi", max_tokens=2)
            assert err.value.body["code"] == "rate_limit_exceeded"
            with Client(server.address, timeout=30) as grpc_client, \
                    pytest.raises(SpecFleetError) as grpc_err:
                grpc_client.generate("hi", max_new_tokens=2)  # the limit is shared
            assert grpc_err.value.code.name == "RESOURCE_EXHAUSTED"
            holding.close()
        assert wait_until(lambda: not stack.backend.active_request_ids())


# ---- fuzzing the request body through the real server ------------------------------------------
def _bodies(model: str):
    from hypothesis import strategies as st

    scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                        st.integers(-3, 40), st.floats(allow_nan=False), st.text(max_size=20))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
    fields = {
        "model": st.sampled_from([model, "other"]) | st.text(max_size=10) | values,
        "prompt": st.text(max_size=40) | st.lists(st.integers(-5, 1100), max_size=20) | values,
        "messages": st.lists(st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "assistant", "bot"]),
             "content": st.text(max_size=30) | values}), max_size=3) | values,
        "max_tokens": st.integers(-2, 8) | values, "temperature": st.floats() | values,
        "top_p": st.floats() | values, "top_k": st.integers(-2, 60) | values,
        "seed": st.integers(-1, 2**64) | values, "stop": st.lists(st.text(max_size=4), max_size=3) | values,
        "n": st.integers(0, 2) | values, "stream": st.booleans() | values,
        "speculation": st.fixed_dictionaries({}, optional={
            "drafter": st.sampled_from(["code", "ngram", "nope"]) | values,
            "max_draft_length": st.integers(-1, 10) | values, "disable": st.booleans() | values,
        }) | values,
        "frobnicate": values,
    }

    @st.composite
    def build(draw):
        chosen = draw(st.lists(st.sampled_from(sorted(fields)), unique=True, max_size=8))
        return draw(st.sampled_from(["/v1/completions", "/v1/chat/completions"])), {
            key: draw(fields[key]) for key in chosen}

    return build()


def test_fuzzed_bodies_get_a_result_or_a_client_error_never_a_500(stack, model):
    import os

    from hypothesis import HealthCheck, given, settings

    examples = int(os.environ.get("FUZZ_EXAMPLES", "0"))
    with httpx.Client(base_url=stack.http_url, timeout=60) as client:

        @settings(max_examples=examples or 80, derandomize=not examples, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(_bodies(model))
        def check(case):
            path, body = case
            if body.get("stream") is True and isinstance(body.get("max_tokens"), int):
                body["max_tokens"] = min(body["max_tokens"], 8)
            # Python's json writes NaN/Infinity, which some clients send and the server must refuse.
            got = client.post(path, content=json.dumps(body),
                              headers={"content-type": "application/json"})
            assert got.status_code in (200, 400, 404), (got.status_code, got.text[:300], body)
            if got.status_code != 200:
                error = got.json()["error"]
                assert error["type"] == "invalid_request_error" and len(error["message"]) < 700
            elif not body.get("stream"):
                assert got.json()["choices"][0]["finish_reason"] in ("length", "stop")

        check()
    assert wait_until(lambda: not stack.backend.active_request_ids())
