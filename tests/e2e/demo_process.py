"""`loraplex demo` as a real process: its own free ports, its output collected line by line."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from tests.conftest import REPO_ROOT, free_port

QUICK = ["--requests-per-customer", "4"]  # a shorter traffic run than the default
VENV_BIN = str(Path(sys.executable).parent)  # grpcurl and python, as a user's shell finds them


def stack_flags(data_dir: Path) -> list[str]:
    return ["--data-dir", str(data_dir), "--router-port", str(free_port()), "--registry-port", str(free_port()),
            "--trainer-port", str(free_port()), "--inference-port", str(free_port()),
            "--router-http-port", str(free_port()), "--metrics-base-port", "0"]


def shell_env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{VENV_BIN}:{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}


class DemoProcess:
    def __init__(self, *args: str, log: Path) -> None:
        self.log = log
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self.process = subprocess.Popen([sys.executable, "-m", "services.demo", *args], cwd=REPO_ROOT,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        env=shell_env())
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        with open(self.log, "w") as copy:
            for line in self.process.stdout:
                copy.write(line)
                copy.flush()
                with self._changed:
                    self.lines.append(line.rstrip("\n"))
                    self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for_line(self, text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((line for line in self.lines if text in line), None)
                if found is not None:
                    return found
                if self.process.poll() is not None and not self._reader.is_alive():
                    raise AssertionError(f"demo exited with {self.process.returncode} before printing {text!r}:\n"
                                         + self.output)
                if time.monotonic() > deadline:
                    raise AssertionError(f"no {text!r} after {timeout}s:\n{self.output}")
                self._changed.wait(timeout=1)

    def wait(self, timeout: float) -> int:
        code = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return code

    def value(self, key: str) -> str:
        """The value of a printed `KEY=value` line."""
        line = next(line for line in self.lines if line.startswith(f"{key}="))
        return line.split("=", 1)[1]

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
