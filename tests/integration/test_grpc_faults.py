"""The gRPC server's failure behaviour, against a scripted in-memory backend.

No models: a byte-level test tokenizer (one token per UTF-8 byte, so every non-ASCII
character spans several tokens) and a backend whose replies are fixed by the
prompt (``specfleet.testing.scripted_backend``). This covers what a real engine makes slow or flaky to provoke: overload,
backend failures and crashes, hung requests hit by a deadline or a cancel, auth,
TLS, the CLI's exit codes, and that the server keeps serving after each.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import grpc
import pytest

from specfleet.client import AsyncClient, Client, RetryPolicy, SpecFleetError
from specfleet.core.config import ServerConfig
from specfleet.router.server import ServerThread
from specfleet.testing.scripted_backend import (
    REPLY,
    ByteTokenizer,
    ScriptedBackend,
    self_signed,
)

pytestmark = pytest.mark.integration


def wait_until(predicate, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture(scope="module")
def backend():
    return ScriptedBackend()


@pytest.fixture(scope="module")
def server(backend):
    cfg = ServerConfig(port=0, max_concurrent_requests=3, max_new_tokens_limit=100)
    with ServerThread(backend, ByteTokenizer(), cfg) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=10) as c:
        yield c


def test_multibyte_text_streams_whole_characters(client):
    chunks = list(client.stream("hi", max_new_tokens=100))
    assert all("\ufffd" not in c.text for c in chunks)  # no half characters, ever
    assert "".join(c.text for c in chunks) == REPLY
    assert chunks[-1].finish_reason == "eos" and chunks[-1].stats.drafters == {"d1": 3}
    assert sum(len(c.token_ids) for c in chunks) == len(REPLY.encode()) + 1
    assert client.generate("hi", max_new_tokens=100).text == REPLY


@pytest.mark.parametrize("stop", [" STOP", "ünï", "✓"])
def test_stop_sequence_never_reaches_the_client(client, stop):
    chunks = list(client.stream("hi", stop=[stop, "never-matches"], max_new_tokens=100))
    expected = REPLY[: REPLY.index(stop)]
    assert "".join(c.text for c in chunks) == expected
    assert chunks[-1].finish_reason == "stop"
    result = client.generate("hi", stop=stop, max_new_tokens=100)
    assert result.text == expected and result.finish_reason == "stop"
    # the tokens end with the one that completed the stop (HF semantics)
    assert bytes(result.token_ids).decode().endswith(stop)


def test_length_cut_mid_character_still_matches_unary(client):
    n = len("hé".encode()) - 1  # ends inside "é"
    result = client.generate("hi", max_new_tokens=n)
    chunks = list(client.stream("hi", max_new_tokens=n))
    assert result.finish_reason == "length" and len(result.token_ids) == n
    assert "".join(c.text for c in chunks) == result.text == "h\ufffd"


def test_backend_error_is_internal_logged_once_and_server_keeps_serving(client, caplog):
    for prompt in ("fail", "crash"):
        caplog.clear()
        with caplog.at_level("INFO"):
            with pytest.raises(SpecFleetError) as err:
                client.generate(prompt)
            assert err.value.code == grpc.StatusCode.INTERNAL
            # Short and stable: an error id to find the log line, no traceback.
            assert err.value.message.startswith("internal error [") and len(err.value.message) < 300
            assert "Traceback" not in err.value.message
            with pytest.raises(SpecFleetError) as err:
                list(client.stream(prompt))
            assert err.value.code == grpc.StatusCode.INTERNAL
        errors = [r for r in caplog.records if r.levelname == "ERROR"]
        error_id = err.value.message.split("[")[1].split("]")[0]
        assert error_id in errors[-1].getMessage()  # the log line carries the same id
        assert [r.getMessage().split(" failed")[0] for r in errors] == ["Generate", "GenerateStream"]
    assert client.generate("hi", max_new_tokens=3).text == "hé"


def test_overload_is_resource_exhausted(server, backend, client):
    backend.release.clear()
    done: list = []

    def slow():
        with Client(server.address, timeout=10) as c:
            done.append(c.generate("slow", max_new_tokens=3).text)

    threads = [threading.Thread(target=slow) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        assert wait_until(lambda: len(backend.active) == 3)
        with pytest.raises(SpecFleetError) as err:
            client.generate("hi")
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        backend.release.set()
        for t in threads:
            t.join(10)
    assert done == ["hé"] * 3
    assert client.generate("hi", max_new_tokens=1).text == "h"


def test_deadline_and_cancel_stop_the_backend_request(client, backend):
    t0 = time.monotonic()
    with pytest.raises(SpecFleetError) as err:
        client.generate("hang", timeout=0.3)
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - t0 < 3
    assert wait_until(lambda: not backend.active)

    with pytest.raises(SpecFleetError) as err:
        list(client.stream("hang", timeout=0.3))
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_until(lambda: not backend.active)

    stream = client.stream("hi", max_new_tokens=100)
    next(stream)
    stream.close()  # the consumer leaves early: the call is cancelled


def test_cancel_of_hung_stream_frees_it(server, backend):
    async def scenario():
        async with AsyncClient(server.address) as c:
            task = asyncio.create_task(c.generate("hang"))
            for _ in range(500):
                if backend.active:
                    break
                await asyncio.sleep(0.01)
            assert backend.active
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())
    assert wait_until(lambda: not backend.active)


def test_cancel_of_a_flooding_stream_frees_it(client, backend):
    for _ in range(3):
        stream = client.stream("flood", timeout=10)
        assert [next(stream).text for _ in range(3)] == ["spam "] * 3
        assert backend.active
        stream.close()
        assert wait_until(lambda: not backend.active)


def test_duplicate_request_id_in_flight_is_rejected(server, backend, client):
    backend.release.clear()
    t = threading.Thread(target=lambda: client.generate("slow", request_id="same"))
    t.start()
    try:
        assert wait_until(lambda: "same" in backend.active)
        with pytest.raises(SpecFleetError) as err:
            client.generate("hi", request_id="same")
        assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
        assert "request_id" in err.value.message
    finally:
        backend.release.set()
        t.join(10)
    assert client.generate("hi", request_id="same", max_new_tokens=1).request_id == "same"


def test_info_health_and_async_client(server, client):
    info = client.info()
    assert info.vocab_size == 257 and [d.name for d in info.drafters] == ["d1"]
    assert info.limits.max_new_tokens == 100 and info.limits.max_concurrent_requests == 3
    assert client.health() == "SERVING"

    async def scenario():
        async with AsyncClient(server.address) as c:
            result = await c.generate("hi", max_new_tokens=100)
            chunks = [ch async for ch in c.stream("hi", max_new_tokens=100)]
            return result, chunks, await c.health(), await c.info()

    result, chunks, health, ainfo = asyncio.run(scenario())
    assert result.text == REPLY == "".join(c.text for c in chunks)
    assert health == "SERVING" and ainfo == info


def test_unreachable_server_retries_then_raises_unavailable():
    policy = RetryPolicy(attempts=3, initial_backoff=0.05)
    t0 = time.monotonic()
    with Client("127.0.0.1:1", retry=policy, timeout=5) as c, pytest.raises(SpecFleetError) as err:
        c.generate("hi")
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert time.monotonic() - t0 >= 0.05  # it backed off at least once


# ---- auth and TLS ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def auth_server(backend):
    cfg = ServerConfig(port=0, auth_token="s3cret")
    with ServerThread(backend, ByteTokenizer(), cfg) as srv:
        yield srv


@pytest.mark.parametrize("token", [None, "wrong"])
def test_auth_rejects_missing_or_wrong_token(auth_server, token):
    with Client(auth_server.address, token=token, timeout=5) as c:
        for call in (lambda: c.generate("hi"), lambda: list(c.stream("hi")), c.info):
            with pytest.raises(SpecFleetError) as err:
                call()
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert c.health() == "SERVING"  # health checks need no token


def test_auth_accepts_the_token(auth_server):
    with Client(auth_server.address, token="s3cret", timeout=5) as c:
        assert c.generate("hi", max_new_tokens=3).text == "hé"
        assert c.info().target == "scripted"


def test_tls_with_auth(backend, tmp_path):
    pytest.importorskip("cryptography")
    cert, key = self_signed(tmp_path)
    cfg = ServerConfig(port=0, auth_token="t", tls_cert=str(cert), tls_key=str(key))
    with ServerThread(backend, ByteTokenizer(), cfg) as srv:
        with Client(srv.address, token="t", root_certs=cert, timeout=5) as c:
            assert c.generate("hi", max_new_tokens=3).text == "hé"
        plain = Client(srv.address, token="t", timeout=2, retry=RetryPolicy(attempts=1))
        with plain, pytest.raises(SpecFleetError) as err:
            plain.generate("hi")
        assert err.value.code == grpc.StatusCode.UNAVAILABLE


# ---- the CLI ----------------------------------------------------------------------------
def run_cli(argv, capsys):
    from specfleet.core.cli import main

    code = main(["--log-level", "warning", *argv])  # the server shares this process's logging
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_generate_prints_text_and_json(server, capsys):
    code, out, err = run_cli(["generate", "hi", "--server", server.address,
                              "--max-new-tokens", "100"], capsys)
    assert code == 0 and out == REPLY + "\n" and "finish=eos" in err
    code, out, _ = run_cli(["generate", "hi", "--server", server.address, "--stream",
                            "--stop", " STOP"], capsys)
    assert code == 0 and out == REPLY[: REPLY.index(" STOP")] + "\n"
    code, out, _ = run_cli(["generate", "hi", "--server", server.address, "--json",
                            "--max-new-tokens", "3"], capsys)
    assert code == 0 and json.loads(out)["text"] == "hé"
    code, out, _ = run_cli(["generate", "hi", "--server", server.address, "--json",
                            "--stream", "--max-new-tokens", "3"], capsys)
    lines = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and lines[-1]["finish_reason"] == "length"


@pytest.mark.parametrize(
    "extra, expected_code, message",
    [
        (["--max-new-tokens", "0"], 2, "sampling.max_new_tokens"),
        (["--temperature", "-1"], 2, "sampling.temperature"),
        (["--drafter", "nope"], 2, "speculation.drafter"),
    ],
)
def test_cli_errors_are_one_line_with_exit_codes(server, capsys, extra, expected_code, message):
    code, out, err = run_cli(["generate", "hi", "--server", server.address, *extra], capsys)
    assert code == expected_code and out == ""
    assert err.count("\n") == 1 and err.startswith("error: invalid_argument:") and message in err


def test_cli_unreachable_and_unauthenticated(auth_server, capsys):
    code, _, err = run_cli(["generate", "hi", "--server", "127.0.0.1:1", "--timeout", "2"], capsys)
    assert code == 3 and err.startswith("error: unavailable") and err.count("\n") == 1
    code, _, err = run_cli(["generate", "hi", "--server", auth_server.address], capsys)
    assert code == 4 and "missing bearer token" in err and "Traceback" not in err
    code, out, _ = run_cli(["generate", "hi", "--server", auth_server.address, "--token",
                            "s3cret", "--max-new-tokens", "3"], capsys)
    assert code == 0 and out == "hé\n"


@pytest.mark.parametrize("method", ["Generate", "GenerateStream"])
def test_malformed_body_is_invalid_argument_logged_once_without_traceback(server, client, caplog, method):
    body = b"\xff\xff\xff\xff\x0f"  # not a protobuf message: a truncated varint
    with grpc.insecure_channel(server.address) as channel:
        path = f"/specfleet.v1.SpecFleet/{method}"
        if method == "Generate":
            call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        else:
            call = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
        with caplog.at_level("INFO"):
            with pytest.raises(grpc.RpcError) as err:
                result = call(body, timeout=10)
                if method == "GenerateStream":
                    list(result)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("request: the body is not a valid message")
    mine = [r for r in caplog.records if "not a valid message" in r.getMessage()]
    assert len(mine) == 1 and mine[0].exc_info is None
    assert client.generate("hi", max_new_tokens=3).text == "hé"  # still serving
