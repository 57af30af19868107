"""The worker process's entry point when forked by the trainer (see launcher.py).

Importing this module imports the whole training stack; the fork server does it once.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path

from services.trainer.worker import train  # noqa: F401 - the point of preloading this module
from services.trainer.worker.control import Cancelled, Control
from services.trainer.worker.protocol import EXIT_CANCELLED, EXIT_FAILED, EXIT_ORPHANED, WorkerSpec


def run_child(spec_path: str, log_path: str, cuda_visible_devices: str | None, events, commands) -> None:
    """Trains one job; ends the process with an EXIT_* status."""
    os.setsid()  # a terminal's Ctrl-C goes to the trainer, which stops this worker in order
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    if cuda_visible_devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = cuda_visible_devices
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, force=True,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("loraplex.trainer.worker").info("worker pid %d for %s", os.getpid(), spec_path)

    def read_commands(control: Control) -> None:
        try:
            while True:
                control.command(commands.recv_bytes().decode())
        except (EOFError, OSError):
            control.orphan()  # the trainer closed its end or died

    control = Control(events.send_bytes)
    threading.Thread(target=read_commands, args=(control,), name="commands", daemon=True).start()
    raise SystemExit(run(control, Path(spec_path)))


def run(control: Control, spec_path: Path) -> int:
    """Runs a job's training and maps its end to an exit status (shared with __main__)."""
    try:
        return train.Run(WorkerSpec.read(spec_path), control).run()
    except Cancelled:
        return EXIT_ORPHANED if control.orphaned.is_set() else EXIT_CANCELLED
    except train.Diverged as exc:  # the job's settings, not a trainer bug: no traceback, just why
        control.emit("error", message=str(exc))
        return EXIT_FAILED
    except Exception as exc:  # noqa: BLE001 - reported to the trainer, which fails the job with it
        traceback.print_exc()
        control.emit("error", message=f"{type(exc).__name__}: {exc}"[:2000])
        return EXIT_FAILED
