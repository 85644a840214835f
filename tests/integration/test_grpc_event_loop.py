"""The event loop stays responsive while a client sends the largest requests the
limits allow: health checks answer within 100 ms (95th percentile; the slowest one
within 1 s on a machine of fewer than 4 cores) and an ordinary request is not
slowed more than 2x.

One server on loopback over the tiny zoo (``configs/tiny.yaml``, in-process
backend). The heavy client is a process of its own sending pre-serialized bodies (so
its own work is not what is measured): a text prompt and a token-id prompt of nearly
``server.max_message_bytes`` (refused from their size alone, before tokenizing or
scanning), a text just under the tokenize-before-refusing bound (tokenized on a
worker thread, then refused), and the largest *accepted* request: a prompt filling
the context with 16 stop strings of 256 characters (detokenized and stop-checked on
every chunk). Timings are compared with the same probes on the idle server (a ratio,
since the machine is shared), with the absolute bound as the floor; the 2x
slowdown bound holds where the machine has >= 4 cores (see the assertion).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from specfleet.client import Client
from specfleet.proto import specfleet_pb2 as pb

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HEALTH_BOUND_S = 0.1
ORDINARY = "def fibonacci(n):\n    "


@pytest.fixture(scope="module")
def server(tiny_zoo):
    from specfleet.core.config import load_config
    from specfleet.router.server import ServerThread, load_tokenizer, make_backend

    cfg = load_config(REPO / "configs" / "tiny.yaml")
    backend = make_backend(cfg, "inprocess")
    try:
        with ServerThread(backend, load_tokenizer(cfg), cfg.server) as srv:
            yield cfg, srv
    finally:
        asyncio.run(backend.close())


def _heavy_bodies(cfg, client) -> list[tuple[str, bytes, grpc.StatusCode]]:
    """(name, serialized GenerateRequest, expected status) of the largest requests."""
    limits = client.info().limits
    room = cfg.server.max_message_bytes - 1024  # the envelope's fields
    bodies = []
    big_text = pb.GenerateRequest(text=("def f(x): return x + 1\n" * room)[:room])
    big_text.sampling.max_new_tokens = 4
    bodies.append(("4 MiB text", big_text, grpc.StatusCode.INVALID_ARGUMENT))
    big_ids = pb.GenerateRequest()
    big_ids.token_ids.ids.extend([5] * (room - 16))  # one byte per id
    big_ids.sampling.max_new_tokens = 4
    bodies.append(("4 MiB token ids", big_ids, grpc.StatusCode.INVALID_ARGUMENT))
    near_bound = pb.GenerateRequest(text="def f(x): return x + 1\n" * 350)  # ~8k chars
    near_bound.sampling.max_new_tokens = 4
    bodies.append(("text tokenized, then refused", near_bound, grpc.StatusCode.INVALID_ARGUMENT))
    new = 16
    largest_ok = pb.GenerateRequest()
    largest_ok.token_ids.ids.extend([(7 * i) % 500 + 3 for i in range(limits.max_seq_len - new)])
    largest_ok.sampling.max_new_tokens = new
    largest_ok.sampling.stop.extend([("never" * 60)[: 256 - i] for i in range(16)])
    bodies.append(("largest accepted", largest_ok, grpc.StatusCode.OK))
    return [(name, msg.SerializeToString(), code) for name, msg, code in bodies]


# The other client, in a process of its own (as a real one is): its sending must not
# compete with the server for this process's GIL. Bodies go out as they are.
HEAVY_CLIENT = r"""
import sys, grpc
address, *paths = sys.argv[1:]
bodies = [open(p, "rb").read() for p in paths]
channel = grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)])
call = channel.unary_unary("/specfleet.v1.SpecFleet/Generate")
i = 0
while True:
    try:
        call(bodies[i % len(bodies)], timeout=120)
        code = "OK"
    except grpc.RpcError as err:
        code = err.code().name
    print(i % len(bodies), code, flush=True)
    i += 1
"""


class HeavyClient:
    """Another client: sends the heavy bodies one after another, in a loop, until stopped."""

    def __init__(self, address: str, bodies, tmp_path: Path):
        self.bodies = bodies
        self.results: list[tuple[str, grpc.StatusCode]] = []
        self._paths = []
        for k, (_, body, _) in enumerate(bodies):
            path = tmp_path / f"body{k}.bin"
            path.write_bytes(body)
            self._paths.append(str(path))
        self._address = address

    def _read(self) -> None:
        for line in self._proc.stdout:
            k, code = line.split()
            self.results.append((self.bodies[int(k)][0], grpc.StatusCode[code]))

    def __enter__(self):
        self._proc = subprocess.Popen([sys.executable, "-c", HEAVY_CLIENT, self._address, *self._paths],
                                      stdout=subprocess.PIPE, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def __exit__(self, *exc):
        self._proc.terminate()
        self._proc.wait(30)
        self._reader.join(10)


def _health_times(client: Client, probes: int, until=lambda: True, cap_s: float = 120.0) -> list[float]:
    """Latencies of at least ``probes`` health checks, going on until ``until()``."""
    times, stop_at = [], time.monotonic() + cap_s
    while (len(times) < probes or not until()) and time.monotonic() < stop_at:
        start = time.perf_counter()
        assert client.health() == "SERVING"
        times.append(time.perf_counter() - start)
        time.sleep(0.01)
    return times


def _p95(times: list[float]) -> float:
    return statistics.quantiles(times, n=20)[-1]


def _ordinary_median(client: Client, n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        out = client.generate(ORDINARY, max_new_tokens=4, drafter="ngram")
        times.append(time.perf_counter() - start)
        assert len(out.token_ids) == 4
    return statistics.median(times)


def test_health_and_ordinary_requests_stay_fast_under_the_largest_requests(server, tmp_path):
    cfg, srv = server
    with Client(srv.address, timeout=60) as client:
        bodies = _heavy_bodies(cfg, client)
        _ordinary_median(client, 3)  # warm-up
        idle_health = _health_times(client, 30)
        idle_ordinary = _ordinary_median(client, 15)
        with HeavyClient(srv.address, bodies, tmp_path) as heavy:
            deadline = time.monotonic() + 60
            while len(heavy.results) < 2 and time.monotonic() < deadline:  # in its stride
                time.sleep(0.01)
            # Probe across two whole cycles of the heavy bodies: every kind lands meanwhile.
            cycles_done = len(heavy.results) + 2 * len(bodies)
            loaded_health = _health_times(client, 60, until=lambda: len(heavy.results) >= cycles_done)
            loaded_ordinary = _ordinary_median(client, 15)
        print(f"health p95 idle {_p95(idle_health) * 1e3:.1f} ms, loaded {_p95(loaded_health) * 1e3:.1f} ms "
              f"(max {max(loaded_health) * 1e3:.1f} ms); "
              f"ordinary median idle {idle_ordinary * 1e3:.1f} ms, loaded {loaded_ordinary * 1e3:.1f} ms; "
              f"heavy requests served {len(heavy.results)}")
    expected = {name: code for name, _, code in bodies}
    assert {name for name, _ in heavy.results} == set(expected)  # each kind ran
    assert all(code == expected[name] for name, code in heavy.results), heavy.results
    few_cores = len(os.sched_getaffinity(0)) < 4
    assert _p95(loaded_health) <= max(HEALTH_BOUND_S, 2 * _p95(idle_health)), (loaded_health, idle_health)
    # The slowest single probe: on 2 shared cores the other client's process (and CI's
    # neighbours) can hold the core the gRPC thread needs for a scheduling slice or two
    # (seen: 208 ms once in CI, p95 far below), so there only a stall fails the max.
    worst_bound = 1.0 if few_cores else max(HEALTH_BOUND_S, 2 * max(idle_health))
    assert max(loaded_health) <= worst_bound, (max(loaded_health), max(idle_health))
    # 2x needs the other client to have a core of its own, as a real one (on another
    # machine) has; on fewer cores it competes with the server for CPU (measured here on
    # 2 shared cores: 1.7-2.6x), so only a stall fails (the was 600x: 10.7 s vs 18 ms).
    slowdown = 4.0 if few_cores else 2.0
    assert loaded_ordinary <= slowdown * idle_ordinary, (loaded_ordinary, idle_ordinary)
