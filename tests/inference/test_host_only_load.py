"""LoadAdapter host_only (the router's prefetch) on a real node: it warms the host tier only,
repeats as a no-op, leaves the device pool alone, and fails with the documented statuses."""

from __future__ import annotations

import hashlib

import grpc
import pytest

from services.common.errors import REGISTRY_UNAVAILABLE
from services.common.pb.loraplex.inference.v1 import inference_pb2 as pb
from services.common.rpc import error_info
from tests.conftest import free_port
from tests.inference.test_servicer import collect, greedy, serve_and_run


@pytest.fixture(scope="module")
def adapter_root(varied_adapters):
    return next(iter(varied_adapters.values())).parent


def sha256_of(folder) -> str:
    return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()


def tiers(listed: pb.ListAdaptersResponse) -> dict[str, set[int]]:
    found: dict[str, set[int]] = {}
    for slot in listed.adapters:
        found.setdefault(slot.adapter_id, set()).add(slot.tier)
    return found


def test_a_host_only_load_warms_the_host_tier_and_leaves_the_device_pool_alone(tiny_model_dir, adapter_root,
                                                                              varied_adapters):
    legal_sha = sha256_of(varied_adapters["legal"])

    async def body(stub, app):
        # retail (rank 16) fills the 16-page pool, unpinned: a device load of legal would evict it.
        await stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="retail"))
        before = await stub.GetStats(pb.GetStatsRequest())

        slot = await stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="legal", host_only=True, sha256=legal_sha))
        assert (slot.tier, slot.sha256, slot.rank, slot.pages, slot.pinned) == (pb.ADAPTER_TIER_HOST, legal_sha, 4,
                                                                                0, False)
        listed = await stub.ListAdapters(pb.ListAdaptersRequest())
        assert tiers(listed) == {"retail": {pb.ADAPTER_TIER_DEVICE}, "legal": {pb.ADAPTER_TIER_HOST}}
        assert listed.pool.pages_used == 16
        stats = await stub.GetStats(pb.GetStatsRequest())
        assert stats.resident_adapter_ids == ["retail"]
        assert (stats.adapter_loads, stats.adapter_evictions) == (before.adapter_loads, before.adapter_evictions)
        assert stats.adapter_fetches == before.adapter_fetches + 1
        assert (stats.adapter_hits, stats.adapter_misses) == (0, 0)  # a warm-up is not traffic

        again = await stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="legal", host_only=True, sha256=legal_sha))
        assert again.tier == pb.ADAPTER_TIER_HOST
        # An adapter on the device answers DEVICE, fetched for nothing.
        resident = await stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="retail", host_only=True))
        assert (resident.tier, resident.pages) == (pb.ADAPTER_TIER_DEVICE, 16)
        assert (await stub.GetStats(pb.GetStatsRequest())).adapter_fetches == stats.adapter_fetches

        # The first request copies legal from the host tier: a miss on the device, no fetch.
        await collect(stub.Generate(pb.GenerateRequest(
            prompt="the contract", adapter=pb.AdapterRef(adapter_id="legal", sha256=legal_sha), sampling=greedy(4))))
        served = await stub.GetStats(pb.GetStatsRequest())
        assert (served.adapter_fetches, served.adapter_misses) == (stats.adapter_fetches, 1)
        assert "legal" in served.resident_adapter_ids

    serve_and_run(tiny_model_dir, adapter_root, body, adapter_pool_pages=16)


def test_host_only_loads_fail_with_the_documented_statuses(tiny_model_dir, adapter_root, varied_adapters):
    async def refused(stub, request: pb.LoadAdapterRequest) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.LoadAdapter(request)
        return caught.value

    async def body(stub, app):
        unknown = await refused(stub, pb.LoadAdapterRequest(adapter_id="missing", host_only=True))
        assert unknown.code() == grpc.StatusCode.NOT_FOUND
        wrong = await refused(stub, pb.LoadAdapterRequest(adapter_id="fin", host_only=True, sha256="f" * 64))
        assert wrong.code() == grpc.StatusCode.FAILED_PRECONDITION and "does not match" in wrong.details()
        malformed = await refused(stub, pb.LoadAdapterRequest(adapter_id="fin", host_only=True, sha256="abc"))
        assert malformed.code() == grpc.StatusCode.INVALID_ARGUMENT and "sha256" in malformed.details()
        pinned = await refused(stub, pb.LoadAdapterRequest(adapter_id="fin", host_only=True, pin=True))
        assert pinned.code() == grpc.StatusCode.INVALID_ARGUMENT and "pin" in pinned.details()
        # The right digest (in capitals: case is ignored) still loads after the refusals.
        slot = await stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="fin", host_only=True,
                                                            sha256=sha256_of(varied_adapters["fin"]).upper()))
        assert slot.tier == pb.ADAPTER_TIER_HOST
        assert not (await stub.GetStats(pb.GetStatsRequest())).resident_adapter_ids

    serve_and_run(tiny_model_dir, adapter_root, body)


def test_a_host_only_load_the_registry_cannot_serve_is_unavailable_and_the_node_serves_on(tiny_model_dir):
    async def body(stub, app):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.LoadAdapter(pb.LoadAdapterRequest(adapter_id="adp_1", host_only=True))
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(caught.value).reason == REGISTRY_UNAVAILABLE
        replies = await collect(stub.Generate(pb.GenerateRequest(prompt="x", sampling=greedy(2))))
        assert replies[-1].delta.usage.completion_tokens == 2  # the base model is served as before

    # Nothing listens on that port: the Registry is down.
    serve_and_run(tiny_model_dir, None, body, registry_address=f"127.0.0.1:{free_port()}")
