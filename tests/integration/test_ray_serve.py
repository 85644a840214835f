"""``specfleet serve`` (Ray backend) as a subprocess: deploy on an embedded Ray, serve gRPC on
a free port, answer exactly, and release everything on SIGTERM."""

from __future__ import annotations

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


def test_serve_subprocess_answers_and_drains_on_sigterm(tmp_path):
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
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=90)
        assert proc.returncode == 0, rest
        assert "released every actor" in rest and "runtime shut down" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
