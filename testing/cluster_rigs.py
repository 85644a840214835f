"""Test and benchmark support for the Ray runtime: tiny checkpoints, a config, fakes.

Where it sits: outside any request path. Integration tests and the overhead
benchmark (``overhead.py``) use it to deploy real configs without the model zoo:
``write_tiny_models`` saves random tiny Llama checkpoints *with* a tokenizer, so
``engine.builder`` loads them exactly as it loads real checkpoints, and
``FakeDrafter``/``FakeVerifier`` do no compute at all, so a round over actors that
hold them costs pure control overhead.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from queue import Empty, Queue

import yaml

from specfleet.core.types import DraftProposal, VerifyResult
from specfleet.core.workers import VerifyReply
from specfleet.drafters.base import Drafter

TINY_VOCAB = 97
EOS_ID = 0


def _tokenizer():
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": EOS_ID, **{f"t{i}": i for i in range(1, TINY_VOCAB)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="t1"))
    tok.pre_tokenizer = WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="t1")


def write_tiny_model(path: str | Path, seed: int, layers: int = 2, hidden: int = 32):
    """Save a random tiny Llama (and the shared tokenizer) as an HF checkpoint directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, eos_token_id=EOS_ID, bos_token_id=None, pad_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    _tokenizer().save_pretrained(path)
    return model


def write_tiny_models(root: str | Path) -> dict[str, Path]:
    """A target, a drafter that *is* the target (always accepted) and a random drafter."""
    root = Path(root)
    paths = {"target": root / "target", "self": root / "self", "random": root / "random"}
    write_tiny_model(paths["target"], seed=0)
    write_tiny_model(paths["self"], seed=0)
    write_tiny_model(paths["random"], seed=7, layers=1)
    return paths


def greedy_reference(target_dir: str | Path, default_n: int, *, ignore_eos: bool = False):
    """``greedy(prompt, n=default_n)``: the tiny target's own HF greedy continuation (EOS
    id 0, as ``write_tiny_model`` sets it; ``ignore_eos`` generates all n tokens)."""
    import torch
    from transformers import AutoModelForCausalLM

    target = AutoModelForCausalLM.from_pretrained(target_dir).eval()

    def greedy(prompt, n=default_n):
        kwargs = {"min_new_tokens": n} if ignore_eos else {}
        with torch.no_grad():
            out = target.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                                  eos_token_id=0, pad_token_id=0, **kwargs)
        return out[0, len(prompt):].tolist()

    return greedy


def tiny_config_dict(models: dict[str, Path], *, resources: dict | None = None) -> dict:
    """A complete config over ``write_tiny_models`` output: two model drafters, n-gram, suffix.

    ``resources`` (optional) maps a drafter name or ``"verifier"`` to a resources block.
    """
    resources = resources or {}
    small = {"num_cpus": 0.25}

    def res(name):
        return resources.get(name, small)

    return {
        "models": {"target": str(models["target"])},
        "drafters": [
            {"name": "self", "kind": "model", "model": str(models["self"]), "resources": res("self")},
            {"name": "random", "kind": "model", "model": str(models["random"]), "resources": res("random")},
            {"name": "ngram", "kind": "ngram", "resources": res("ngram")},
        ],
        "verifier": {"max_batch_size": 4, "max_seq_len": 256, "resources": res("verifier")},
        "router": {"policy": "fixed", "default_drafter": "self"},
        "scheduler": {"draft_length": 4, "max_draft_length": 6, "adaptive": False},
        "server": {"port": 0},
        "cluster": {"num_cpus": 2},
    }


def write_config(path: str | Path, data: dict) -> Path:
    path = Path(path)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---- no-compute fakes: a round over them is pure control overhead --------------------------
class FakeDrafter(Drafter):
    """Proposes ``num_draft_tokens`` copies of token 1; keeps no state."""

    name = "fake"

    def propose(self, requests):
        return [
            DraftProposal(r.request_id, [1] * r.num_draft_tokens,
                          DraftProposal.chain_parents(r.num_draft_tokens),
                          [1.0] * r.num_draft_tokens, None, self.name)
            for r in requests
        ]

    def rollback(self, request_id, length):
        pass

    def release(self, request_id):
        pass


class FakeVerifier:
    """The ``Verifier`` call contract with an oracle that accepts every draft and emits
    token 1 after it; it holds no state, so a round over it costs no compute."""

    eos_token_ids = ()
    decode = None
    runner = None  # no vocabulary or context limit to check prompts against

    def verify(self, calls, drafts=()):
        drafted = {p.request_id: p for reply in drafts for p in reply.proposals}
        results = []
        for call in calls:
            p = call.proposal or drafted.get(call.request_id) or DraftProposal.empty(call.request_id)
            results.append(VerifyResult(call.request_id, list(p.tokens) + [1], len(p), len(p),
                                        list(range(len(p)))))
        return VerifyReply(results)

    def release(self, request_id):
        pass

    @property
    def active(self):
        return []


# ---- Ray token authentication for hermetic test clusters -----------------------------------
def token_auth_env(directory: str | Path) -> dict[str, str]:
    """Environment for a Ray cluster with token auth on, its token in ``directory``.

    Ray >= 2.52 turns token auth on for new local clusters and keeps the token in
    ~/.ray/auth_token, shared by every user of the machine. Tests bring their own
    token instead: ``RAY_AUTH_MODE=token`` plus ``RAY_AUTH_TOKEN_PATH``, inherited by
    every raylet, worker and subprocess they start.
    """
    import secrets

    path = Path(directory) / "ray_auth_token"
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(path)}


@contextmanager
def token_auth(directory: str | Path):
    """Run a block with ``token_auth_env`` applied to this process (and its children).

    Ray caches the auth mode and token per process (RayConfig and the C++ token
    loader); changing the environment alone leaves a driver that sends no token to
    a GCS that wants one, so both caches are refreshed on entry and exit (the
    refresh is what Ray's own tests do). Shut Ray down inside the block.
    """
    from ray._raylet import AuthenticationTokenLoader, Config

    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")}
    os.environ.pop("RAY_AUTH_TOKEN", None)
    os.environ.update(token_auth_env(directory))
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()


def read_until(proc, marker: str, timeout: float) -> list[str]:
    """Lines of ``proc.stdout`` up to the one containing ``marker``.

    A reader thread, not select(): select() on the pipe misses lines that an earlier
    readline() already pulled into the text wrapper's buffer, and would then wait out
    the timeout with the marker sitting in memory."""
    lines: list[str] = []
    queue: Queue = Queue()

    def pump():
        for line in proc.stdout:
            queue.put(line)
            if marker in line:
                return
        queue.put(None)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = queue.get(timeout=1)
        except Empty:
            continue
        if line is None:
            break
        lines.append(line)
        if marker in line:
            return lines
    raise AssertionError(f"{marker!r} not seen; output:\n{''.join(lines)}")
