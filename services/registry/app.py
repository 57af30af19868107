"""The Registry process: wires config to servicers. Behaviour lands with issue #3."""

from __future__ import annotations

from services.common.placeholder import PlaceholderApp
from services.common.services import REGISTRY
from services.registry.config import RegistryConfig


class RegistryApp(PlaceholderApp):
    def __init__(self, config: RegistryConfig) -> None:
        super().__init__([(REGISTRY, "lands with issue #3, the Registry service")])
        self.config = config

    async def start(self) -> None:
        self.config.data_dir.mkdir(parents=True, exist_ok=True)
