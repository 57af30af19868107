"""The demo's flags: everything `loraplex up` takes, plus what the pipeline itself needs."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from services.common.config import option
from services.common.stack import StackConfig


@dataclasses.dataclass(frozen=True)
class DemoConfig(StackConfig):
    """Train, deploy and serve one adapter per customer (A finance, B legal, C healthcare)."""

    data_dir: Path = option(Path(".loraplex/demo"), "state of the demo's own stack (SQLite, blobs, logs, models)")
    once: bool = option(False, "run the pipeline, print the report and exit (0 only when every check passed) "
                               "instead of serving until Ctrl-C")
    attach: bool = option(False, "use running services at the --*-address flags (e.g. a compose stack) "
                                 "instead of starting them")
    registry_address: str = option("", "with --attach: Registry host:port")
    trainer_address: str = option("", "with --attach: Trainer host:port")
    router_address: str = option("", "with --attach: Router gRPC host:port")
    openai_base_url: str = option("", "with --attach: the Router's OpenAI API, e.g. http://router:8000/v1")
    public_router_address: str = option("", "with --attach: the Router address to print for users "
                                            "(default: --router-address)")
    public_openai_base_url: str = option("", "with --attach: the OpenAI base URL to print for users "
                                             "(default: --openai-base-url)")
    base_model_location: str = option("", "with --attach: the base model folder as the Trainer sees it "
                                          "(registered in the Registry under --base-model-name)")
    train_steps: int = option(480, "optimizer steps of each customer's training job")
    learning_rate: float = option(5e-3, "learning rate of the training jobs")
    lora_rank: int = option(16, "LoRA rank of the trained adapters")
    requests_per_customer: int = option(8, "requests per customer in the concurrent traffic run "
                                           "(half over gRPC, half over the OpenAI HTTP API)")
    max_tokens: int = option(64, "largest answer, in tokens")
    timeout: float = option(900.0, "seconds a training job, or the wait for an inference node, may take "
                                   "before the demo gives up")

    @property
    def starts_services(self) -> bool:
        return not self.attach  # attached, the TLS flags only say how to reach the services

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.attach:
            missing = [flag for flag, value in (("--registry-address", self.registry_address),
                                                ("--trainer-address", self.trainer_address),
                                                ("--router-address", self.router_address),
                                                ("--openai-base-url", self.openai_base_url),
                                                ("--base-model-location", self.base_model_location),
                                                ("--admin-token", self.admin_token)) if not value]
            if missing:
                raise ValueError(f"--attach needs {', '.join(missing)}")
        for name in ("train_steps", "lora_rank", "requests_per_customer", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"--learning-rate must be in (0, 1], got {self.learning_rate}")
        if self.timeout <= 0:
            raise ValueError(f"--timeout must be > 0, got {self.timeout}")
