"""The Inference node process: wires config to servicers. Behaviour lands with issue #4."""

from __future__ import annotations

from services.common.errors import FailedPrecondition
from services.common.placeholder import PlaceholderApp
from services.common.services import INFERENCE
from services.inference.config import InferenceConfig


class InferenceApp(PlaceholderApp):
    def __init__(self, config: InferenceConfig) -> None:
        super().__init__([(INFERENCE, "lands with issue #4, the Inference node")])
        self.config = config

    async def start(self) -> None:
        # Fail fast on a wrong path instead of turning SERVING with nothing to serve.
        checkpoint = self.config.base_model
        if checkpoint is None or not (checkpoint / "config.json").is_file():
            raise FailedPrecondition(f"base model folder {checkpoint} has no config.json")
