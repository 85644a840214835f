"""Drafters joining and leaving a running fleet, through the admin API.

Two deployments of the same tiny models (``testing/cluster_rigs``): the in-process
backend behind a real gRPC server on loopback (the admin service's checks, the CLI),
and the Ray backend (a drafter actor placed at run time, another stopped while
requests it serves are in flight). Output stays the target's own greedy tokens.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from specfleet.core.config import load_config
from specfleet.testing.cluster_rigs import (
    greedy_reference,
    tiny_config_dict,
    token_auth,
    write_config,
    write_tiny_models,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(400)]
REPO = Path(__file__).resolve().parents[2]
ADMIN = "s3cret-admin"
PROMPTS = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9, 10], [11, 12, 13, 14, 15], [40]]
N = 40


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return write_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def expected(models):
    return greedy_reference(models["target"], N, ignore_eos=True)


def fleet_config(models, tmp, *, admin_token=ADMIN):
    data = tiny_config_dict(models)
    data["router"] = {"policy": "learned"}
    data["server"] = {"port": 0, "admin_token": admin_token}
    return load_config(write_config(tmp / "cfg.yaml", data))


class _Tokenizer:
    """Token-id prompts only: these tests never send text."""

    eos_token_id = 0

    def encode(self, text):
        raise ValueError("text prompts are not used here")

    def decode(self, ids, **kwargs):
        return " ".join(map(str, ids))


@pytest.fixture(scope="module")
def inprocess_server(models, tmp_path_factory):
    from specfleet.router.server import ServerThread, make_backend

    cfg = fleet_config(models, tmp_path_factory.mktemp("inproc"))
    backend = make_backend(cfg, "inprocess")
    try:
        with ServerThread(backend, _Tokenizer(), cfg.server) as server:
            yield server
    finally:
        asyncio.run(backend.close())


def cli(*args, env_token=ADMIN):
    env = {**os.environ, "SPECFLEET_ADMIN_TOKEN": env_token}
    return subprocess.run([sys.executable, "-m", "specfleet.core.cli", "--log-level", "warning", "drafters",
                           *args], capture_output=True, text=True, timeout=120, cwd=REPO, env=env)


def test_admin_calls_need_the_admin_token(inprocess_server):
    from specfleet.client import SpecFleetError
    from specfleet.proto.admin_client import AdminClient

    with AdminClient(inprocess_server.address, admin_token="wrong") as admin:
        with pytest.raises(SpecFleetError) as err:
            admin.drafters()
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED
    out = cli("list", "--server", inprocess_server.address, env_token="")
    assert out.returncode == 2 and "no admin token" in out.stderr


def test_add_list_remove_in_process_and_stay_exact(inprocess_server, expected):
    from specfleet.client import Client, SpecFleetError
    from specfleet.proto.admin_client import AdminClient

    address = inprocess_server.address
    out = cli("add", "--server", address, "{name: suffix2, kind: suffix}")
    assert out.returncode == 0, out.stderr
    assert "suffix2" in out.stdout
    with AdminClient(address, admin_token=ADMIN) as admin, Client(address, timeout=60) as client:
        assert [d.name for d in admin.drafters()] == ["self", "random", "ngram", "suffix2"]
        with pytest.raises(SpecFleetError) as err:
            admin.add_drafter({"name": "ngram", "kind": "ngram"})
        assert err.value.code == grpc.StatusCode.ALREADY_EXISTS
        with pytest.raises(SpecFleetError) as err:
            admin.add_drafter("{name: x, kind: telepathy}")
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and "kind" in err.value.message
        with pytest.raises(SpecFleetError) as err:
            admin.add_drafter({"name": "m", "kind": "model", "model": "/nonexistent/model"})
        assert err.value.code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
        with pytest.raises(SpecFleetError) as err:
            admin.remove_drafter("nobody")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        # Routed requests (the learned router tries the newcomer at once) stay exact.
        for prompt in PROMPTS:
            result = client.generate(prompt, max_new_tokens=N)
            assert result.token_ids == expected(prompt)
            # Per-drafter credit and the router's domain travel with the response.
            assert result.stats.domain in ("code", "prose", "data")
            assert set(result.stats.accepted_by) <= set(result.stats.drafters)
            assert sum(result.stats.accepted_by.values()) >= result.stats.accepted
        assert client.info().drafters[-1].name == "suffix2"
    out = cli("remove", "--server", address, "suffix2")
    assert out.returncode == 0 and "suffix2" not in out.stdout, out.stderr
    out = cli("remove", "--server", address, "suffix2")
    assert out.returncode == 1 and "NOT_FOUND" in out.stderr


def test_admin_api_is_off_without_a_token(models, tmp_path):
    from specfleet.client import SpecFleetError
    from specfleet.proto.admin_client import AdminClient
    from specfleet.router.server import ServerThread, make_backend

    cfg = fleet_config(models, tmp_path, admin_token=None)
    backend = make_backend(cfg, "inprocess")
    try:
        with ServerThread(backend, _Tokenizer(), cfg.server) as server:
            with AdminClient(server.address, admin_token="anything") as admin:
                with pytest.raises(SpecFleetError) as err:
                    admin.drafters()
            assert err.value.code == grpc.StatusCode.PERMISSION_DENIED and "admin_token" in err.value.message
    finally:
        asyncio.run(backend.close())


def test_on_ray_a_drafter_joins_and_another_leaves_mid_flight(models, expected, tmp_path):
    ray = pytest.importorskip("ray")
    cfg = fleet_config(models, tmp_path)
    with token_auth(tmp_path):  # Ray's auth token must stay set while the cluster runs
        _ray_join_and_leave(cfg, expected, ray)


def _ray_join_and_leave(cfg, expected, ray):
    from specfleet.client import Client
    from specfleet.cluster.runtime import RayBackend
    from specfleet.proto.admin_client import AdminClient
    from specfleet.router.server import ServerThread

    backend = RayBackend.from_config(cfg)
    try:
        with ServerThread(backend, _Tokenizer(), cfg.server) as server:
            results: dict[int, list[int]] = {}
            errors: list[BaseException] = []
            started = threading.Barrier(len(PROMPTS) + 1)

            def run(i, prompt):
                try:
                    with Client(server.address, timeout=180) as client:
                        started.wait()
                        results[i] = client.generate(prompt, max_new_tokens=N, drafter="self").token_ids
                except BaseException as exc:  # reported below
                    errors.append(exc)

            threads = [threading.Thread(target=run, args=(i, p)) for i, p in enumerate(PROMPTS)]
            for t in threads:
                t.start()
            started.wait()
            with AdminClient(server.address, admin_token=ADMIN) as admin:
                deadline = time.monotonic() + 30
                # Every request admitted first: one still arriving would ask for a drafter gone.
                while (len(backend.active_request_ids()) + len(results) < len(PROMPTS)
                       and time.monotonic() < deadline):
                    time.sleep(0.005)
                # "self" drafts for the requests in flight (pinned): they go on without it.
                names = [d.name for d in admin.remove_drafter("self")]
                in_flight = len(results) < len(PROMPTS)
                assert "self" not in names
                names = [d.name for d in admin.add_drafter({"name": "ngram2", "kind": "ngram",
                                                            "resources": {"num_cpus": 0.1}})]
                assert names[-1] == "ngram2"
            for t in threads:
                t.join(240)
            assert not errors, errors
            assert in_flight, "every request had finished before the drafter was removed"
            assert all(results[i] == expected(p) for i, p in enumerate(PROMPTS))
            placed = {p.name for p in backend.runtime.placements if p.role == "drafter"}
            assert "ngram2" in placed and "self" not in placed
            # New routed requests use the fleet as it is now, and stay exact.
            with Client(server.address, timeout=120) as client:
                out = client.generate(PROMPTS[0], max_new_tokens=N)
            assert out.token_ids == expected(PROMPTS[0])
            assert "self" not in out.stats.drafters
    finally:
        asyncio.run(backend.close())
        if ray.is_initialized():
            ray.shutdown()
