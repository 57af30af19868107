"""AsyncEngine: runs LLMEngine steps on a dedicated thread and streams outputs to asyncio.

Forward passes block for milliseconds to seconds, so they must not run on the event loop
that serves gRPC. All engine state (scheduler, pool, KV cache) is touched only by the
engine thread; the event loop talks to it through a command queue (`call`) and receives
outputs through per-request asyncio queues.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from services.inference.engine.llm_engine import LLMEngine, RequestOutput
from services.inference.engine.sampling_params import SamplingParams
from services.inference.engine.structured import JsonGrammar
from services.inference.engine.torch_thread import TorchThread

log = logging.getLogger("loraplex.engine")
IDLE_WAIT_SECONDS = 0.01  # an idle engine re-checks this often even without a wake-up
T = TypeVar("T")


class AsyncEngine:
    def __init__(self, engine: LLMEngine, torch_thread: TorchThread | None = None) -> None:
        self.engine = engine
        self._torch_thread = torch_thread or TorchThread()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._stopping = False
        self._streams: dict[int, asyncio.Queue] = {}
        self._ids = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._running = None

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._running = self._torch_thread.start(self._run)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._running is not None:
            self._running.result(timeout=30)
        self._torch_thread.shutdown()

    async def call(self, fn: Callable[[], T]) -> T:
        """Runs fn on the engine thread between steps and returns its result (or raises)."""
        future = self._loop.create_future()
        self._commands.put((fn, future))
        self._wake.set()
        return await future

    def wake(self) -> None:
        """Something the scheduler waits on changed (e.g. an adapter arrived)."""
        self._wake.set()

    def fail_adapter(self, adapter_key: str, sha256: str, error: Exception) -> None:
        """Requests waiting for these adapter bytes ("" = any) can never run (e.g. the adapter was
        deleted from the Registry after they queued): they end with the error rather than
        waiting forever. Thread-safe; the engine thread drops them between steps."""
        def fail_waiting() -> None:
            seq_ids = self.engine.scheduler.waiting_for(adapter_key, sha256)
            for seq_id in seq_ids:
                self.engine.abort(seq_id)
            self._loop.call_soon_threadsafe(self._deliver_error, seq_ids, error)

        self._commands.put((fail_waiting, None))
        self._wake.set()

    async def generate(self, prompt_token_ids: list[int], sampling: SamplingParams, adapter_key: str | None,
                       request_id: str = "", adapter_sha256: str = "", cache_scope: str = "",
                       on_queued: Callable[[], None] = lambda: None,
                       grammar: JsonGrammar | None = None) -> AsyncIterator[RequestOutput]:
        """Streams a request's outputs; leaving early (cancel) aborts it on the engine at once.
        on_queued runs once the engine accepted it (not when the queue was full). grammar: its
        compiled structured output, used by the engine thread alone from here on."""
        seq_id = next(self._ids)
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[seq_id] = stream
        finished = False
        try:
            await self.call(lambda: self.engine.add(prompt_token_ids, sampling, adapter_key, request_id, seq_id,
                                                    adapter_sha256, cache_scope, grammar))
            on_queued()
            while not finished:
                item = await stream.get()
                if isinstance(item, BaseException):
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            self._streams.pop(seq_id, None)
            if not finished:
                self._commands.put((lambda: self.engine.abort(seq_id), None))
                self._wake.set()

    # --- engine thread ---
    def _run(self) -> None:
        while not self._stopping:
            self._run_commands()
            if not self.engine.has_work:
                self._wake.wait(timeout=0.5)
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except BaseException as exc:  # noqa: BLE001 - a bug must not kill the node silently
                log.exception("engine step failed; failing the requests in flight")
                self._fail_all(_as_exception(exc))
                continue
            if outputs:
                self._loop.call_soon_threadsafe(self._deliver, outputs)
            elif self.engine.idle:  # waiting on adapters: sleep until one arrives, not spin
                self._wake.wait(timeout=IDLE_WAIT_SECONDS)
                self._wake.clear()

    def _run_commands(self) -> None:
        while True:
            try:
                fn, future = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                result, error = fn(), None
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                result, error = None, _as_exception(exc)
            if future is not None:
                self._loop.call_soon_threadsafe(_settle, future, result, error)

    def _fail_all(self, error: Exception) -> None:
        for seq_id in list(self._streams):
            self.engine.abort(seq_id)
        self._loop.call_soon_threadsafe(self._deliver_error, list(self._streams), error)

    # --- event loop ---
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            stream = self._streams.get(output.seq_id)
            if stream is not None:
                stream.put_nowait(output)

    def _deliver_error(self, seq_ids: list[int], error: Exception) -> None:
        for seq_id in seq_ids:
            if (stream := self._streams.get(seq_id)) is not None:
                stream.put_nowait(error)


def _as_exception(error: BaseException) -> Exception:
    """What a failure on the engine thread is handed over as. A native extension's panic
    (pyo3's PanicException, e.g. from llguidance or tokenizers) is a BaseException, not an
    Exception: uncaught it ended the engine thread, and every request hung; handed to asyncio
    as it is, it would escape the event loop. Interpreter exits still end the thread."""
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        raise error
    if isinstance(error, Exception):
        return error
    return RuntimeError(f"the engine failed: {type(error).__name__}: {error}")


def _settle(future: asyncio.Future, result: Any, error: Exception | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
