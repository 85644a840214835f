"""``ray up`` for real: Ray's ``local`` provider over SSH on loopback, SpecFleet deployed on it.

``configs/cluster/local-loopback.yaml`` is rendered with this run's paths (SSH key,
token file, GCS port, Ray temp dir, cluster name) and brought up with ``ray up``: the
head on 127.0.0.2 ({verifier: 1}); the autoscaler then starts the worker on 127.0.0.3
({drafter: 2}) over SSH itself. ``specfleet serve --address 127.0.0.2:PORT`` joins it
with the cluster's token, each actor must land on the node its resources name, and
one greedy generation through the SDK must equal the target's own greedy output.
``ray down`` must then leave no process behind.

What the machine needs is installed here when missing (openssh-server, rsync, via
apt-get as root); ``specfleet.testing.ssh_loopback`` runs a throwaway sshd (own keys,
127.0.0.2/127.0.0.3 only) in PID and mount namespaces of its own, so ``ray down``'s
machine-wide ``ray stop`` only sees this cluster and the real home is not written.
A lock file serialises concurrent runs (port 22 on those addresses is one resource).
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]
pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = REPO / "configs" / "cluster" / "local-loopback.yaml"
RAY = str(Path(sys.prefix) / "bin" / "ray")
HEAD, WORKER = "127.0.0.2", "127.0.0.3"
LOCK = Path(tempfile.gettempdir()) / "specfleet-ray-up-local.lock"
PROMPT = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]


def render(text: str, **values: str) -> str:
    """The template with this run's values; every placeholder must be found."""
    swaps = {
        "cluster_name: specfleet-loopback": f"cluster_name: {values['cluster_name']}",
        "ssh_user: root ": f"ssh_user: {values['user']} ",
        "~/.ssh/specfleet_loopback": values["key"],
        '"~/.ray/auth_token"': json.dumps(values["token"]),
        "6379": values["port"],
        "/tmp/ray-specfleet-loopback": values["temp_dir"],
    }
    for old, new in swaps.items():
        assert old in text, f"{TEMPLATE.name} no longer contains {old!r}"
        text = text.replace(old, new)
    return text


def _env(**extra: str) -> dict[str, str]:
    """This environment without any RAY_* setting (address, auth, autoscaler switches)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def _ray(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, *args], env=_env(), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _ray_status(port: int, auth: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([RAY, "status", "--address", f"{HEAD}:{port}"], env=_env(**auth),
                          capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


def _cmdlines() -> dict[int, str]:
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            if cmd:
                out[int(pid)] = cmd
    return out


def _control_dir(cluster_name: str) -> Path:
    """Where Ray's SSH runner keeps its ControlMaster sockets for this cluster."""
    user = hashlib.sha256(getpass.getuser().encode()).hexdigest()[:10]
    return Path(f"/tmp/ray_ssh_{user}") / hashlib.sha256(cluster_name.encode()).hexdigest()[:10]


def _close_ssh_masters(cluster_name: str) -> None:
    """End Ray's persistent SSH connections now instead of after ControlPersist (10 s)."""
    control = _control_dir(cluster_name)
    for sock in control.glob("*") if control.exists() else []:
        subprocess.run(["ssh", "-o", f"ControlPath={sock}", "-O", "exit", "ray-node"],
                       capture_output=True, timeout=30)


def _remove_client_state(cluster_name: str) -> None:
    """What ``ray up``/``ray down`` leave on the launching machine for this cluster."""
    from ray._common.utils import get_default_ray_temp_dir

    for suffix in ("state", "lock"):
        Path(get_default_ray_temp_dir(), f"cluster-{cluster_name}.{suffix}").unlink(missing_ok=True)
    for cache in Path(tempfile.gettempdir()).glob("ray-config-*"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            if json.loads(cache.read_text())["config"]["cluster_name"] == cluster_name:
                cache.unlink()
    control = _control_dir(cluster_name)
    shutil.rmtree(control, ignore_errors=True)
    with contextlib.suppress(OSError):
        control.parent.rmdir()  # only if no other cluster uses it


@pytest.fixture
def loopback():
    """A running loopback sshd and a short temp root (Unix socket paths stay short)."""
    from specfleet.testing.ssh_loopback import LoopbackSSHD, ensure_tools, port_free

    if os.geteuid() != 0:
        pytest.skip("needs root: apt-get install and an sshd on port 22 of 127.0.0.2/.3")
    reason = ensure_tools()
    if reason:
        pytest.skip(reason)
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"no PID/mount namespaces here (unshare: {probe.stderr.strip()}); without "
                    "them `ray down` would run `ray stop` on every Ray process of the machine")
    with open(LOCK, "w") as lock:
        deadline = time.monotonic() + 300
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"another run holds {LOCK} for more than 300 s")
                time.sleep(1)
        taken = [a for a in (HEAD, WORKER) if not port_free(a, 22)]
        if taken:
            pytest.skip(f"port 22 is taken on {', '.join(taken)} (Ray's SSH runner cannot use "
                        "another port)")
        root = Path(tempfile.mkdtemp(prefix="sf-rayup-"))
        sshd = LoopbackSSHD(root / "ssh")
        try:
            sshd.start()
            yield sshd, root
        finally:
            sshd.stop()  # ends the namespace: nothing started over SSH survives this
            left = sshd.processes()
            shutil.rmtree(root, ignore_errors=True)
            assert not left, f"still running in the sshd namespace: {left}"


def test_ray_up_deploys_specfleet_then_ray_down_leaves_nothing(loopback):
    import torch
    from transformers import AutoModelForCausalLM

    from specfleet.client import Client
    from specfleet.testing.cluster_rigs import (
        read_until,
        tiny_config_dict,
        token_auth_env,
        write_config,
        write_tiny_models,
    )
    from specfleet.testing.ssh_loopback import free_port

    sshd, root = loopback
    token = token_auth_env(root)
    port = free_port()
    name = f"specfleet-loopback-{os.getpid()}"
    cluster_yaml = root / "cluster.yaml"
    cluster_yaml.write_text(render(
        TEMPLATE.read_text(), cluster_name=name, user=sshd.user, key=str(sshd.key),
        token=token["RAY_AUTH_TOKEN_PATH"], port=str(port), temp_dir=str(root / "ray"),
    ))
    models = write_tiny_models(root / "models")  # one machine: every "node" sees this path
    on_worker = {"num_cpus": 0.25, "custom": {"drafter": 1}}
    data = tiny_config_dict(models, resources={
        "self": on_worker, "ngram": on_worker,
        "verifier": {"num_cpus": 0.25, "custom": {"verifier": 1}},
    })
    data["drafters"] = [d for d in data["drafters"] if d["name"] in ("self", "ngram")]
    cfg = write_config(root / "specfleet.yaml", data)

    serve = None
    try:
        start = time.monotonic()
        up = _ray("up", "-y", "--no-config-cache", "--log-style", "record", str(cluster_yaml),
                  timeout=300)
        assert up.returncode == 0, f"ray up failed:\n{up.stdout[-4000:]}\n{up.stderr[-4000:]}"
        # The head is up; the worker comes from the head's autoscaler (over SSH, like on
        # a real on-prem cluster). The deployment below waits for its {drafter} resource.
        serve = subprocess.Popen(
            [sys.executable, "-m", "specfleet.core.cli", "serve", "--config", str(cfg),
             "--address", f"{HEAD}:{port}", "--port", "0"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(**token),
        )
        try:
            lines = read_until(serve, "serving on", timeout=300)
        except AssertionError as exc:
            monitor = sorted((root / "ray").glob("session_*/logs/monitor.*"))
            tails = "".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in monitor)
            raise AssertionError(f"{exc}\nautoscaler logs:\n{tails}") from None
        log = "".join(lines)
        address = lines[-1].rsplit("serving on", 1)[1].strip()
        for drafter in ("self", "ngram"):
            placed = [ln for ln in lines if f"placed drafter '{drafter}'" in ln]
            assert placed and f"({WORKER})" in placed[0], log
        verifier = [ln for ln in lines if "placed verifier" in ln]
        assert f"({HEAD})" in verifier[0], log
        print(f"ray up -> serving: {time.monotonic() - start:.1f} s")

        # Token auth is on for the whole cluster: the right token sees both nodes; a
        # wrong one, or none, is refused by the GCS.
        status = _ray_status(port, token)
        assert status.returncode == 0 and " 2 local.cluster.node" in status.stdout, status
        for bad in ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64},
                    {"RAY_AUTH_MODE": "disabled"}):
            refused = _ray_status(port, bad)
            assert refused.returncode != 0 and "InvalidAuthToken" in refused.stderr, refused

        with Client(address, timeout=120) as client:
            result = client.generate(PROMPT, max_new_tokens=16, drafter="self")
        target = AutoModelForCausalLM.from_pretrained(models["target"]).eval()
        with torch.no_grad():
            out = target.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False,
                                  eos_token_id=0, pad_token_id=0)
        assert result.token_ids == out[0, len(PROMPT):].tolist()

        serve.send_signal(signal.SIGTERM)
        rest, _ = serve.communicate(timeout=120)
        assert serve.returncode == 0, rest
        assert "runtime shut down" in rest, rest
    finally:
        if serve is not None and serve.poll() is None:
            serve.kill()
            serve.wait()
        try:
            down = _ray("down", "-y", "--log-style", "record", str(cluster_yaml), timeout=300)
        except subprocess.TimeoutExpired as exc:
            down = exc  # the fixture still ends every process (sshd's namespace)
        _close_ssh_masters(name)
        _remove_client_state(name)
    assert isinstance(down, subprocess.CompletedProcess), f"ray down timed out: {down}"
    assert down.returncode == 0, f"ray down failed:\n{down.stdout[-4000:]}\n{down.stderr[-4000:]}"
    assert "Stopped all" in down.stdout + down.stderr, down.stdout[-4000:]

    # Nothing of the cluster is left: not in the sshd namespace (raylets, GCS, workers,
    # the autoscaler and its SSH connections), nor anywhere else on the machine.
    deadline = time.monotonic() + 30
    while sshd.non_sshd_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not sshd.non_sshd_processes(), sshd.non_sshd_processes()
    ours = {pid: cmd for pid, cmd in _cmdlines().items()
            if str(root) in cmd and pid not in sshd.processes() and pid != sshd.proc.pid}
    assert not ours, ours
