"""``specfleet distill`` on the tiny zoo's target: a drafter that agrees with the target
more than its layer-dropped start, saved as a checkpoint the engine uses exactly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.integration


def test_distilled_drafter_learns_and_stays_exact(tiny_zoo, tmp_path):
    import torch

    from specfleet.core.types import SamplingParams
    from specfleet.drafters.model_drafter import ModelDrafter
    from specfleet.engine.engine import SpecEngine
    from specfleet.models.llama_runner import LlamaRunner
    from specfleet.models.loading import load_causal_lm, load_tokenizer
    from specfleet.policy.draft_length import FixedDraftLength
    from specfleet.verifiers.verifier import Verifier

    out = tmp_path / "drafter"
    run = subprocess.run(
        [sys.executable, "-m", "specfleet.core.cli", "distill", "--target", "zoo:tiny/target", "--out", str(out),
         "--layers", "1", "--minutes", "0.25", "--prompts", "32", "--threads", "1"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads((out / "specfleet_distill.json").read_text())
    assert report["steps"] > 0
    assert report["heldout_agreement_after"] > report["heldout_agreement_before"]

    target = load_causal_lm("zoo:tiny/target")
    tokenizer = load_tokenizer("zoo:tiny/target")
    drafter = load_causal_lm(str(out))
    assert drafter.config.num_hidden_layers == 1
    prompts = [tokenizer.encode(t) for t in ("def add(a, b):\n    ", "The quick brown fox", '{"id": 7, ')]
    engine = SpecEngine(Verifier(LlamaRunner(target, max_slots=4, max_seq_len=128)),
                        {"d": ModelDrafter(LlamaRunner(drafter, max_slots=4, max_seq_len=128), name="d")},
                        draft_policy=FixedDraftLength(4), max_batch_size=4)
    outputs = engine.generate(prompts, SamplingParams(max_new_tokens=24, ignore_eos=True), drafter="d")
    for prompt, result in zip(prompts, outputs):
        with torch.no_grad():
            ref = target.generate(torch.tensor([prompt]), max_new_tokens=24, min_new_tokens=24,
                                  do_sample=False, pad_token_id=0)
        assert result.token_ids == ref[0, len(prompt):].tolist()
    assert sum(o.stats.accepted for o in outputs) > 0
