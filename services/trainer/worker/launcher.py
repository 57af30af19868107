"""Starting training workers fast: forked from a fork server that has torch, transformers and
peft imported already.

Importing the training stack takes 4-6 s on the CI machines, longer than many fine-tuning
jobs on a small model. multiprocessing's fork server (one per trainer process, started at
trainer start-up so its imports overlap with idle time) pays that once; each job's worker is
a fresh fork of it, so a job starts in a fraction of a second and still gets a process of its
own (see protocol.py for why a process). The server holds no CUDA context (importing torch
does not create one), so forking from it is safe, and each worker picks its GPU with
CUDA_VISIBLE_DEVICES before touching CUDA.

`WorkerProcess` is the trainer's handle: events arrive through a pipe read by a small thread
and are handed to the event loop; commands go down another pipe whose end of file tells the
worker its trainer is gone.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
from collections.abc import AsyncIterator
from pathlib import Path

from services.trainer.worker.protocol import decode_event

PRELOAD = ["services.trainer.worker.child"]
# Should any import ask torch.cuda.is_available(), answer through NVML, which (unlike the CUDA
# runtime) leaves nothing behind that a fork would break. Inherited by the fork server.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
_context = multiprocessing.get_context("forkserver")
_context.set_forkserver_preload(PRELOAD)


def _entry(*args) -> None:
    """Runs in the forked worker; the fork server has imported the module already."""
    from services.trainer.worker.child import run_child

    run_child(*args)


def warm_up() -> None:
    """Starts the fork server (it imports the training stack in the background). Blocking, quick."""
    from multiprocessing import forkserver

    forkserver.ensure_running()


class WorkerProcess:
    def __init__(self, spec_path: Path, log_path: Path, cuda_visible_devices: str | None) -> None:
        self._events_in, events_out = _context.Pipe(duplex=False)
        commands_in, self._commands_out = _context.Pipe(duplex=False)
        self._process = _context.Process(target=_entry, name="trainer-worker", daemon=False,
                                         args=(str(spec_path), str(log_path), cuda_visible_devices, events_out,
                                               commands_in))
        self._pending = (events_out, commands_in)

    @property
    def pid(self) -> int | None:
        return self._process.pid

    @property
    def exitcode(self) -> int | None:
        return self._process.exitcode

    async def start(self) -> None:
        await asyncio.to_thread(self._process.start)
        for end in self._pending:  # the worker holds its own copies; ours would hide its exit
            end.close()

    async def events(self) -> AsyncIterator[dict]:
        """The worker's events until its event pipe closes (it exited)."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()

        def pump() -> None:
            try:
                while True:
                    loop.call_soon_threadsafe(queue.put_nowait, self._events_in.recv_bytes())
            except (EOFError, OSError):
                pass
            except RuntimeError:  # the event loop is gone (trainer shutting down)
                return
            try:
                loop.call_soon_threadsafe(queue.put_nowait, None)
            except RuntimeError:
                pass

        threading.Thread(target=pump, name="worker-events", daemon=True).start()
        while (raw := await queue.get()) is not None:
            event = decode_event(raw)
            if event is not None:
                yield event

    async def wait(self) -> int:
        await asyncio.to_thread(self._process.join)
        self._events_in.close()
        self._commands_out.close()
        return self._process.exitcode

    def send(self, command: str) -> None:
        try:
            self._commands_out.send_bytes(command.encode())
        except (OSError, ValueError):  # already exited, or closed
            pass

    def kill(self) -> None:
        if self._process.exitcode is None:
            self._process.kill()
