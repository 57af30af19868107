"""The adapter tiers seen from requests: a device-resident adapter is served without touching
its source, even when the host tier is too small to keep a copy of it; and when its source
has lost it meanwhile, queued requests fail instead of waiting."""

from __future__ import annotations

import asyncio
import hashlib
import shutil

import pytest

from services.common.errors import FailedPrecondition, NotFound
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


def test_a_resident_adapter_with_other_bytes_is_fetched(tiny_model_dir, varied_adapters):
    """on_device matches the bytes too: a request naming another sha256 goes to the source
    (which here refuses it: the bytes it has are not the ones asked for)."""
    root = varied_adapters["legal"].parent
    source = CountingSource(root)
    node = Node.build(InferenceConfig(base_model=tiny_model_dir, adapter_dir=root, kv_cache_mb=2,
                                      adapter_pool_pages=64), source=source)
    sampling = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

    async def run():
        node.start()
        try:
            [o async for o in node.generate(Prompt(text="x"), sampling, "legal")]
            resident = node.pool.get("legal").sha256
            assert node.manager.on_device("legal") and node.manager.on_device("legal", resident)
            assert not node.manager.on_device("legal", "0" * 64)
            node.manager.drop_host("legal")
            with pytest.raises(FailedPrecondition, match="does not match"):
                [o async for o in node.generate(Prompt(text="x"), sampling, "legal", "0" * 64)]
        finally:
            node.close()

    asyncio.run(run())
    assert source.fetches == ["legal", "legal"]


def test_queued_requests_fail_when_their_evicted_adapter_is_gone_from_the_source(tiny_model_dir, varied_adapters,
                                                                                tmp_path):
    """A request for a device-resident adapter skips the host tier; if the adapter is then
    evicted and deleted at its source before the request runs, the re-fetch fails and the
    request ends with NOT_FOUND instead of waiting forever (and re-fetching in a loop)."""
    root = tmp_path / "adapters"
    shutil.copytree(varied_adapters["fin"], root / "fin")
    source = CountingSource(root)
    # One sequence at a time: the fin request queues behind a long base-model request.
    node = Node.build(InferenceConfig(base_model=tiny_model_dir, adapter_dir=root, kv_cache_mb=2, max_num_seqs=1,
                                      adapter_pool_pages=64), source=source)

    async def run():
        node.start()
        try:
            short = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
            [o async for o in node.generate(Prompt(text="x"), short, "fin")]  # resident now
            long_stream = node.generate(Prompt(text="y"), SamplingParams(max_tokens=60, temperature=0.0,
                                                                         ignore_eos=True), "")
            first = await long_stream.__anext__()  # the base request holds the only slot
            queued = asyncio.ensure_future(_drain(node.generate(Prompt(text="x"), short, "fin")))
            await _until(lambda: node.engine.scheduler.waiting_for("fin"))  # queued, host tier untouched
            assert source.fetches == ["fin"]
            node.manager.drop_host("fin")
            await node.async_engine.call(lambda: node.pool.evict("fin"))
            shutil.rmtree(root / "fin")
            rest = await _drain(long_stream)
            with pytest.raises(NotFound):
                await asyncio.wait_for(queued, timeout=30)
            return [first, *rest]
        finally:
            node.close()

    outputs = asyncio.run(run())
    assert outputs[-1].finish_reason is not None  # the base request was unaffected
    assert source.fetches[0] == "fin" and 2 <= len(source.fetches) <= 5  # one re-fetch, or a few: no loop


async def _drain(stream) -> list:
    return [output async for output in stream]


async def _until(condition, timeout_s: float = 30.0) -> None:
    async with asyncio.timeout(timeout_s):
        while not condition():
            await asyncio.sleep(0.01)


class HeldSource(CountingSource):
    """Fetches wait until `release` is set, so several requests meet on one fetch in flight."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.release = asyncio.Event()

    async def fetch(self, adapter_id: str):
        self.fetches.append(adapter_id)
        await self.release.wait()
        return await LocalFolderSource.fetch(self, adapter_id)


def test_a_wrong_digest_fails_only_the_request_that_named_it(tiny_model_dir, varied_adapters):
    """One fetch serves every request for an adapter. A request naming a wrong sha256 that
    starts it must fail alone: the fetched bytes are the source's (checked against what the
    source promised), and another request that named no digest, or the right one, runs on them."""
    root = varied_adapters["legal"].parent
    source = HeldSource(root)
    node = Node.build(InferenceConfig(base_model=tiny_model_dir, adapter_dir=root, kv_cache_mb=2,
                                      adapter_pool_pages=64), source=source)
    sampling = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
    right = CountingSource(root)

    waiting: list[str] = []  # the digests of the requests waiting for the host copy
    ensure_host = node.manager.ensure_host

    async def counted_ensure_host(adapter_id: str, sha256: str = ""):
        waiting.append(sha256)  # then joins the fetch in flight without yielding first
        return await ensure_host(adapter_id, sha256)

    node.manager.ensure_host = counted_ensure_host

    async def run():
        node.start()
        try:
            wrong = asyncio.ensure_future(_drain(node.generate(Prompt(text="x"), sampling, "legal", "0" * 64)))
            await _until(lambda: source.fetches)  # the wrong digest's request started the fetch
            digest = hashlib.sha256((await right.fetch("legal")).weights).hexdigest()
            any_bytes = asyncio.ensure_future(_drain(node.generate(Prompt(text="x"), sampling, "legal")))
            named = asyncio.ensure_future(_drain(node.generate(Prompt(text="x"), sampling, "legal", digest)))
            await _until(lambda: len(waiting) == 3)
            source.release.set()
            with pytest.raises(FailedPrecondition, match="does not match"):
                await wrong
            return await any_bytes, await named
        finally:
            node.close()

    any_bytes, named = asyncio.run(run())
    assert any_bytes[-1].finish_reason is not None and named[-1].finish_reason is not None
    assert source.fetches == ["legal"]  # one fetch, shared
