"""The engine thread: a ``GenerationBackend`` over an engine driver.

Where it sits: the gRPC servicer (``router/servicer.py``) streams
``GenerationChunk``s (``core/serving.py``) from a ``GenerationBackend``.
``EngineBackend`` runs an ``EngineDriver`` on a dedicated thread: the in-process
engine (tests, single-machine serving) or, as ``cluster.runtime.RayBackend``, the
driver over drafter and verifier actors. The servicer never knows which.

Continuous batching: requests are admitted into the running engine between rounds,
so a new request never waits for the current batch to finish.

Observability without locks: after every round the engine thread publishes a fresh
``LoadSnapshot`` (``load_snapshot``, an immutable value other threads may read at any
time) and hands each new ``RoundTiming`` to ``round_observer`` if one is set; while
one is set it also publishes ``fleet_snapshot`` (worker failures, the router's table).
The frontend's Prometheus export (``router/metrics.py``) reads these, never the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from specfleet.core.load import LoadSnapshot
from specfleet.core.serving import (
    BackendInfo,
    ChunkError,
    DrafterInfo,
    ErrorCode,
    GenerationChunk,
    GenerationRequest,
    VerifierGroupInfo,
)
from specfleet.core.stats import RoundTiming
from specfleet.core.types import FinishReason
from specfleet.core.workers import WorkerUnavailable

logger = logging.getLogger(__name__)


def backend_info(cfg, *, vocab_size: int, max_seq_len: int) -> BackendInfo:
    """What ``Info`` reports for a deployment of ``cfg``."""
    vcfg = cfg.verifier
    return BackendInfo(
        target=cfg.models.target,
        tokenizer=cfg.models.tokenizer or cfg.models.target,
        vocab_size=vocab_size,
        max_seq_len=max_seq_len,
        drafters=[DrafterInfo(d.name, d.kind, d.domain) for d in cfg.drafters],
        verifier_groups=[VerifierGroupInfo(g, vcfg.tp_size, vcfg.device, vcfg.dtype)
                         for g in range(vcfg.count)],
    )


@dataclass(frozen=True)
class FleetSnapshot:
    """Fleet-wide state for metrics, copied on the engine thread after a round."""

    draft_failures: dict[str, int] = field(default_factory=dict)  # drafter → failed calls
    verify_failures: dict[int, int] = field(default_factory=dict)  # group → failed calls
    # domain → drafter → the router's current score (``ExpertiseRouter.table``); empty
    # without a router.
    router_table: dict[str, dict[str, float]] = field(default_factory=dict)


class EngineBackend:
    """Runs a ``SpecEngine`` on its own thread; asyncio callers stream from it.

    The engine is not thread-safe, so only the engine thread touches it: callers
    post commands to an inbox, and results come back through each request's
    asyncio queue via ``loop.call_soon_threadsafe``.
    """

    def __init__(self, engine, info: BackendInfo, *, start_drafter: Callable | None = None):
        """Requests without a drafter preference are routed by the engine (its router,
        or its default drafter). ``start_drafter(DrafterConfig) -> worker`` builds a
        drafter joining at run time (None: this backend cannot add drafters)."""
        self.engine = engine
        self._info = info
        self._start_drafter = start_drafter
        self._inbox: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._closed = threading.Event()
        # Read by other threads (metrics): replaced, never mutated, by the engine thread.
        self.load_snapshot: LoadSnapshot = engine.load()
        # Called on the engine thread with each round's timing; must be quick (metrics).
        self.round_observer: Callable[[RoundTiming], None] | None = None
        self.fleet_snapshot = FleetSnapshot()
        self._last_timing: RoundTiming | None = None
        engine.token_sink = self._on_tokens
        self._thread = threading.Thread(target=self._run, name="specfleet-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_config(cls, cfg) -> EngineBackend:
        """The in-process engine, router and info described by a ``SpecFleetConfig``."""
        from specfleet.engine.builder import build_engine, with_context_length

        cfg = with_context_length(cfg)
        engine = build_engine(cfg)
        runner = engine.verifier.runner
        info = backend_info(cfg, vocab_size=runner.vocab_size, max_seq_len=runner.max_seq_len)

        def start_drafter(dcfg):
            from specfleet.engine.builder import build_drafter
            from specfleet.engine.executor import LocalDraftWorker

            return LocalDraftWorker(build_drafter(dcfg, target=cfg.models.target,
                                                  max_slots=cfg.verifier.max_batch_size * cfg.verifier.count,
                                                  max_seq_len=cfg.verifier.max_seq_len,
                                                  device=cfg.verifier.device))

        return cls(engine, info, start_drafter=start_drafter)

    def info(self) -> BackendInfo:
        return self._info

    def active_request_ids(self) -> list[str]:
        return self.engine.request_ids

    def worker_restarts(self) -> tuple[dict[str, int], dict[int, int]]:
        """(drafter → restarts, verifier group → restarts) since start. In-process
        workers are plain objects that are never restarted; the Ray backend's are actors."""
        return {}, {}

    async def stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        if self._closed.is_set():
            raise RuntimeError("backend is shut down")
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue = asyncio.Queue()
        self._streams[request.request_id] = (loop, chunks)
        self._inbox.put(("submit", request))
        finished = False
        try:
            while True:
                chunk = await chunks.get()
                # Set before yielding: a consumer that stops right after the last chunk
                # closes us at this yield, and a finished request needs no cancel.
                finished = chunk.finish_reason is not None or chunk.error is not None
                yield chunk
                if finished:
                    return
        finally:
            self._streams.pop(request.request_id, None)
            if not finished:  # the consumer went away: stop the work, free the caches
                self._inbox.put(("cancel", request.request_id))

    # ---- the fleet (admin API) ----------------------------------------------------------
    async def add_drafter(self, dcfg) -> list[DrafterInfo]:
        """Start a drafter from its config and let the engine route to it. Raises
        ValueError (bad or duplicate config) or the builder's error (a model that
        does not load); the running requests are never touched by a failure."""
        if self._start_drafter is None:
            raise NotImplementedError("this backend cannot add drafters")
        if any(d.name == dcfg.name for d in self._info.drafters):
            raise ValueError(f"drafter {dcfg.name!r} is already deployed")
        worker = await asyncio.to_thread(self._start_drafter, dcfg)  # loading is slow: off the loop
        from specfleet.policy.routing import DrafterProfile

        try:
            await self._on_engine_thread(self.engine.add_drafter, DrafterProfile(dcfg.name, dcfg.domain), worker)
        except BaseException:
            await asyncio.to_thread(self._stop_drafter, worker)
            raise
        self._info = dataclasses.replace(
            self._info, drafters=[*self._info.drafters, DrafterInfo(dcfg.name, dcfg.kind, dcfg.domain)])
        return list(self._info.drafters)

    async def remove_drafter(self, name: str) -> list[DrafterInfo]:
        """Stop a drafter between rounds; its requests go on. Raises ValueError for an
        unknown name or the last drafter of a routed fleet."""
        worker = await self._on_engine_thread(self.engine.remove_drafter, name)
        await asyncio.to_thread(self._stop_drafter, worker)
        self._info = dataclasses.replace(self._info, drafters=[d for d in self._info.drafters if d.name != name])
        return list(self._info.drafters)

    def _stop_drafter(self, worker) -> None:
        """In-process workers need nothing; the Ray backend stops the actor."""

    async def _on_engine_thread(self, fn, *args):
        """Run ``fn(*args)`` on the engine thread between rounds and await its result."""
        if self._closed.is_set():
            raise RuntimeError("backend is shut down")
        done: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(("call", (fn, args, done)))
        return await asyncio.wrap_future(done)

    async def close(self) -> None:
        self._closed.set()
        self._inbox.put(("stop", None))
        await asyncio.to_thread(self._thread.join, 30)

    # ---- engine thread ------------------------------------------------------------
    def _emit(self, chunk: GenerationChunk) -> None:
        target = self._streams.get(chunk.request_id)
        if target is not None:
            loop, chunks = target
            loop.call_soon_threadsafe(chunks.put_nowait, chunk)

    def _on_tokens(self, request_id: str, tokens: list[int]) -> None:
        self._emit(GenerationChunk(request_id, list(tokens)))

    def _handle(self, command: str, payload) -> None:
        if command == "submit":
            request: GenerationRequest = payload
            drafter = request.drafter if request.speculate else None
            try:
                self.engine.submit(
                    request.prompt_token_ids, request.sampling, drafter=drafter,
                    request_id=request.request_id, max_draft_length=request.max_draft_length,
                    route=request.speculate,
                )
            except ValueError as exc:
                error = ChunkError(ErrorCode.INVALID_ARGUMENT, str(exc))
                self._emit(GenerationChunk(request.request_id, [], error=error))
        elif command == "cancel":
            self.engine.cancel(payload)
        elif command == "call":
            fn, args, done = payload
            try:
                done.set_result(fn(*args))
            except BaseException as exc:  # reported to the caller, never kills the engine thread
                done.set_exception(exc)

    def _run(self) -> None:
        while not self._closed.is_set():
            block = not self.engine.has_work
            try:
                command, payload = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
            except queue.Empty:
                command = None
                if block:
                    self.engine.idle()
            if command == "stop":
                break
            if command is not None:
                self._handle(command, payload)
                self.load_snapshot = self.engine.load()
                continue  # drain the inbox before the next round
            if not self.engine.has_work:
                continue
            try:
                # A verifier group given up while another is available is evicted inside
                # the step (its requests move, exactly): nobody fails for it.
                finished = self.engine.step()
            except WorkerUnavailable as exc:  # no group left to serve on: the client may retry later
                logger.error("engine round failed: %s", exc)
                self._fail_all(str(exc), ErrorCode.UNAVAILABLE)
                continue
            except Exception as exc:  # a failed round must not kill the server
                logger.exception("engine round failed")
                self._fail_all(str(exc))
                continue
            self._publish()
            self._emit_finished(finished)

    def _emit_finished(self, finished) -> None:
        for out in finished:
            if out.finish_reason == FinishReason.ERROR:  # this request alone failed
                error = ChunkError(ErrorCode.INTERNAL, out.error or "request failed")
                self._emit(GenerationChunk(out.request_id, [], error=error))
            elif out.finish_reason != FinishReason.CANCELLED:
                self._emit(
                    GenerationChunk(out.request_id, [], out.finish_reason, out.stats, seed=out.seed)
                )

    def _publish(self) -> None:
        """The load after this round, and the rounds' timings since the last call."""
        self.load_snapshot = self.engine.load()
        timings = getattr(self.engine, "timings", None)
        if not timings:
            return
        new: list[RoundTiming] = []
        for timing in reversed(timings):  # the deque holds the latest rounds; walk back to the last seen
            if timing is self._last_timing:
                break
            new.append(timing)
        self._last_timing = timings[-1]
        observer = self.round_observer
        if observer is not None:
            stats = self.engine.stats
            table = getattr(self.engine.router, "table", None)
            self.fleet_snapshot = FleetSnapshot(
                dict(stats.draft_failures), dict(stats.verify_failures),
                table() if table is not None else {},
            )
            for timing in reversed(new):
                try:
                    observer(timing)
                except Exception:  # metrics must never stop the engine
                    logger.exception("round observer failed")
                    break

    def _fail_all(self, message: str, code: ErrorCode = ErrorCode.INTERNAL) -> None:
        message = message.strip().splitlines()[0][:200] if message.strip() else "engine failure"
        for rid in self.engine.request_ids:
            self.engine.cancel(rid)
            self._emit(GenerationChunk(rid, [], error=ChunkError(code, message)))
        # Drain the cancelled outputs; a request that finished in the failed step (another
        # group's round came back) still gets its last chunk.
        self._emit_finished(self.engine.step())
