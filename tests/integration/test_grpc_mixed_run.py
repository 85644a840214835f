"""A mixed run: 64 concurrent good streams with bad requests of every kind
interleaved. Every good stream completes, greedy ones equal the target's own HF
``generate`` and seeded sampled ones their calm rerun; every bad one gets its
client-error status; health answers SERVING throughout; nothing is left running.

One server on loopback over the tiny zoo (``configs/tiny.yaml``, in-process
backend), its concurrency limit raised so the bad requests never push a good one
out (admission is tested elsewhere). Short outputs keep it a few seconds.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import threading
import time
from pathlib import Path

import grpc
import pytest

from specfleet.client import AsyncClient, Client, SpecFleetError
from specfleet.proto import specfleet_pb2 as pb

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
PROMPTS = ["def fibonacci(n):\n    ", "The quick brown fox", "import os\nimport sys\n",
           '{"name": "alice", "id": ', "class Stack:\n    def push(self, x):", "Once upon a time"]
NEW = 8
GOOD = 64
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def stack(tiny_zoo):
    from specfleet.core.config import load_config
    from specfleet.models.loading import load_causal_lm
    from specfleet.router.server import ServerThread, load_tokenizer, make_backend

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    backend = make_backend(cfg, "inprocess")
    server_cfg = dataclasses.replace(cfg.server, max_concurrent_requests=256)
    try:
        tokenizer = load_tokenizer(cfg)
        target = load_causal_lm(cfg.models.target, config_key="models.target")
        with ServerThread(backend, tokenizer, server_cfg) as server:
            yield backend, tokenizer, target, server
    finally:
        asyncio.run(backend.close())


def _greedy(tokenizer, target, prompt: str) -> list[int]:
    import torch

    ids = tokenizer.encode(prompt)
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        out = target.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False,
                              eos_token_id=eos, pad_token_id=eos)
    return out[0, len(ids):].tolist()


def _good(i: int) -> dict:
    kwargs = dict(prompt=PROMPTS[i % len(PROMPTS)], max_new_tokens=NEW,
                  drafter=[None, "general", "code", "ngram", "suffix"][i % 5])
    if i % 4 == 3:  # a quarter sampled, each with its own seed
        kwargs.update(temperature=0.8, top_p=0.9, seed=1000 + i)
    if i % 8 == 5:  # numerically hostile but valid: greedy by the documented rule
        kwargs.update(temperature=1e-300, top_p=5e-324)
    return kwargs


def _bad_cases(context: int, limit: int) -> list[tuple[str, dict, grpc.StatusCode]]:
    """(kind, request kwargs or a raw body, expected status) of every bad kind."""
    big = pb.GenerateRequest(text="x" * (4 * 1024 * 1024 - 1024)).SerializeToString()
    return [
        ("empty prompt", dict(prompt=""), INVALID),
        ("token id outside the vocabulary", dict(prompt=[1, 10**6]), INVALID),
        ("prompt over the context", dict(prompt=[1] * context), INVALID),
        ("max_new_tokens over the limit", dict(max_new_tokens=limit + 1), INVALID),
        ("negative temperature", dict(temperature=-1.0), INVALID),
        ("NaN temperature", dict(temperature=float("nan")), INVALID),
        ("top_p above 1", dict(top_p=1.5), INVALID),
        ("negative top_k", dict(top_k=-2), INVALID),
        ("empty stop string", dict(stop=[""]), INVALID),
        ("too many stop strings", dict(stop=["a"] * 17), INVALID),
        ("over-long stop string", dict(stop=["a" * 257]), INVALID),
        ("unknown drafter of 100k characters", dict(drafter="x" * 100_000), INVALID),
        ("over-long request id", dict(request_id="r" * 1000), INVALID),
        ("malformed protobuf body", dict(raw=b"\x0a\xff\xff\xff\xff\x0f"), INVALID),
        ("4 MiB text prompt", dict(raw=big), INVALID),
        ("deadline already spent", dict(timeout=0.001), grpc.StatusCode.DEADLINE_EXCEEDED),
        ("cancelled after its first chunk", dict(cancel=True, max_new_tokens=64), grpc.StatusCode.CANCELLED),
    ]


def test_64_good_streams_with_every_bad_kind_interleaved(stack):
    backend, tokenizer, target, server = stack
    expected = {p: _greedy(tokenizer, target, p) for p in PROMPTS}
    with Client(server.address, timeout=60) as probe:
        info = probe.info()
    bad = _bad_cases(info.limits.max_seq_len, info.limits.max_new_tokens)
    health: list[str] = []
    stop_probing = threading.Event()

    def probe_health():
        with Client(server.address, timeout=10) as client:
            while not stop_probing.is_set():
                health.append(client.health())
                time.sleep(0.02)

    async def good(client, kwargs):
        tokens, last = [], None
        async for chunk in client.stream(**kwargs):
            tokens += chunk.token_ids
            last = chunk
        return tokens, last

    async def bad_one(client, channel, kwargs) -> grpc.StatusCode:
        kwargs = {"prompt": "hello", "max_new_tokens": 4, **kwargs}
        raw, cancel = kwargs.pop("raw", None), kwargs.pop("cancel", False)
        if raw is not None:  # bytes as they are, past the SDK's own checks
            call = channel.unary_unary("/specfleet.v1.SpecFleet/Generate")
            try:
                await call(raw, timeout=60)
            except grpc.RpcError as err:
                return err.code()
            return grpc.StatusCode.OK
        if cancel:
            stream = client.stream(**kwargs)
            await stream.__anext__()
            await stream.aclose()  # the SDK cancels the call
            return grpc.StatusCode.CANCELLED
        try:
            await client.generate(**kwargs)
        except SpecFleetError as err:
            assert len(err.message) < 600
            return err.code
        return grpc.StatusCode.OK

    async def scenario():
        options = [("grpc.max_send_message_length", 64 << 20)]
        async with AsyncClient(server.address, timeout=120) as client, \
                grpc.aio.insecure_channel(server.address, options=options) as channel:
            jobs = [("good", i, good(client, _good(i))) for i in range(GOOD)]
            jobs += [("bad", k, bad_one(client, channel, kw)) for k, (_, kw, _) in enumerate(bad) for _ in range(2)]
            random.Random(22).shuffle(jobs)  # bad ones interleaved among the good
            results = await asyncio.gather(*(job for _, _, job in jobs))
            return [(kind, i, r) for (kind, i, _), r in zip(jobs, results)]

    prober = threading.Thread(target=probe_health, daemon=True)
    prober.start()
    try:
        results = asyncio.run(scenario())
    finally:
        stop_probing.set()
        prober.join(30)

    goods = {i: r for kind, i, r in results if kind == "good"}
    assert len(goods) == GOOD
    for i, (tokens, last) in goods.items():
        kwargs = _good(i)
        assert last.finish_reason in ("length", "eos"), (i, last)
        if kwargs.get("temperature", 0.0) in (0.0, 1e-300):
            assert tokens == expected[kwargs["prompt"]], (i, kwargs)
    with Client(server.address, timeout=60) as client:  # seeded ones: a calm rerun, alone
        for i, (tokens, _) in goods.items():
            kwargs = _good(i)
            if kwargs.get("seed") is not None and kwargs["temperature"] == 0.8:
                assert client.generate(**kwargs).token_ids == tokens, i
    for kind, k, code in results:
        if kind == "bad":
            assert code == bad[k][2], (bad[k][0], code)
    assert len(health) >= 5 and set(health) == {"SERVING"}, health[:5]
    deadline = time.monotonic() + 10
    while backend.active_request_ids() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not backend.active_request_ids()
