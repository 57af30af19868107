"""Adapter admission as seen by requests already queued on a real node, and the operator's views
of it: pins taken after a request queued, a failed re-fetch of one digest, the hit/miss
counters, ListAdapters during a re-fetch, and LoadAdapter into a pool held by pins."""

from __future__ import annotations

import asyncio
import shutil

import grpc

from services.common.pb.loraplex.inference.v1 import inference_pb2 as pb
from services.common.rpc import error_info
from services.inference.adapters.sources import LocalFolderSource
from tests.inference.test_adapter_admission import adapter_root, generate, sha256_of, status_of  # noqa: F401
from tests.inference.test_servicer import greedy, serve_and_run, wait_until


async def hold_the_only_slot(stub):
    """A base-model request that keeps the node's one sequence slot (max_num_seqs=1) busy."""
    call = stub.Generate(pb.GenerateRequest(prompt="a", sampling=greedy(max_tokens=400, ignore_eos=True)))
    await call.read()
    return call


async def until_waiting(stub, count: int) -> None:
    async def waiting():
        return (await stub.GetStats(pb.GetStatsRequest())).waiting_requests == count

    await wait_until(waiting)


def test_a_pin_taken_after_a_request_queued_fails_it_instead_of_stranding_it(tiny_model_dir, adapter_root):
    """fin (rank 2) queued while the pool of five pages was free; then legal (rank 4) is pinned,
    leaving one page. fin used to wait until an unpin (and, once starving, pause other adapters);
    it now fails as it would have had it arrived after the pin."""
    async def body(stub, app):
        busy = await hold_the_only_slot(stub)
        fin = asyncio.ensure_future(generate(stub, "fin", max_tokens=2))
        await until_waiting(stub, 1)
        slot = await stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="legal", pin=True))
        assert slot.pinned  # the operator's pin is taken, not refused
        busy.cancel()
        error = await status_of(fin)
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "pinned" in error.details()
        assert error_info(error).reason == "ADAPTER_POOL_PINNED"
        assert (await stub.GetStats(pb.GetStatsRequest())).waiting_requests == 0
        assert (await generate(stub, "legal", max_tokens=2))[-1].delta.usage.completion_tokens == 2

    serve_and_run(tiny_model_dir, adapter_root, body, adapter_pool_pages=5, max_num_seqs=1)


def test_a_failed_refetch_of_one_digest_fails_only_the_requests_for_that_digest(tiny_model_dir, adapter_root):
    """Two requests queue for legal: one naming its digest, one any bytes. The host copy is then
    dropped and the folder holds other weights: the re-fetch for the named digest fails, and
    used to fail both; the request for any bytes runs with the new ones."""
    async def body(stub, app):
        busy = await hold_the_only_slot(stub)
        named = asyncio.ensure_future(generate(stub, "legal", sha256_of(adapter_root / "legal"), max_tokens=2))
        await until_waiting(stub, 1)
        unnamed = asyncio.ensure_future(generate(stub, "legal", max_tokens=2))
        await until_waiting(stub, 2)
        await stub.EvictAdapter(pb.EvictAdapterRequest(adapter_id="legal", all_tiers=True))  # host copy only
        shutil.rmtree(adapter_root / "legal")
        shutil.copytree(adapter_root / "games", adapter_root / "legal")
        busy.cancel()
        error = await status_of(named)
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION and "does not match" in error.details()
        replies = await asyncio.wait_for(unnamed, timeout=60)
        assert replies[-1].delta.usage.completion_tokens == 2
        slot = next(s for s in (await stub.ListAdapters(pb.ListAdaptersRequest())).adapters
                    if s.tier == pb.ADAPTER_TIER_DEVICE)
        assert (slot.adapter_id, slot.sha256) == ("legal", sha256_of(adapter_root / "legal"))

    serve_and_run(tiny_model_dir, adapter_root, body, max_num_seqs=1)


def test_hits_and_misses_count_served_requests_only(tiny_model_dir, adapter_root):
    """Requests refused by validation, and LoadAdapter, used to count (or not) as if served."""
    async def body(stub, app):
        for adapter_id, sha256 in (("nope", ""), ("../fin", ""), ("fin", "0" * 64)):
            await status_of(generate(stub, adapter_id, sha256, max_tokens=2))
        await stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="legal"))
        stats = await stub.GetStats(pb.GetStatsRequest())
        assert (stats.adapter_hits, stats.adapter_misses) == (0, 0)
        await generate(stub, "fin", max_tokens=2)  # fetched: a miss
        await generate(stub, "fin", max_tokens=2)  # on the device now: a hit
        await generate(stub, "legal", max_tokens=2)  # put there by LoadAdapter: a hit
        await generate(stub, max_tokens=2)  # base model: neither
        stats = await stub.GetStats(pb.GetStatsRequest())
        assert (stats.adapter_hits, stats.adapter_misses) == (2, 1)

    serve_and_run(tiny_model_dir, adapter_root, body)


class GatedSource(LocalFolderSource):
    """Fetches wait for `opened` once it is closed: a re-fetch in flight can be observed."""

    def __init__(self, root) -> None:
        super().__init__(root)
        self.opened = asyncio.Event()
        self.opened.set()

    async def fetch(self, adapter_id: str):
        await self.opened.wait()
        return await super().fetch(adapter_id)


def test_list_adapters_shows_each_copy_once_per_tier_during_a_refetch(tiny_model_dir, adapter_root):
    """legal's old bytes run on the device while its new bytes load, then wait in host memory for
    the running request to end. The host copy used to be hidden behind the device one."""
    async def body(stub, app):
        source = GatedSource(adapter_root)
        app.node.manager.source = source
        old = sha256_of(adapter_root / "legal")
        running = stub.Generate(pb.GenerateRequest(prompt="x", adapter=pb.AdapterRef(adapter_id="legal"),
                                                   sampling=greedy(max_tokens=400, ignore_eos=True)))
        await running.read()
        shutil.rmtree(adapter_root / "legal")
        shutil.copytree(adapter_root / "games", adapter_root / "legal")
        new = sha256_of(adapter_root / "legal")
        source.opened.clear()
        queued = asyncio.ensure_future(generate(stub, "legal", new, max_tokens=2))

        async def listing():
            return sorted((s.tier, s.sha256) for s in (await stub.ListAdapters(pb.ListAdaptersRequest())).adapters
                          if s.adapter_id == "legal")

        async def tiers_are(expected):
            return await listing() == expected

        await wait_until(lambda: tiers_are([(pb.ADAPTER_TIER_LOADING, ""), (pb.ADAPTER_TIER_DEVICE, old)]))
        source.opened.set()
        await until_waiting(stub, 1)
        await wait_until(lambda: tiers_are([(pb.ADAPTER_TIER_DEVICE, old), (pb.ADAPTER_TIER_HOST, new)]))
        running.cancel()
        assert (await asyncio.wait_for(queued, timeout=60))[-1].delta.usage.completion_tokens == 2
        assert await listing() == [(pb.ADAPTER_TIER_DEVICE, new)]  # the same bytes on both tiers: listed once

    serve_and_run(tiny_model_dir, adapter_root, body)


def test_load_adapter_into_a_pool_held_by_pins_says_to_unpin(tiny_model_dir, adapter_root):
    """Retrying cannot help until a pin goes: the answer used to be a generic "pool full" with a
    0.5 s retry hint; it is now Generate's ADAPTER_POOL_PINNED, telling the operator to unpin."""
    async def body(stub, app):
        await stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="legal", pin=True))
        error = await status_of(stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="fin")))
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "unpin" in error.details()
        assert error_info(error).reason == "ADAPTER_POOL_PINNED"
        await stub.EvictAdapter(pb.EvictAdapterRequest(adapter_id="legal", unpin=True))
        assert (await stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="fin"))).tier == pb.ADAPTER_TIER_DEVICE

    serve_and_run(tiny_model_dir, adapter_root, body, adapter_pool_pages=5)
