"""Every ``ray up`` file under configs/cluster/ passes Ray's own config validation
(``prepare_config`` fills defaults, then ``validate_config`` checks the schema)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration
FILES = sorted((Path(__file__).resolve().parents[2] / "configs" / "cluster").glob("*.yaml"))


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_cluster_yaml_is_valid_for_ray_up(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    full = prepare_config(yaml.safe_load(path.read_text()))
    validate_config(full)
    if full["provider"]["type"] == "local":
        # Ray's `local` provider has one internal node type with no resources; each
        # node's come from its `ray start --resources` line.
        assert '"verifier"' in " ".join(full["head_start_ray_commands"])
        assert '"drafter"' in " ".join(full["worker_start_ray_commands"])
        return
    types = full["available_node_types"]
    assert any("drafter" in t.get("resources", {}) for t in types.values())
    assert any("verifier" in t.get("resources", {}) for t in types.values())
