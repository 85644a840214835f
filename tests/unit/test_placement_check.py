"""The placement check: a deployment that cannot fit fails at once, naming what is missing."""

from __future__ import annotations

import subprocess
import sys

import pytest

from specfleet.core.config import load_config
from specfleet.core.placement import (
    Demand,
    PlacementError,
    check_fits,
    deployment_demands,
    embedded_cluster_nodes,
)

README_LIKE = """
models: {target: /nonexistent/target}
drafters:
  - {name: general, kind: model, model: /nonexistent/drafter}
  - {name: ngram, kind: ngram}
cluster: {num_cpus: 2}
"""


def _cfg(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path, load_config(path)


def test_default_resources_do_not_fit_two_cpus(tmp_path):
    _, cfg = _cfg(tmp_path, README_LIKE)
    with pytest.raises(PlacementError) as err:
        check_fits(deployment_demands(cfg), embedded_cluster_nodes(cfg))
    msg = str(err.value)
    assert "drafter 'ngram'" in msg or "drafter 'general'" in msg
    assert "asks {CPU: 1}" in msg and "the cluster has {CPU: 2}" in msg and "total {CPU: 3}" in msg
    assert "num_cpus: 0.67" in msg  # the fractional share that would fit


def test_fractional_cpus_fit(tmp_path):
    text = README_LIKE.replace("kind: ngram}", "kind: ngram, resources: {num_cpus: 0.25}}")
    text = text.replace("model: /nonexistent/drafter}", "model: /nonexistent/drafter, resources: {num_cpus: 0.5}}")
    _, cfg = _cfg(tmp_path, text)
    check_fits(deployment_demands(cfg), embedded_cluster_nodes(cfg))


def test_groups_are_packed_whole_per_node():
    # a 2-rank group of 1 CPU each needs one node with 2 CPUs, not two nodes with 1
    group = [Demand("verifier-0 (2 ranks)", {"CPU": 2.0})]
    with pytest.raises(PlacementError, match="verifier-0"):
        check_fits(group, [{"CPU": 1.0}, {"CPU": 1.0}])
    check_fits(group + [Demand("drafter 'a'", {"CPU": 1.0})], [{"CPU": 1.0}, {"CPU": 2.0}])
    with pytest.raises(PlacementError, match="GPU"):
        check_fits([Demand("drafter 'g'", {"GPU": 1.0})], [{"CPU": 8.0}])


def test_config_validate_cluster_cli(tmp_path):
    path, _ = _cfg(tmp_path, README_LIKE)
    cli = [sys.executable, "-m", "specfleet.core.cli", "config", "validate"]
    assert subprocess.run([*cli, str(path)], capture_output=True, text=True).returncode == 0
    out = subprocess.run([*cli, "--cluster", str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2
    assert "does not fit the cluster" in out.stderr and "Traceback" not in out.stderr


def test_generation_config_eos_ids(tmp_path):
    import json

    from specfleet.models.loading import generation_eos_ids

    (tmp_path / "tokenizer.json").write_text("{}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))

    class Tok:
        eos_token_id = 9

    assert generation_eos_ids(str(tmp_path), Tok()) == [7, 9]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 4}))
    assert generation_eos_ids(str(tmp_path), Tok()) == [4, 9]


def test_gguf_errors_name_the_key(tmp_path):
    from specfleet.models.loading import ModelPathError, resolve_model_path

    with pytest.raises(ModelPathError, match=r"models.target: GGUF file .* does not exist"):
        resolve_model_path(str(tmp_path / "missing.gguf"), config_key="models.target")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file")
    with pytest.raises(ModelPathError, match=r"drafters\[0\].model: cannot read GGUF file bad.gguf"):
        resolve_model_path(str(bad), config_key="drafters[0].model")
    with pytest.raises(ModelPathError, match="no installed package 'no_such_pkg'"):
        resolve_model_path("pkg:no_such_pkg/x.gguf", config_key="models.target")


def test_joined_cluster_gets_a_bounded_wait_for_nodes(tmp_path, monkeypatch):
    from specfleet.cluster import runtime

    _, cfg = _cfg(tmp_path, README_LIKE)  # asks 3 CPUs
    readings = iter([[{"CPU": 2.0}], [{"CPU": 2.0}], [{"CPU": 2.0}, {"CPU": 2.0}]])
    monkeypatch.setattr(runtime, "live_cluster_nodes", lambda: next(readings))
    runtime._wait_until_fits(cfg, wait_s=30, poll_s=0.01)  # the third reading has the new node
    monkeypatch.setattr(runtime, "live_cluster_nodes", lambda: [{"CPU": 2.0}])
    with pytest.raises(PlacementError, match=r"waited 0 s for nodes to join"):
        runtime._wait_until_fits(cfg, wait_s=0.05, poll_s=0.01)
