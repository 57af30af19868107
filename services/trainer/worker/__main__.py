"""`python -m services.trainer.worker SPEC.json`: trains one job by hand (or under torchrun).

The trainer forks workers from its fork server (launcher.py); this entry point runs the same
training with JSON-line events on stdout and commands on stdin (see protocol.py), for
operators re-running a job folder's spec.json and for launchers such as torchrun.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m services.trainer.worker SPEC.json", file=sys.stderr)
        return 2
    from services.trainer.worker.child import run
    from services.trainer.worker.control import Control

    events = os.fdopen(os.dup(1), "wb", buffering=0)
    os.dup2(2, 1)  # anything else printed (libraries) goes to stderr
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    control = Control(events.write)

    def read_commands() -> None:  # end of file here just means no more commands (a manual run)
        for line in sys.stdin:
            control.command(line)

    threading.Thread(target=read_commands, name="commands", daemon=True).start()
    return run(control, Path(argv[0]))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
