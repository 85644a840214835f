"""``specfleet serve`` never hangs silently: a deployment that cannot fit fails at once
with what is missing, and SIGINT stops a deploy in progress."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "specfleet.core.cli", "--log-level", "warning"]


def _tiny_config(tmp_path, mutate) -> Path:
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    mutate(data)
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unplaceable_deployment_fails_fast_with_the_reason(tiny_zoo, tmp_path):
    def default_resources(data):  # the README's shape: every actor at the default 1 CPU
        for d in data["drafters"]:
            d.pop("resources", None)
        data["verifier"].pop("resources", None)

    path = _tiny_config(tmp_path, default_resources)
    start = time.monotonic()
    out = subprocess.run([*CLI, "serve", "--config", str(path), "--port", "0"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert time.monotonic() - start < 60
    assert "does not fit the cluster" in out.stderr
    assert "drafter 'general' asks {CPU: 1}" in out.stderr and "the cluster has {CPU: 2}" in out.stderr
    assert "Traceback" not in out.stderr


def test_sigint_stops_a_deploy_in_progress(tiny_zoo, tmp_path):
    path = _tiny_config(tmp_path, lambda data: None)
    proc = subprocess.Popen([*CLI, "serve", "--config", str(path), "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(3.0)  # Ray is starting or the actors are loading
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if "serving on" in out:  # the deploy won the race: SIGINT then drains and exits 0
        assert proc.returncode == 0, err
    else:
        assert proc.returncode == 130, err
        assert "interrupted while deploying" in err
