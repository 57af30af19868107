"""The worker's side of the protocol: events out, commands in, whatever the transport."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from services.trainer.worker.protocol import CANCEL, STOP, encode_event


class Cancelled(Exception):
    """Raised at the next check after a `cancel` command (or when the trainer is gone)."""


class Control:
    def __init__(self, send: Callable[[bytes], None]) -> None:
        self._send = send
        self._lock = threading.Lock()
        self.cancelled = threading.Event()
        self.stop_requested = threading.Event()
        self.orphaned = threading.Event()

    def command(self, command: str) -> None:
        if command.strip() == CANCEL:
            self.cancelled.set()
        elif command.strip() == STOP:
            self.stop_requested.set()

    def orphan(self) -> None:
        """The trainer is gone: nobody will record the result, so stop at once."""
        self.orphaned.set()
        self.cancelled.set()

    def emit(self, event: str, **fields: Any) -> None:
        with self._lock:
            try:
                self._send(encode_event(event, **fields).encode())
            except (BrokenPipeError, OSError):
                self.orphan()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled()
