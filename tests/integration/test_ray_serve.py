"""``specfleet serve`` (Ray backend) as a subprocess: deploy on an embedded Ray, serve gRPC on
a free port, answer exactly, listen on loopback only (every process of the serve
tree: driver, GCS, raylet, agents, workers), and release everything on SIGTERM."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys

import pytest
import torch

from specfleet.testing.cluster_rigs import (
    read_until,
    tiny_config_dict,
    token_auth_env,
    write_config,
    write_tiny_models,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

# Components of the serve tree allowed to listen beyond loopback: none (with
# cluster.address "local", Ray's node IP stays 127.0.0.1; see cluster/runtime.py).
KNOWN_NON_LOOPBACK: frozenset[str] = frozenset()


def _is_loopback(ip: str) -> bool:
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)  # ::ffff:127.0.0.1 on a dual-stack socket
    return addr.is_loopback or (mapped is not None and mapped.is_loopback)


def listening_sockets(pid: int) -> list[tuple[str, str, int, str]]:
    """(process name, ip, port, kind) of every listening TCP socket and bound UDP
    socket of ``pid`` and all its descendants."""
    import psutil

    root = psutil.Process(pid)
    out = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            name, conns = proc.name(), proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):  # exited meanwhile
            continue
        for c in conns:
            if c.type == 1 and c.status == psutil.CONN_LISTEN:
                out.append((name, c.laddr.ip, c.laddr.port, "tcp"))
            elif c.type == 2 and c.laddr and not c.raddr:
                out.append((name, c.laddr.ip, c.laddr.port, "udp"))
    return out


def test_serve_subprocess_answers_on_loopback_only_and_drains_on_sigterm(tmp_path):
    pytest.importorskip("specfleet.router.server")
    from transformers import AutoModelForCausalLM

    from specfleet.proto.client import Client

    models = write_tiny_models(tmp_path / "models")
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config_dict(models))
    env = {**os.environ, **token_auth_env(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "specfleet.core.cli", "serve", "--config", str(cfg), "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        lines = read_until(proc, "serving on", timeout=240)
        address = lines[-1].rsplit("serving on", 1)[1].strip()
        log = "".join(lines)
        assert "placed verifier 'verifier-0' on node" in log and "placed drafter 'ngram'" in log
        prompt = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]
        with Client(address, timeout=60) as client:
            result = client.generate(prompt, max_new_tokens=16, drafter="self")
        target = AutoModelForCausalLM.from_pretrained(models["target"]).eval()
        with torch.no_grad():
            out = target.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False,
                                  eos_token_id=0, pad_token_id=0)
        assert result.token_ids == out[0, len(prompt):].tolist()
        sockets = listening_sockets(proc.pid)
        names = {name for name, *_ in sockets}
        assert {"gcs_server", "raylet"} <= names and len(sockets) >= 5, sockets  # the whole tree was seen
        exposed = [s for s in sockets if not _is_loopback(s[1]) and s[0] not in KNOWN_NON_LOOPBACK]
        assert not exposed, f"listening beyond loopback: {exposed}"
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, rest
        assert "released every actor" in rest and "runtime shut down" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
