"""The HTTP API's failure behaviour, against the scripted backend (no models).

A backend failure before the first token is a 500 with an id (streamed or not), one
after it an error event inside the stream, then ``[DONE]``; a hung request whose
client gives up is cancelled; TLS and the bearer token work as over gRPC; and the
server keeps serving after each.
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from specfleet.core.config import ServerConfig
from specfleet.router.server import ServerThread
from specfleet.testing.scripted_backend import REPLY, ByteTokenizer, ScriptedBackend, self_signed

pytestmark = pytest.mark.integration


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def backend():
    return ScriptedBackend()


@pytest.fixture
def server(backend):
    with ServerThread(backend, ByteTokenizer(), ServerConfig(port=0), http_port=0) as srv:
        yield srv


def body(prompt: str, **extra) -> dict:
    return {"model": "scripted", "prompt": prompt, "max_tokens": 64, "temperature": 0, **extra}


def test_backend_failures_are_500s_with_an_id_and_the_server_keeps_serving(server, backend):
    url = f"{server.server.http.url}/v1/completions"
    for prompt in ("fail", "crash"):
        for stream in (False, True):
            got = httpx.post(url, json=body(prompt, stream=stream), timeout=10)
            assert got.status_code == 500, (prompt, stream, got.text)
            error = got.json()["error"]
            assert error["type"] == "server_error" and error["message"].startswith("internal error [")
            assert "Traceback" not in error["message"]
    ok = httpx.post(url, json=body("hi"), timeout=10).json()
    assert ok["choices"][0]["text"] == REPLY and ok["choices"][0]["finish_reason"] == "stop"
    assert ok["speculation"]["drafted"] == 6 and ok["speculation"]["drafters"] == {"d1": 3}
    assert not backend.active


def test_a_failure_after_the_first_token_is_an_error_event(server):
    url = f"{server.server.http.url}/v1/completions"
    with httpx.stream("POST", url, json=body("late-fail", stream=True), timeout=10) as events:
        assert events.status_code == 200
        data = [line[6:] for line in events.iter_lines() if line.startswith("data: ")]
    assert json.loads(data[0])["choices"][0]["text"] == "par"
    assert json.loads(data[-2])["error"]["type"] == "server_error" and data[-1] == "[DONE]"
    with openai.OpenAI(base_url=f"{server.server.http.url}/v1", api_key="x", max_retries=0) as c:
        with pytest.raises(openai.APIError, match="verifier lost"):
            list(c.completions.create(model="scripted", prompt="late-fail", stream=True))


def test_a_hung_request_is_cancelled_when_its_client_gives_up(server, backend):
    url = f"{server.server.http.url}/v1/completions"
    for stream in (False, True):
        with pytest.raises(httpx.ReadTimeout):
            with httpx.stream("POST", url, json=body("hang", stream=stream), timeout=0.5) as r:
                r.read()
        assert wait_until(lambda: not backend.active), stream
    assert backend.started == 2
    assert httpx.post(url, json=body("hi"), timeout=10).status_code == 200


def test_tls_with_auth(backend, tmp_path):
    pytest.importorskip("cryptography")
    cert, key = self_signed(tmp_path)
    cfg = ServerConfig(port=0, auth_token="t", tls_cert=str(cert), tls_key=str(key))
    with ServerThread(backend, ByteTokenizer(), cfg, http_port=0) as srv:
        url = srv.server.http.url
        assert url.startswith("https://")
        with httpx.Client(verify=str(cert), timeout=10) as http:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="t", http_client=http, max_retries=0)
            assert client.completions.create(model="scripted", prompt="hi",
                                             max_tokens=64).choices[0].text == REPLY
            with pytest.raises(openai.AuthenticationError):
                openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", http_client=http,
                              max_retries=0).models.list()
        with pytest.raises(httpx.HTTPError):  # no plaintext beside TLS
            httpx.get(url.replace("https://", "http://") + "/health", timeout=5)
