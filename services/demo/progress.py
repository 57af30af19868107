"""Progress bars for several training jobs at once.

On a terminal the bars are redrawn in place (ANSI cursor-up); in a log or a pipe, where
redrawing would leave a mess, each bar prints a line when its state changes and at every
quarter of its steps. Updates come from several watcher threads, hence the lock.
"""

from __future__ import annotations

import dataclasses
import sys
import threading
import time
from typing import TextIO

WIDTH = 24


@dataclasses.dataclass
class Bar:
    label: str
    state: str = "QUEUED"
    step: int = 0
    total: int = 0
    loss: float | None = None
    tokens_per_second: float = 0.0
    eta_seconds: float | None = None
    quarters_printed: int = 0

    def render(self) -> str:
        done = self.step / self.total if self.total else 0.0
        filled = int(done * WIDTH)
        parts = [f"{self.label:<22} [{'#' * filled}{'-' * (WIDTH - filled)}] {self.step:>4}/{self.total:<4}"]
        if self.loss is not None:
            parts.append(f"loss {self.loss:7.4f}")
        if self.tokens_per_second:
            parts.append(f"{self.tokens_per_second:6.0f} tok/s")
        if self.eta_seconds is not None and self.state == "RUNNING":
            parts.append(f"eta {self.eta_seconds:4.0f}s")
        parts.append(self.state)
        return "  ".join(parts)


class ProgressBoard:
    def __init__(self, labels: list[str], stream: TextIO | None = None, live: bool | None = None,
                 min_redraw_seconds: float = 0.1) -> None:
        self.stream = stream or sys.stdout
        self.live = self.stream.isatty() if live is None else live
        self.bars = {label: Bar(label) for label in labels}
        self._lock = threading.Lock()
        self._drawn = False
        # A job reports every optimizer step; a terminal needs no more than ~10 frames a second.
        self._min_redraw, self._last_draw = min_redraw_seconds, 0.0

    def update(self, label: str, **fields) -> None:
        with self._lock:
            bar = self.bars[label]
            previous_state = bar.state
            for name, value in fields.items():
                setattr(bar, name, value)
            if self.live:
                now = time.monotonic()
                if bar.state != previous_state or now - self._last_draw >= self._min_redraw:
                    self._redraw()
                    self._last_draw = now
                return
            quarter = 4 * bar.step // bar.total if bar.total else 0
            if bar.state != previous_state or quarter > bar.quarters_printed:
                bar.quarters_printed = max(quarter, bar.quarters_printed)
                print(f"  {bar.render()}", file=self.stream, flush=True)

    def _redraw(self) -> None:
        if self._drawn:
            self.stream.write(f"\x1b[{len(self.bars)}F")  # back to the first bar's line
        for bar in self.bars.values():
            self.stream.write(f"\x1b[2K  {bar.render()}\n")
        self.stream.flush()
        self._drawn = True
