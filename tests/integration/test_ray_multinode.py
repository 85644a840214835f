"""Multi-node placement with ``ray.cluster_utils.Cluster`` (token auth on).

A head plus two worker "nodes" on this machine, each with its own custom resource:
drafters ask for ``{drafter: 1}`` and the verifier group for ``{verifier: 1}``, so
each must land on the node offering it, and generation across nodes stays exact.
"""

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

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]
ray = pytest.importorskip("ray")
torch.set_num_threads(1)

PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9, 10], [40]]


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    from ray.cluster_utils import Cluster

    from specfleet.cluster.runtime import RayRuntime

    tmp = tmp_path_factory.mktemp("multinode")
    models = write_tiny_models(tmp / "models")
    drafter_res = {"num_cpus": 0.25, "custom": {"drafter": 1}}
    data = tiny_config_dict(models, resources={
        "self": drafter_res, "ngram": drafter_res, "random": drafter_res,
        "verifier": {"num_cpus": 0.25, "custom": {"verifier": 1}},
    })
    data["drafters"] = [d for d in data["drafters"] if d["name"] in ("self", "ngram")]
    cfg = load_config(write_config(tmp / "cfg.yaml", data))
    with token_auth(tmp):
        # Nodes use the machine's own address, not loopback: a driver joining a cluster
        # has "127.0.0.1" rewritten to the routable IP by Ray (resolve_ip_for_localhost)
        # and would never reach a loopback-only GCS. Token auth guards the ports.
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        nodes = {}
        try:
            nodes["drafter"] = cluster.add_node(num_cpus=1, resources={"drafter": 2})
            nodes["verifier"] = cluster.add_node(num_cpus=1, resources={"verifier": 1})
            cluster.wait_for_nodes()
            rt = RayRuntime.start(cfg, address=cluster.address)
            try:
                yield rt, {role: n.node_id for role, n in nodes.items()}, models
            finally:
                rt.shutdown()
        finally:
            ray.shutdown()
            cluster.shutdown()


def test_actors_land_on_the_nodes_their_resources_name(deployment):
    from ray._private.state import actors  # GCS actor table; ray.util.state needs the dashboard

    rt, node_ids, _ = deployment
    by_role = {(p.role, p.name): p.node_id for p in rt.placements}
    assert by_role[("verifier", "verifier-0")] == node_ids["verifier"]
    assert by_role[("drafter", "self")] == node_ids["drafter"]
    assert by_role[("drafter", "ngram")] == node_ids["drafter"]
    # Ray's own view agrees with what the actors reported.
    alive = {a["Pid"]: a["Address"]["NodeID"] for a in actors(actor_state_name="ALIVE").values()}
    for p in rt.placements:
        assert alive[p.pid] == p.node_id


def test_generation_across_nodes_is_exact(deployment):
    from transformers import AutoModelForCausalLM

    rt, _, models = deployment
    target = AutoModelForCausalLM.from_pretrained(models["target"]).eval()
    expected = []
    for p in PROMPTS:
        with torch.no_grad():
            out = target.generate(torch.tensor([p]), max_new_tokens=20, do_sample=False,
                                  eos_token_id=0, pad_token_id=0)
        expected.append(out[0, len(p):].tolist())
    for drafter in ("self", "ngram"):
        outs = rt.engine.generate(PROMPTS, SamplingParams(max_new_tokens=20), drafter=drafter)
        assert [o.token_ids for o in outs] == expected
