"""Tensor-parallel verifier groups: one target model split over T processes.

Where it sits: a verifier group is what the engine (or the verifier-group actor)
calls ``verify`` on. ``TPVerifierGroup`` *is* a ``Verifier`` living in the calling
process as TP rank 0; it spawns ranks 1..T-1 as worker processes. Every rank holds
a ``LlamaRunner`` sharded over one ``torch.distributed`` process group (gloo on
CPU, NCCL on CUDA), so each forward pass runs on all ranks at once, joined by two
all-reduces per layer (see ``models/llama_runner.py``).

Who decides what: rank 0 alone builds the forward batches, runs the accept rule,
samples (with the requests' generators) and checks stop conditions, i.e. the whole
``Verifier``. Workers own no request state and draw no random numbers; they replay
rank 0's KV-cache operations in order: ``allocate``, ``free``, ``truncate``,
``compact`` (the committed outcome of each accept decision) and ``forward`` (the
committed pending tokens plus the drafts). Rank 0 sends them over one pipe per
worker, batched with the next ``forward``, and every forward is answered with the
worker's cache lengths, which rank 0 compares with its own: a rank that diverged is
an error, never silently wrong output.

Why pipes for commands and the process group only for the math: a worker waits
for its next command for as long as the engine is idle, which a collective with a
short timeout cannot do; a pipe can, and tells a worker at once when rank 0 is
gone. Collectives only run inside a forward, when every rank is busy, so their
timeout can be seconds.

Failure: a worker that dies or stops answering turns into ``TPGroupError`` naming
the rank: a dead one at once (gloo reports the closed peer, the exit status says
how it died), a hung one after ``collective_timeout_s`` plus 2 s. The group then
kills its other workers and every later call raises the same error. Start-up has no port race: rank 0 binds the
rendezvous ``TCPStore`` to port 0 and hands the port it got to the workers.
"""

from __future__ import annotations

import datetime
import logging
import signal
import time
import traceback
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from multiprocessing import connection as mp_connection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from specfleet.models.llama_runner import (
    DTYPES,
    ForwardItem,
    LlamaRunner,
    check_supported,
    check_tensor_parallel,
)
from specfleet.verifiers.verifier import Verifier

logger = logging.getLogger(__name__)

_REPLAYED = frozenset({"allocate", "free", "truncate", "compact", "forward"})
_POLL_S = 0.05  # how often rank 0 looks at worker liveness while it waits
_AFTER_ERROR_S = 2.0  # how long rank 0 waits for the workers' replies once its own step failed


class TPGroupError(RuntimeError):
    """A tensor-parallel group failed; it cannot be used any more. ``rank`` names the
    rank at fault when it is known."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank


@dataclass(frozen=True)
class _WorkerSpec:
    """Everything a worker needs to build its shard; pickled once at spawn."""

    source: Any  # checkpoint dir / zoo spec (str), or (config, state_dict) of a model in memory
    size: int  # tensor-parallel world size
    devices: tuple[str, ...]  # device of each rank
    dtype: str
    max_slots: int
    max_seq_len: int
    store_host: str
    store_port: int
    backend: str  # "gloo" or "nccl"
    collective_timeout_s: float
    startup_timeout_s: float
    threads: int  # torch threads per worker


def rank_devices(device: str | None, tp_size: int) -> tuple[str, ...]:
    """Each rank's device from a config's single ``verifier.device``: ``"cpu"`` for every
    rank on CPU; ``"cuda"`` / ``"cuda:k"``: consecutive GPUs from 0 / from k."""
    dev = torch.device(device or "cpu")
    if dev.type == "cpu":
        return ("cpu",) * tp_size
    first = dev.index or 0
    return tuple(f"{dev.type}:{first + r}" for r in range(tp_size))


def make_process_group(
    store: dist.Store, rank: int, size: int, *, backend: str, timeout_s: float
) -> Any:
    """A gloo or NCCL process group over ``store``, without touching torch.distributed's
    global default group (rank 0 lives in the caller's process, which may have its own)."""
    timeout = datetime.timedelta(seconds=timeout_s)
    prefixed = dist.PrefixStore("specfleet-tp", store)
    if backend == "gloo":
        options = dist.ProcessGroupGloo._Options()
        options._timeout = timeout
        # Every rank runs on this machine (spawned here), so loopback is the right interface
        # whatever the host name resolves to.
        options._devices = [dist.ProcessGroupGloo.create_device(hostname="127.0.0.1")]
        return dist.ProcessGroupGloo(prefixed, rank, size, options)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        return dist.ProcessGroupNCCL(prefixed, rank, size, options)
    raise ValueError(f"backend must be 'gloo' or 'nccl', got {backend!r}")


def _load_model(source: Any, dtype: str):
    """The unsharded HF model on CPU (each rank slices it while building its runner)."""
    if isinstance(source, (str, Path)):
        from specfleet.models.loading import load_causal_lm

        return load_causal_lm(source, device="cpu", dtype=dtype)
    from transformers import AutoModelForCausalLM

    config, state_dict = source
    # Meta init skips a random initialisation that the real weights would overwrite.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(state_dict, assign=True)
    return model.eval()


def _cache_lengths(runner: LlamaRunner) -> dict[str, int]:
    return {rid: runner.length(rid) for rid in runner.active_requests}


def _worker_main(rank: int, spec: _WorkerSpec, conn) -> None:
    """Rank ``rank`` >= 1: build the shard, then replay rank 0's cache operations."""
    torch.set_num_threads(spec.threads)
    device = spec.devices[rank]
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # one bar from rank 0 is enough
        if device.startswith("cuda"):
            torch.cuda.set_device(torch.device(device))
        model = _load_model(spec.source, spec.dtype)
        conn.send(("loaded",))
        store = dist.TCPStore(
            spec.store_host, spec.store_port, spec.size, is_master=False,
            timeout=datetime.timedelta(seconds=spec.startup_timeout_s),
        )
        group = make_process_group(
            store, rank, spec.size, backend=spec.backend, timeout_s=spec.collective_timeout_s
        )
        runner = LlamaRunner(
            model, max_slots=spec.max_slots, max_seq_len=spec.max_seq_len,
            device=device, dtype=spec.dtype, tp_group=group,
        )
        del model
        conn.send(("ready",))
    except Exception:
        conn.send(("failed", traceback.format_exc()))
        return
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # rank 0 is gone: nothing left to serve
        if message[0] == "shutdown":
            return
        try:
            for name, args in message[1]:
                if name not in _REPLAYED:
                    raise ValueError(f"unknown runner operation {name!r}")
                getattr(runner, name)(*args)
            reply = ("ok", _cache_lengths(runner), "")
        except Exception as exc:
            # Deterministic errors (a bad request) hit rank 0 identically and leave every
            # rank in the same state; rank 0 compares outcomes and decides.
            reply = ("error", _cache_lengths(runner), f"{type(exc).__name__}: {exc}")
            logger.debug("rank %d: %s", rank, traceback.format_exc())
        try:
            conn.send(reply)
        except (BrokenPipeError, OSError):
            return  # rank 0 is gone


@dataclass
class _Worker:
    rank: int
    process: Any  # multiprocessing SpawnProcess
    conn: Any  # rank 0's end of the command pipe

    def death(self) -> str | None:
        """How the worker died, or None while it runs."""
        code = self.process.exitcode
        if code is None:
            return None
        if code < 0:
            try:
                return f"was killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with code {code}"


class _WorkerPool:
    """Rank 0's side of the command pipes: send, await replies, detect dead ranks."""

    def __init__(self, workers: list[_Worker], reply_timeout_s: float):
        self.workers = workers
        self.reply_timeout_s = reply_timeout_s
        self.failure: TPGroupError | None = None

    def check_alive(self) -> None:
        if self.failure is not None:
            raise TPGroupError(f"the tensor-parallel group is unusable: {self.failure}",
                               self.failure.rank)
        for w in self.workers:
            if w.death() is not None:
                self.fail(self._dead(w))

    def send(self, message: tuple) -> None:
        self.check_alive()
        for w in self.workers:
            try:
                w.conn.send(message)
            except (BrokenPipeError, EOFError, OSError):
                self._wait_for_exit(w)
                self.fail(self._dead(w))

    def replies(self, timeout_s: float | None = None) -> list[tuple]:
        """One reply per worker, in rank order; raises TPGroupError for a dead or mute rank.

        Waits on all pipes at once, so whichever rank fails first is reported first.
        """
        timeout_s = timeout_s or self.reply_timeout_s
        deadline = time.monotonic() + timeout_s
        pending = {id(w.conn): w for w in self.workers}
        got: dict[int, tuple] = {}
        while pending:
            for conn in mp_connection.wait(list(w.conn for w in pending.values()), _POLL_S):
                w = pending.pop(id(conn))
                try:
                    got[w.rank] = conn.recv()
                except (EOFError, OSError):
                    self._wait_for_exit(w)
                    self.fail(self._dead(w))
            for w in pending.values():
                if w.death() is not None:
                    self.fail(self._dead(w))
            if pending and time.monotonic() > deadline:
                w = next(iter(pending.values()))
                self.fail(TPGroupError(
                    f"tensor-parallel rank {w.rank} (pid {w.process.pid}) did not answer "
                    f"within {timeout_s:.1f}s (hung?)", w.rank))
        return [got[w.rank] for w in self.workers]

    def fail(self, error: TPGroupError) -> None:
        """Record the group's failure, stop every worker, raise ``error``."""
        if self.failure is None:
            self.failure = error
            logger.error("%s; shutting the tensor-parallel group down", error)
            self.kill()
        raise error

    def kill(self) -> None:
        for w in self.workers:
            if w.process.is_alive():
                w.process.kill()  # SIGKILL: also ends a stopped or hung worker
        for w in self.workers:
            w.process.join(timeout=5)
            w.conn.close()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        if self.failure is None:
            self.failure = TPGroupError("the tensor-parallel group was closed")
        for w in self.workers:
            try:
                w.conn.send(("shutdown",))
            except (BrokenPipeError, EOFError, OSError):
                pass
        deadline = time.monotonic() + timeout_s
        for w in self.workers:
            w.process.join(timeout=max(0.0, deadline - time.monotonic()))
        self.kill()

    @staticmethod
    def _wait_for_exit(w: _Worker, timeout_s: float = 2.0) -> None:
        # A closed pipe or socket can be seen a moment before the exit status is.
        w.process.join(timeout=timeout_s)

    def _dead(self, w: _Worker) -> TPGroupError:
        how = w.death() or "closed its command pipe"
        return TPGroupError(f"tensor-parallel rank {w.rank} (pid {w.process.pid}) {how}", w.rank)


class _LeaderRunner:
    """Rank 0's runner: runs every cache operation locally and replays it on the workers.

    Reads (``length``, ``has``, ``vocab_size``, ...) go straight to the local runner.
    Operations without collectives are queued and travel with the next ``forward``,
    so a verification round costs one message per worker and one reply.
    """

    def __init__(self, runner: LlamaRunner, pool: _WorkerPool):
        self._runner = runner
        self._pool = pool
        self._queued: list[tuple[str, tuple]] = []

    def __getattr__(self, name: str):
        return getattr(self._runner, name)

    def allocate(self, request_id: str) -> None:
        self._pool.check_alive()
        self._runner.allocate(request_id)
        self._queued.append(("allocate", (request_id,)))

    def free(self, request_id: str) -> None:
        self._runner.free(request_id)
        self._queued.append(("free", (request_id,)))

    def truncate(self, request_id: str, length: int) -> None:
        self._runner.truncate(request_id, length)
        self._queued.append(("truncate", (request_id, length)))

    def compact(self, request_id: str, base: int, keep: list[int]) -> None:
        self._runner.compact(request_id, base, keep)
        self._queued.append(("compact", (request_id, base, list(keep))))

    def forward(self, items: list[ForwardItem]) -> list[torch.Tensor]:
        if not items:
            return []
        # Only rank 0 reads logits: workers skip the final norm and the LM head.
        worker_items = [replace(it, logit_rows=[]) for it in items]
        ops, self._queued = self._queued + [("forward", (worker_items,))], []
        self._pool.send(("run", ops))
        error: Exception | None = None
        logits: list[torch.Tensor] = []
        try:
            logits = self._runner.forward(items)
        except Exception as exc:  # judged below, once the workers' outcomes are known
            error = exc
        try:
            # After an error here the workers have failed alike at the same moment (or
            # are the reason): no need to wait a whole reply timeout for them.
            self._judge(error, self._pool.replies(_AFTER_ERROR_S if error else None))
        except TPGroupError as group_error:
            raise group_error from error  # keep rank 0's own symptom (e.g. gloo's) visible
        return logits

    def _judge(self, error: Exception | None, replies: list[tuple]) -> None:
        """Every rank must have had the same outcome and hold the same cache lengths."""
        mine = ("error" if error else "ok", f"{type(error).__name__}: {error}" if error else "")
        lengths = _cache_lengths(self._runner)
        for w, (status, their_lengths, message) in zip(self._pool.workers, replies):
            if (status, message) != mine:
                detail = message or "succeeded"
                self._pool.fail(TPGroupError(
                    f"tensor-parallel rank {w.rank} disagrees with rank 0 on a forward pass "
                    f"(rank {w.rank}: {detail}; rank 0: {mine[1] or 'succeeded'})", w.rank))
            if their_lengths != lengths:
                self._pool.fail(TPGroupError(
                    f"tensor-parallel rank {w.rank}'s KV cache diverged from rank 0's "
                    f"({their_lengths} vs {lengths})", w.rank))
        if error is not None:
            raise error  # the same deterministic error everywhere: the group is still sound


class TPVerifierGroup(Verifier):
    """A ``Verifier`` whose target is split over ``tp_size`` ranks (this process is rank 0).

    ``model``: a checkpoint directory or zoo spec (every rank loads it), or a Hugging
    Face model in memory (its weights reach the workers through shared memory).
    ``devices``: one per rank, or one string for all (``rank_devices``; default
    ``"cpu"``); CUDA devices select NCCL, CPU devices gloo. Use it as a context manager or call ``close``; workers are daemons, so they
    also end with this process.
    """

    def __init__(
        self,
        model: Any,
        tp_size: int,
        *,
        max_slots: int,
        max_seq_len: int,
        devices: str | Sequence[str] | None = None,
        dtype: str = "float32",
        eos_token_ids: Sequence[int] = (),
        decode: Callable[[list[int]], str] | None = None,
        collective_timeout_s: float = 10.0,
        startup_timeout_s: float = 300.0,
        worker_threads: int = 1,
    ):
        devices = rank_devices(devices, tp_size) if isinstance(devices, str) or devices is None \
            else tuple(devices)
        if len(devices) != tp_size:
            raise ValueError(f"devices: expected {tp_size} entries (one per rank), got {len(devices)}")
        if len({torch.device(d).type for d in devices}) != 1:
            raise ValueError(f"devices: all ranks need the same kind of device, got {devices}")
        if worker_threads < 1:
            raise ValueError(f"worker_threads: must be >= 1, got {worker_threads}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        config = _config_of(model)
        # Refuse an unsupported model before any process starts.
        check_supported(config, max_seq_len)
        check_tensor_parallel(config, tp_size)
        self.tp_size = tp_size
        self.devices = devices
        self._pool = _WorkerPool([], reply_timeout_s=collective_timeout_s + 2.0)
        if tp_size == 1:
            runner = LlamaRunner(_in_memory(model, dtype), max_slots=max_slots,
                                 max_seq_len=max_seq_len, device=devices[0], dtype=dtype)
            super().__init__(runner, eos_token_ids=eos_token_ids, decode=decode)
            return

        backend = "nccl" if devices[0].startswith("cuda") else "gloo"
        store = dist.TCPStore(
            "127.0.0.1", 0, tp_size, is_master=True, wait_for_workers=False,
            timeout=datetime.timedelta(seconds=startup_timeout_s),
        )
        source = str(model) if isinstance(model, (str, Path)) else (
            model.config, {k: v.detach().cpu() for k, v in model.state_dict().items()})
        spec = _WorkerSpec(
            source=source, size=tp_size,
            devices=devices, dtype=dtype, max_slots=max_slots, max_seq_len=max_seq_len,
            store_host="127.0.0.1", store_port=store.port, backend=backend,
            collective_timeout_s=collective_timeout_s, startup_timeout_s=startup_timeout_s,
            threads=worker_threads,
        )
        ctx = mp.get_context("spawn")
        for rank in range(1, tp_size):
            ours, theirs = ctx.Pipe()
            process = ctx.Process(target=_worker_main, args=(rank, spec, theirs), daemon=True,
                                  name=f"specfleet-tp-rank{rank}")
            process.start()
            theirs.close()  # only the worker holds it now, so its death reads as EOF here
            self._pool.workers.append(_Worker(rank, process, ours))
        self._finalizer = weakref.finalize(self, self._pool.kill)
        try:
            hf_model = _in_memory(model, dtype)  # loads while the workers load theirs
            self._await_startup("loaded", startup_timeout_s)
            # Everyone is loaded and joins the rendezvous within moments now: a worker that
            # dies meanwhile must not leave rank 0 waiting for the whole start-up timeout.
            store.set_timeout(datetime.timedelta(seconds=collective_timeout_s))
            group = make_process_group(store, 0, tp_size, backend=backend,
                                       timeout_s=collective_timeout_s)
            runner = LlamaRunner(hf_model, max_slots=max_slots, max_seq_len=max_seq_len,
                                 device=devices[0], dtype=dtype, tp_group=group)
            del hf_model
            self._await_startup("ready", startup_timeout_s)
        except TPGroupError:
            raise  # already names the rank; the workers are stopped
        except BaseException as exc:
            # Rank 0's symptom (say, a rendezvous timeout) usually has a worker's report
            # behind it; that report is the useful message.
            report = self._startup_report()
            self._pool.kill()
            if report is None or not isinstance(exc, Exception):
                raise
            raise _start_failure(*report) from exc
        self._store = store  # the rendezvous must outlive the workers' connections
        self._group = group
        super().__init__(_LeaderRunner(runner, self._pool), eos_token_ids=eos_token_ids,
                         decode=decode)
        logger.info("tensor-parallel verifier group up: %d ranks, %s on %s", tp_size, backend,
                    ", ".join(devices))

    def _await_startup(self, stage: str, timeout_s: float) -> None:
        for w, reply in zip(self._pool.workers, self._pool.replies(timeout_s)):
            if reply[0] == "failed":
                self._pool.fail(_start_failure(w.rank, reply[1]))
            if reply[0] != stage:
                self._pool.fail(TPGroupError(
                    f"tensor-parallel rank {w.rank}: expected {stage!r}, got {reply[0]!r}", w.rank))

    def _startup_report(self) -> tuple[int, str] | None:
        for w in self._pool.workers:
            try:
                while w.conn.poll(0):
                    message = w.conn.recv()
                    if message[0] == "failed":
                        return w.rank, message[1]
            except (EOFError, OSError):
                if w.death() is not None:
                    return w.rank, w.death()
        return None

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of ranks 1..T-1 (operators and failure tests use them)."""
        return [w.process.pid for w in self._pool.workers]

    @property
    def failed(self) -> TPGroupError | None:
        return self._pool.failure

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        self._pool.shutdown()

    def __enter__(self) -> TPVerifierGroup:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _start_failure(rank: int, report: str) -> TPGroupError:
    """The worker's own last line first (the cause), then its traceback."""
    cause = next((line for line in reversed(report.strip().splitlines()) if line.strip()), report)
    return TPGroupError(f"tensor-parallel rank {rank} failed to start: {cause.strip()}\n{report}", rank)


def _config_of(model: Any):
    if isinstance(model, (str, Path)):
        from transformers import AutoConfig

        from specfleet.models.loading import resolve_model_path

        return AutoConfig.from_pretrained(resolve_model_path(model), local_files_only=True)
    return model.config


def _in_memory(model: Any, dtype: str):
    return _load_model(model, dtype) if isinstance(model, (str, Path)) else model
