"""The tiny zoo: plain HF loading, one vocabulary, plausible manifest, cache hits, exact target-xl.

Uses the session's ``tiny_zoo`` (built once, under a minute, or found in the cache).
"""

from __future__ import annotations

import json
import math
import time

import pytest

from specfleet.zoo.presets import DOMAINS, DRAFTERS, MODEL_NAMES, read_manifest

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def manifest(tiny_zoo):
    return json.loads((tiny_zoo / "manifest.json").read_text())


@pytest.fixture(scope="module")
def models(tiny_zoo):
    from transformers import AutoModelForCausalLM

    return {
        name: AutoModelForCausalLM.from_pretrained(tiny_zoo / name, local_files_only=True).eval()
        for name in MODEL_NAMES
    }


def test_every_checkpoint_loads_with_plain_transformers(tiny_zoo, models):
    from transformers import AutoTokenizer

    for name in MODEL_NAMES:
        assert models[name].config.model_type == "llama"
        tok = AutoTokenizer.from_pretrained(tiny_zoo / name, local_files_only=True)
        assert tok.eos_token_id is not None and tok.pad_token_id not in (None, tok.eos_token_id)
        text = "def f(x):\n    return {'id': 42}  # ok"
        assert tok.decode(tok(text)["input_ids"]) == text  # byte-level: lossless
        assert models[name].config.eos_token_id == tok.eos_token_id


def test_all_models_share_the_vocabulary(tiny_zoo):
    from specfleet.models.loading import check_same_vocabulary, load_tokenizer

    target = load_tokenizer(tiny_zoo / "target")
    for name in MODEL_NAMES:
        check_same_vocabulary(target, tiny_zoo / name, name)
    assert load_tokenizer("zoo:tiny/tokenizer").get_vocab() == target.get_vocab()


def test_manifest_figures_are_present_and_plausible(tiny_zoo, manifest, models):
    from specfleet.zoo.measure import param_count

    assert manifest["complete"] and manifest["size"] == "tiny"
    assert set(manifest["models"]) == set(MODEL_NAMES)
    assert 0 < manifest["build_wall_s"] <= 120
    for name, entry in manifest["models"].items():
        assert (tiny_zoo / entry["path"] / "config.json").is_file()
        assert entry["params"] == param_count(models[name])
    xl, target = manifest["models"]["target-xl"], manifest["models"]["target"]
    assert xl["params"] > 4 * target["params"]
    uniform = math.log(manifest["tokenizer"]["vocab_size"])
    for name in ("target", *DRAFTERS):
        entry = manifest["models"][name]
        assert entry["train"]["steps"] > 0 and entry["train"]["wall_s"] > 0
        assert all(entry["heldout_loss"][dom] > 0 for dom in DOMAINS)
        # Better than uniform where it was trained (specialists never saw other domains).
        trained_on = DOMAINS if entry["domain"] == "general" else (entry["domain"],)
        for dom in trained_on:
            assert entry["heldout_loss"][dom] < uniform, (name, dom)
    for name in DRAFTERS:
        for dom in DOMAINS:
            figures = manifest["acceptance"][name][dom]
            assert 0 <= figures["greedy_acceptance"] <= 1
            assert 0 <= figures["mean_accepted_w4"] <= 4
    cost = manifest["cost"]
    for name in DRAFTERS:
        assert cost["c_vs_target"][name] > 0
        assert cost["c_vs_target_xl"][name] < cost["c_vs_target"][name]
    assert manifest["target_xl_check"]["greedy_tokens_identical"] is True
    assert manifest["drafter_xl_check"]["greedy_tokens_identical"] is True
    grown = manifest["models"]["drafter-code-xl"]
    assert grown["grown_from"] == "drafter-code" and grown["domain"] == "code"
    assert grown["params"] > 4 * manifest["models"]["drafter-code"]["params"]
    # Costlier than the drafter it computes, cheaper than the target it drafts for.
    assert cost["c_vs_target_xl"]["drafter-code"] < cost["c_vs_target_xl"]["drafter-code-xl"] < 1


def test_second_build_is_a_cache_hit(tiny_zoo):
    from specfleet.zoo.build import build_zoo

    stamp = (tiny_zoo / "manifest.json").stat().st_mtime_ns
    start = time.perf_counter()
    again = build_zoo("tiny", progress=False)
    assert again == tiny_zoo
    assert time.perf_counter() - start < 2.0
    assert (tiny_zoo / "manifest.json").stat().st_mtime_ns == stamp
    assert read_manifest(tiny_zoo) is not None


def test_zoo_spec_resolves_to_the_cached_zoo(tiny_zoo):
    from specfleet.models.loading import load_causal_lm, resolve_model_path

    assert resolve_model_path("zoo:tiny/drafter-code", config_key="drafters[0].model") == (
        tiny_zoo / "drafter-code"
    )
    assert load_causal_lm("zoo:tiny/target").config.num_hidden_layers >= 1


def test_target_xl_generates_exactly_the_targets_greedy_tokens(tiny_zoo, models):
    import torch
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_zoo / "target", local_files_only=True)
    prompts = ["def parse(self, text):\n    ", "The module provides functions for",
               '{"id": 4821, "user": "alice.smith", "event": ', "import os\nimport sys\n\n",
               "192.168.1.7 - - [05/Mar/2024:12:00:01 +0000] \"GET "]
    for prompt in prompts:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
        kwargs = dict(max_new_tokens=32, do_sample=False, pad_token_id=tok.pad_token_id)
        with torch.inference_mode():
            small = models["target"].generate(ids, **kwargs)
            big = models["target-xl"].generate(ids, **kwargs)
        assert big.tolist() == small.tolist(), prompt
        with torch.inference_mode():
            drafter = models["drafter-code"].generate(ids, **kwargs)
            grown = models["drafter-code-xl"].generate(ids, **kwargs)
        assert grown.tolist() == drafter.tolist(), prompt


def test_cli_path_and_info(tiny_zoo, capsys):
    from specfleet.core.cli import main

    assert main(["zoo", "path", "--size", "tiny"]) == 0
    assert capsys.readouterr().out.strip() == str(tiny_zoo)
    assert main(["zoo", "build", "--size", "tiny"]) == 0  # a cache hit
    assert capsys.readouterr().out.strip() == str(tiny_zoo)
    assert main(["zoo", "info", "--size", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "drafter-code" in out and "c (target-xl)" in out
