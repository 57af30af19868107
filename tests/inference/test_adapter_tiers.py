"""The adapter tiers seen from requests: a device-resident adapter is served without touching
its source, even when the host tier is too small to keep a copy of it."""

from __future__ import annotations

import asyncio

from services.inference.adapters.sources import LocalFolderSource
from services.inference.config import InferenceConfig
from services.inference.engine.sampling_params import SamplingParams
from services.inference.node import Node, Prompt


class CountingSource(LocalFolderSource):
    def __init__(self, root) -> None:
        super().__init__(root)
        self.fetches: list[str] = []

    async def fetch(self, adapter_id: str):
        self.fetches.append(adapter_id)
        return await super().fetch(adapter_id)


def test_resident_adapters_are_not_fetched_again_when_the_host_tier_dropped_them(tiny_model_dir, varied_adapters):
    root = varied_adapters["legal"].parent
    source = CountingSource(root)
    node = Node.build(InferenceConfig(base_model=tiny_model_dir, adapter_dir=root, kv_cache_mb=2,
                                      adapter_pool_pages=128), source=source)
    sampling = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)

    async def ask(key: str) -> list[int]:
        return [t for o in [o async for o in node.generate(Prompt(text="the market"), sampling, key)]
                for t in o.token_ids]

    async def run():
        node.start()
        try:
            first = [await ask(key) for key in ("legal", "fin", "health")]
            for key in ("legal", "fin", "health"):  # as a host tier smaller than the pool would
                assert node.manager.drop_host(key)
            again = [await ask(key) for key in ("legal", "fin", "health")]
            return first, again
        finally:
            node.close()

    first, again = asyncio.run(run())
    assert again == first
    assert source.fetches == ["legal", "fin", "health"]  # one fetch each, none for the second round
    assert node.manager.hits == 3 and node.manager.misses == 3
