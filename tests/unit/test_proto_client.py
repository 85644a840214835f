"""The SDK's request building, result conversion and retry policy, without a server."""

from __future__ import annotations

import grpc
import pytest

from specfleet.client import RetryPolicy, SpecFleetError
from specfleet.proto import client as sdk
from specfleet.proto import specfleet_pb2 as pb


def test_text_and_token_prompts():
    req = sdk.build_request("hello")
    assert req.WhichOneof("prompt") == "text" and req.text == "hello"
    req = sdk.build_request([5, 6, 7])
    assert req.WhichOneof("prompt") == "token_ids" and list(req.token_ids.ids) == [5, 6, 7]
    # an empty id list is still a token prompt, so the server can say which field is wrong
    assert sdk.build_request([]).WhichOneof("prompt") == "token_ids"


def test_unset_options_stay_unset_on_the_wire():
    req = sdk.build_request("x")
    s = req.sampling
    assert not s.HasField("top_p") and not s.HasField("seed") and not s.HasField("max_new_tokens")
    assert s.temperature == 0.0 and s.top_k == 0 and list(s.stop) == []
    assert not req.speculation.disable and req.speculation.drafter == ""
    assert not req.speculation.HasField("max_draft_length") and req.request_id == ""


def test_every_option_reaches_the_wire():
    req = sdk.build_request(
        "x", max_new_tokens=9, temperature=0.7, top_k=40, top_p=0.9, seed=3, stop="\n\n",
        drafter="code", speculate=False, max_draft_length=0, request_id="r1",
    )
    s = req.sampling
    assert (s.max_new_tokens, s.temperature, s.top_k, s.top_p, s.seed) == (9, 0.7, 40, 0.9, 3)
    assert list(s.stop) == ["\n\n"]
    assert req.speculation.disable and req.speculation.drafter == "code"
    assert req.speculation.HasField("max_draft_length") and req.speculation.max_draft_length == 0
    assert req.request_id == "r1"


@pytest.mark.parametrize("kwargs", [{"seed": -1}, {"max_new_tokens": 2**40}, {"top_k": "many"}])
def test_values_the_wire_cannot_carry_raise_invalid_argument(kwargs):
    with pytest.raises(SpecFleetError) as err:
        sdk.build_request("x", **kwargs)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_result_and_chunk_conversion():
    msg = pb.GenerateResponse(
        request_id="r", text="hi", token_ids=[1, 2], finish_reason=pb.FINISH_REASON_EOS,
        usage=pb.Usage(prompt_tokens=3, completion_tokens=2),
        stats=pb.SpeculationStats(drafted=4, accepted=3, rounds=2, mean_acceptance_length=2.5,
                                  drafters={"ngram": 2}),
        timings=pb.Timings(total_ns=10, first_token_ns=5),
    )
    res = sdk.result_from_proto(msg)
    assert (res.text, res.token_ids, res.finish_reason) == ("hi", [1, 2], "eos")
    assert res.usage == sdk.Usage(3, 2)
    assert res.stats.drafters == {"ngram": 2} and res.stats.acceptance_rate == 0.75
    mid = sdk.chunk_from_proto(pb.GenerateChunk(request_id="r", text="h", token_ids=[1]))
    assert mid.finish_reason is None and mid.usage is None and mid.stats is None
    last = sdk.chunk_from_proto(pb.GenerateChunk(finish_reason=pb.FINISH_REASON_STOP))
    assert last.finish_reason == "stop" and last.usage == sdk.Usage(0, 0) and last.seed is None
    assert res.seed is None
    seeded = sdk.result_from_proto(pb.GenerateResponse(finish_reason=pb.FINISH_REASON_LENGTH, seed=2**64 - 1))
    assert seeded.seed == 2**64 - 1  # the whole uint64 range round-trips
    chunk = sdk.chunk_from_proto(pb.GenerateChunk(finish_reason=pb.FINISH_REASON_LENGTH, seed=0))
    assert chunk.seed == 0


def test_backoff_is_exponential_capped_and_bounded():
    policy = RetryPolicy(attempts=6, initial_backoff=0.1, multiplier=2.0, max_backoff=0.5)
    delays = list(policy.delays())
    assert len(delays) == 5
    caps = [0.1, 0.2, 0.4, 0.5, 0.5]
    assert all(cap / 2 <= d <= cap for d, cap in zip(delays, caps))


class _Error(grpc.RpcError):
    def __init__(self, code):
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return f"{self._code.name} details"


def _client_with(fn_results):
    client = sdk.Client("127.0.0.1:1", retry=RetryPolicy(attempts=3, initial_backoff=0.001))
    calls = []

    def fn(request, timeout, metadata):
        calls.append(timeout)
        result = fn_results[len(calls) - 1]
        if isinstance(result, Exception):
            raise result
        return result

    return client, fn, calls


def test_retries_only_unavailable():
    ok = pb.GenerateResponse(text="done")
    client, fn, calls = _client_with([_Error(grpc.StatusCode.UNAVAILABLE), ok])
    with client:
        assert client._call(fn, None, None) is ok and len(calls) == 2

    client, fn, calls = _client_with([_Error(grpc.StatusCode.INVALID_ARGUMENT), ok])
    with client, pytest.raises(SpecFleetError) as err:
        client._call(fn, None, None)
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and len(calls) == 1
    assert err.value.message == "INVALID_ARGUMENT details"

    client, fn, calls = _client_with([_Error(grpc.StatusCode.UNAVAILABLE)] * 3)
    with client, pytest.raises(SpecFleetError) as err:
        client._call(fn, None, None)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and len(calls) == 3


def test_token_travels_as_bearer_metadata():
    with sdk.Client("127.0.0.1:1", token="abc") as client:
        assert client._metadata == (("authorization", "Bearer abc"),)
    with sdk.Client("127.0.0.1:1") as client:
        assert client._metadata == ()
