"""The serving stack the loopback API tests share.

``stack`` is one frontend per test module over the in-process engine with the tiny
zoo (configs/tiny.yaml through ``make_backend``, exactly what ``specfleet serve
--backend inprocess`` runs): the gRPC server, the OpenAI-compatible HTTP API and the
metrics endpoint on free loopback ports, all on the same servicer, plus the target as
a plain Hugging Face model for reference outputs.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@dataclass
class Stack:
    cfg: object
    backend: object
    tokenizer: object
    server: object  # a ServerThread: .address (gRPC), .server.http, .server.metrics
    target: object  # the target as a plain HF model, for reference outputs

    def expected(self, prompt: str, n: int = 16) -> list[int]:
        """The target's own greedy continuation of ``prompt`` (Hugging Face ``generate``)."""
        return self.expected_ids(self.tokenizer.encode(prompt), n)

    def expected_ids(self, ids: list[int], n: int = 16) -> list[int]:
        import torch

        eos = self.tokenizer.eos_token_id
        with torch.no_grad():
            out = self.target.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                       eos_token_id=eos, pad_token_id=eos)
        return out[0, len(ids):].tolist()

    @property
    def http_url(self) -> str:
        return self.server.server.http.url

    @property
    def metrics_url(self) -> str:
        return self.server.server.metrics.url


@pytest.fixture(scope="module")
def stack(tiny_zoo, request):
    """A module may set ``STACK_CONFIG = lambda cfg: cfg'`` to serve a variant of tiny.yaml."""
    from specfleet.core.config import load_config
    from specfleet.models.loading import load_causal_lm
    from specfleet.router.server import ServerThread, load_tokenizer, make_backend

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    cfg = getattr(request.module, "STACK_CONFIG", lambda c: c)(cfg)
    backend = make_backend(cfg, "inprocess")
    try:
        tokenizer = load_tokenizer(cfg)
        target = load_causal_lm(cfg.models.target, config_key="models.target")
        with ServerThread(backend, tokenizer, cfg.server, http_port=0, metrics_port=0) as server:
            yield Stack(cfg, backend, tokenizer, server, target)
    finally:
        asyncio.run(backend.close())
