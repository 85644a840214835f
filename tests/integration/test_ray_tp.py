"""A TP=2 verifier group deployed on Ray: one STRICT_PACK placement group of two bundles,
rank 0 in the verifier actor, rank 1 its worker process; output equals the target's."""

from __future__ import annotations

import pytest
import torch

from specfleet.core.config import load_config
from specfleet.core.types import SamplingParams
from specfleet.testing.cluster_rigs import (
    tiny_config_dict,
    token_auth,
    write_config,
    write_tiny_models,
)

pytestmark = pytest.mark.integration
ray = pytest.importorskip("ray")


def test_tp2_verifier_group_on_ray_is_exact(tmp_path):
    from transformers import AutoModelForCausalLM

    from specfleet.cluster.runtime import RayRuntime

    models = write_tiny_models(tmp_path / "models")
    data = tiny_config_dict(models)
    data["verifier"].update(tp_size=2, resources={"num_cpus": 0.5})
    cfg = load_config(write_config(tmp_path / "cfg.yaml", data))
    prompts = [[1, 2, 3, 4, 5, 6], [9, 10]]
    target = AutoModelForCausalLM.from_pretrained(models["target"]).eval()
    with torch.no_grad():
        expected = [target.generate(torch.tensor([p]), max_new_tokens=16, do_sample=False,
                                    eos_token_id=0, pad_token_id=0)[0, len(p):].tolist()
                    for p in prompts]
    with token_auth(tmp_path):
        runtime = RayRuntime.start(cfg)
        try:
            bundles = ray.util.placement_group_table(runtime.groups[0])["bundles"]
            assert len(bundles) == 2
            outs = runtime.engine.generate(prompts, SamplingParams(max_new_tokens=16), drafter="self")
            assert [o.token_ids for o in outs] == expected
        finally:
            runtime.shutdown()
            if ray.is_initialized():
                ray.shutdown()
