"""Model loading: zoo specs parse, bad paths name their config key, foreign vocabularies refused.

Tiny random Llama checkpoints written to tmp_path; the zoo is never built here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from specfleet.models.loading import (
    ModelPathError,
    VocabularyMismatchError,
    check_same_vocabulary,
    load_causal_lm,
    load_tokenizer,
    register_resolver,
    resolve_model_path,
    resolver_for,
)
from specfleet.zoo.resolver import parse_zoo_spec


def _tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "<pad>": 1, **{w: i + 2 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>")


def _checkpoint(directory: Path, words: list[str]) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = _tokenizer(words)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=1, num_attention_heads=2, head_dim=16,
                         eos_token_id=0, pad_token_id=1, bos_token_id=0)
    LlamaForCausalLM(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return directory


WORDS = ["def", "return", "the", "data", "x", "y"]


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("target"), WORDS)


def test_parse_zoo_spec():
    assert parse_zoo_spec("zoo:small/drafter-code") == ("small", "drafter-code")
    assert parse_zoo_spec("zoo:tiny/target-xl") == ("tiny", "target-xl")
    assert parse_zoo_spec("zoo:tiny/tokenizer") == ("tiny", "tokenizer")
    assert parse_zoo_spec("/models/llama") is None
    assert parse_zoo_spec("zoo-like/dir") is None


def test_zoo_resolver_comes_from_the_entry_point():
    from specfleet.zoo import resolver

    assert resolver_for("zoo:tiny/target") is resolver.resolve
    assert resolver_for("/models/llama") is None
    assert resolver_for("no-such-scheme:x") is None  # a plain path that happens to hold ':'


def test_registered_resolver_is_used(tmp_path):
    def resolve(spec, *, config_key, build):
        if spec.endswith("missing"):
            raise ValueError("no such thing")
        return tmp_path

    register_resolver("testscheme", resolve)
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model_path("testscheme:x") == tmp_path
    with pytest.raises(ModelPathError, match="models.target: no such thing"):
        resolve_model_path("testscheme:missing", config_key="models.target")


@pytest.mark.parametrize(
    "spec", ["zoo:huge/target", "zoo:small", "zoo:small/drafter-music", "zoo:/target"])
def test_malformed_zoo_spec_names_key(spec):
    with pytest.raises(ModelPathError, match=r"drafters\[2\]\.model: .*zoo:<size>/<name>"):
        resolve_model_path(spec, config_key="drafters[2].model")


def test_missing_directory_names_key_and_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError) as info:
        resolve_model_path(str(missing), config_key="models.target")
    assert isinstance(info.value, ModelPathError)
    assert "models.target" in str(info.value) and str(missing) in str(info.value)


def test_directory_without_config_is_refused(tmp_path):
    with pytest.raises(ModelPathError, match="drafters\\[0\\].model: .*no config.json"):
        resolve_model_path(tmp_path, config_key="drafters[0].model")


def test_unbuilt_zoo_without_build_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    expected = "models.target: .*not built.*specfleet zoo build --size small"
    with pytest.raises(ModelPathError, match=expected):
        resolve_model_path("zoo:small/target", config_key="models.target", build=False)


def test_tokenizer_only_directory(target_dir, tmp_path):
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(target_dir).save_pretrained(tmp_path / "tok")
    assert load_tokenizer(tmp_path / "tok").get_vocab() == load_tokenizer(target_dir).get_vocab()
    with pytest.raises(ModelPathError, match="models.tokenizer: .*holds no tokenizer"):
        load_tokenizer(tmp_path, config_key="models.tokenizer")


def test_load_local_checkpoint(target_dir):
    import torch

    model = load_causal_lm(target_dir, config_key="models.target")
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    half = load_causal_lm(str(target_dir), dtype="bfloat16")
    assert next(half.parameters()).dtype == torch.bfloat16
    tok = load_tokenizer(target_dir)
    assert tok.eos_token_id == 0 and tok.pad_token_id == 1
    with pytest.raises(ValueError, match="models.target: dtype"):
        load_causal_lm(target_dir, dtype="float8", config_key="models.target")


def test_same_vocabulary_accepted(target_dir, tmp_path):
    drafter = _checkpoint(tmp_path / "drafter", WORDS)
    check_same_vocabulary(target_dir, drafter, "code")
    check_same_vocabulary(load_tokenizer(target_dir), str(drafter), "code")


@pytest.mark.parametrize("words", [WORDS + ["extra"], list(reversed(WORDS)), WORDS[:-1] + ["z"]])
def test_vocabulary_mismatch_refused(target_dir, tmp_path, words):
    drafter = _checkpoint(tmp_path / "drafter", words)
    with pytest.raises(VocabularyMismatchError, match="drafter 'prose': its vocabulary differs"):
        check_same_vocabulary(target_dir, drafter, "prose")
