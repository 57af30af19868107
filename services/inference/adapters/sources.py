"""Where adapters come from: a local folder of PEFT adapters, or the Registry.

A source returns the adapter's two files' contents; parsing and checks happen in
adapters/weights.py so every source is held to the same rules.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from services.common.errors import InvalidArgument, NotFound

_ADAPTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


@dataclass(frozen=True)
class FetchedAdapter:
    adapter_id: str
    config_json: str
    weights: bytes  # adapter_model.safetensors
    expected_sha256: str = ""  # what the source promised; checked after parsing
    sha256: str = ""  # of `weights`, where the source computed it (parse_adapter then need not)


class AdapterSource(Protocol):
    async def fetch(self, adapter_id: str) -> FetchedAdapter: ...


class LocalFolderSource:
    """Adapters are sub-folders of `root` named by their id (PEFT save_pretrained output)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    async def fetch(self, adapter_id: str) -> FetchedAdapter:
        if not _ADAPTER_ID.match(adapter_id) or adapter_id in (".", ".."):
            raise InvalidArgument(f"adapter id {adapter_id!r} is not a valid name")
        folder = self.root / adapter_id
        config, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
        if not config.is_file() or not weights.is_file():
            raise NotFound(f"adapter {adapter_id!r} not found")
        config_text, weight_bytes = await asyncio.to_thread(lambda: (config.read_text(), weights.read_bytes()))
        return FetchedAdapter(adapter_id, config_text, weight_bytes)
