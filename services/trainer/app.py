"""The Trainer process: wires config to servicers. Behaviour lands with issue #6."""

from __future__ import annotations

from services.common.placeholder import PlaceholderApp
from services.common.services import TRAINER
from services.trainer.config import TrainerConfig


class TrainerApp(PlaceholderApp):
    def __init__(self, config: TrainerConfig) -> None:
        super().__init__([(TRAINER, "lands with issue #6, the Trainer service")])
        self.config = config

    async def start(self) -> None:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
