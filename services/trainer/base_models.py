"""Base models as the trainer needs them: a local checkpoint folder and its tokenizer.

The Registry says where a base model lives. The trainer loads it from that path, so the path
must be a folder this machine sees (a shared volume in compose); an `s3://` location is refused
with FAILED_PRECONDITION rather than downloading many gigabytes per job. A base model's
location never changes in the Registry, so lookups are cached for the process's life.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

from services.common.errors import FailedPrecondition, NotFound
from services.common.fields import require
from services.trainer.registry_client import BaseModelInfo, RegistryClient

MAX_TOKENIZERS = 4


class BaseModels:
    def __init__(self, registry: RegistryClient) -> None:
        self.registry = registry
        self._info: dict[str, BaseModelInfo] = {}
        self._tokenizers: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()

    async def get(self, name: str, field: str = "base_model") -> BaseModelInfo:
        require(name, field)  # an empty name is a malformed request, not an unknown model
        info = self._info.get(name)
        if info is None:
            try:
                info = await self.registry.get_base_model(name)
            except NotFound:
                raise NotFound(f"base model '{name}' not found", reason="BASE_MODEL_NOT_FOUND", field=field) from None
            self._info[name] = info
        folder = Path(info.location)
        if info.location.startswith("s3://") or not folder.is_absolute():
            raise FailedPrecondition(f"base model '{name}' lives at {info.location!r}; the trainer needs a local "
                                     "checkpoint folder (mount it and register that path)",
                                     reason="BASE_MODEL_NOT_LOCAL", field=field)
        if not (folder / "config.json").is_file():
            raise FailedPrecondition(f"base model '{name}' folder {info.location} is not readable on the trainer's "
                                     "machine (no config.json)", reason="BASE_MODEL_NOT_LOCAL", field=field)
        return info

    def tokenizer(self, info: BaseModelInfo):
        """The base model's tokenizer (blocking: call on a worker thread)."""
        from transformers import AutoTokenizer

        with self._lock:
            if info.name in self._tokenizers:
                self._tokenizers.move_to_end(info.name)
                return self._tokenizers[info.name]
        tokenizer = AutoTokenizer.from_pretrained(info.location, local_files_only=True)
        tokenizer.model_max_length = 1 << 62  # lengths are checked against max_seq_len, not this; no warning spam
        with self._lock:
            self._tokenizers[info.name] = tokenizer
            while len(self._tokenizers) > MAX_TOKENIZERS:
                self._tokenizers.popitem(last=False)
        return tokenizer
