"""What the trainer process and its training workers say to each other (no torch, no grpc).

The queue (services/trainer/queue.py) runs one worker process per running job, forked from
the trainer's fork server (worker/launcher.py) with:

- JOB_DIR/spec.json: a `WorkerSpec` (paths, effective LoRA and training settings, schedule);
- an event pipe (worker -> trainer): one JSON object per message, `event` = started |
  progress | eval | checkpoint | done | error;
- a command pipe (trainer -> worker): `cancel` (exit now, save nothing) or `stop` (save a
  checkpoint at the next step boundary, then exit). End of file means the trainer died: the
  worker exits at once, so an orphan never trains on next to a restarted trainer;
- the exit status: `EXIT_*` below; anything else is a crash (the trainer fails the job).
Everything the worker prints (libraries included) goes to JOB_DIR/worker.log.
`python -m services.trainer.worker SPEC.json` runs the same training by hand, with the events
as JSON lines on stdout and commands on stdin.

Why a process and not a thread: cancel must free memory and the device within seconds
whatever the worker is doing (a kill always does), a CUDA error or an OOM kill cannot take the
gRPC server down, and a multi-GPU run would launch this same entry point under torchrun (see
worker/train.py).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

EXIT_DONE = 0
EXIT_FAILED = 1
EXIT_CANCELLED = 10
EXIT_STOPPED = 11
EXIT_ORPHANED = 12

CANCEL, STOP = "cancel", "stop"


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    job_id: str
    base_model_name: str
    base_model_path: str
    dataset_path: str
    dataset_format: str  # chat | prompt_completion
    lora: dict[str, Any]  # LoraSettings as a dict (hyperparams.py)
    training: dict[str, Any]  # TrainingSettings as a dict
    num_eval: int
    total_steps: int
    steps_per_epoch: int
    checkpoint_every: int
    checkpoint_dir: str
    output_dir: str
    device: str
    dtype: str  # auto | float32 | bfloat16 | float16
    torch_threads: int
    keep_checkpoints: int

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @classmethod
    def read(cls, path: Path) -> WorkerSpec:
        return cls(**json.loads(Path(path).read_text()))


def encode_event(event: str, **fields: Any) -> str:
    return json.dumps({"event": event, **fields}, separators=(",", ":")) + "\n"


def decode_event(line: bytes | str) -> dict[str, Any] | None:
    """The event on a stdout line, or None for a line that is not one of ours."""
    try:
        data = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and isinstance(data.get("event"), str) else None
