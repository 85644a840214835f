"""``specfleet serve`` and ``specfleet generate`` as a user runs them: two processes.

The server process loads configs/tiny.yaml (the tiny zoo) on a free loopback port,
the CLI talks to it through the SDK, and SIGTERM shuts the server down cleanly.
"""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "specfleet.core.cli", "--log-level", "warning"]


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout)
    except queue.Empty:
        return ""


def test_serve_generate_and_sigterm(tiny_zoo):
    server = subprocess.Popen(
        [*CLI, "serve", "--config", str(REPO / "configs" / "tiny.yaml"), "--port", "0",
         "--backend", "inprocess"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = _first_line(server, timeout=120)
        assert line.startswith("specfleet: serving on 127.0.0.1:"), (line, server.poll())
        address = line.rsplit(" ", 1)[-1].strip()

        out = subprocess.run(
            [*CLI, "generate", "def add(a, b):", "--server", address, "--max-new-tokens", "8",
             "--json"], capture_output=True, text=True, timeout=60,
        )
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout)
        assert result["usage"]["completion_tokens"] == len(result["token_ids"]) > 0

        streamed = subprocess.run(
            [*CLI, "generate", "def add(a, b):", "--server", address, "--max-new-tokens", "8",
             "--stream"], capture_output=True, text=True, timeout=60,
        )
        assert streamed.returncode == 0 and streamed.stdout == result["text"] + "\n"

        bad = subprocess.run([*CLI, "generate", "x", "--server", address, "--top-k", "-2"],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2 and bad.stderr.startswith("error: invalid_argument: sampling.top_k")
        assert "Traceback" not in bad.stderr
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            rc = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert rc == 0, server.stderr.read()


def test_serve_with_the_http_api_and_metrics_then_top(tiny_zoo):
    import openai

    server = subprocess.Popen(
        [*CLI, "serve", "--config", str(REPO / "configs" / "tiny.yaml"), "--port", "0",
         "--backend", "inprocess", "--http-port", "0", "--metrics-port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        lines = [_first_line(server, timeout=120) for _ in range(3)]
        assert lines[0].startswith("specfleet: serving on 127.0.0.1:"), (lines, server.poll())
        assert lines[1].startswith("specfleet: OpenAI-compatible HTTP API on http://127.0.0.1:")
        assert lines[2].startswith("specfleet: metrics on http://127.0.0.1:")
        base_url = lines[1].rsplit(" ", 1)[-1].strip()
        metrics = lines[2].rsplit(" ", 1)[-1].strip()
        with openai.OpenAI(base_url=base_url, api_key="x", max_retries=0, timeout=60) as client:
            chat = client.chat.completions.create(
                model="zoo:tiny/target", messages=[{"role": "user", "content": "def add(a, b):"}],
                max_tokens=8, temperature=0, extra_body={"speculation": {"drafter": "code"}})
        assert chat.usage.completion_tokens == 8 and chat.speculation["rounds"] > 0
        host_port = metrics.removeprefix("http://").removesuffix("/metrics")
        top = subprocess.run([*CLI, "top", "--server", host_port, "--once"],
                             capture_output=True, text=True, timeout=60)
        assert top.returncode == 0, top.stderr
        assert f"SpecFleet {host_port}" in top.stdout and "│ code " in top.stdout
        gone = subprocess.run([*CLI, "top", "--server", "127.0.0.1:1", "--once"],
                              capture_output=True, text=True, timeout=60)
        assert gone.returncode == 1 and gone.stderr.startswith("error: cannot scrape")
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            rc = server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            raise
    assert rc == 0, server.stderr.read()
