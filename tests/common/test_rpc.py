"""Error mapping, metrics and health of the shared server bootstrap, on a real gRPC server."""

from __future__ import annotations

import asyncio
import base64
import logging
import urllib.request

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_status import rpc_status

from services.common import errors
from services.common.config import ServerConfig
from services.common.metrics import start_metrics_server
from services.common.pb.loraplex.common.v1 import generation_pb2
from services.common.pb.loraplex.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common.rpc import error_info, percent_encoded_size, to_rpc_status
from services.common.server import start_server
from services.common.services import INFERENCE
from tests.conftest import free_port


class FaultyInference(inference_pb2_grpc.InferenceServicer):
    """Each RPC fails in a different way, as a domain servicer might."""

    async def GetInfo(self, request, context):
        raise errors.NotFound("adapter 'fin' v3 not found", reason="ADAPTER_NOT_FOUND", adapter="fin")

    async def GetStats(self, request, context):
        raise errors.ResourceExhausted("queue is full (64 waiting)", retry_after_s=2.5)

    async def ListAdapters(self, request, context):
        raise RuntimeError("secret internal detail")

    async def LoadAdapter(self, request, context):
        if len(request.adapter_id) > 100:  # a domain error echoing a huge id in message and metadata
            raise errors.NotFound(f"adapter '{request.adapter_id}' not found", adapter_id=request.adapter_id,
                                  **{f"k{i}": i for i in range(40)})
        return inference_pb2.AdapterSlot(adapter_id=request.adapter_id, pinned=request.pin)

    async def Generate(self, request, context):
        yield inference_pb2.GenerateResponse(delta=generation_pb2.GenerationDelta(text="hel"))
        raise errors.InvalidArgument("temperature must be >= 0", field="sampling.temperature")


class FaultyApp:
    service_names = [INFERENCE.full_name]

    def add_to_server(self, server):
        inference_pb2_grpc.add_InferenceServicer_to_server(FaultyInference(), server)

    async def start(self):
        return None

    async def close(self):
        return None


async def _with_server(body):
    running = await start_server(FaultyApp(), ServerConfig(port=free_port()))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            await body(running, channel)
    finally:
        await running.stop(0)


def test_domain_errors_become_status_codes_with_details():
    async def body(running, channel):
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetInfo(inference_pb2.GetInfoRequest())
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert caught.value.details() == "adapter 'fin' v3 not found"
        info = error_info(caught.value)
        assert info.reason == "ADAPTER_NOT_FOUND" and info.domain == "loraplex"
        assert info.metadata["adapter"] == "fin"

        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.GetStats(inference_pb2.GetStatsRequest())
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        status = rpc_status.from_call(caught.value)
        retry = [d for d in status.details if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR)]
        unpacked = error_details_pb2.RetryInfo()
        retry[0].Unpack(unpacked)
        assert unpacked.retry_delay.ToMilliseconds() == 2500

        reply = await stub.LoadAdapter(inference_pb2.LoadAdapterRequest(adapter_id="a1", pin=True))
        assert reply.adapter_id == "a1" and reply.pinned

    asyncio.run(_with_server(body))


def test_an_error_echoing_a_huge_value_still_arrives_with_its_code():
    async def body(running, channel):
        stub = inference_pb2_grpc.InferenceStub(channel)
        for huge in ("x" * 1_000_000, "日本" * 300_000):  # multi-byte text is percent-encoded: 9 bytes a character
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.LoadAdapter(inference_pb2.LoadAdapterRequest(adapter_id=huge))
            assert caught.value.code() == grpc.StatusCode.NOT_FOUND  # was "Stream removed", no ErrorInfo
            message = caught.value.details()
            assert message.startswith(f"adapter '{huge[:100]}") and "more characters)" in message
            assert len(message.encode()) <= 2048
            info = error_info(caught.value)
            assert info.metadata["adapter_id"].startswith(huge[:20]) and len(info.metadata) == 16

    asyncio.run(_with_server(body))


def test_unexpected_errors_are_internal_with_an_error_id_and_no_traceback(caplog):
    async def body(running, channel):
        stub = inference_pb2_grpc.InferenceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.ListAdapters(inference_pb2.ListAdaptersRequest())
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        message = caught.value.details()
        assert "secret internal detail" not in message and "Traceback" not in message
        error_id = message.split("error id ")[1].split(")")[0]
        logged = [r for r in caplog.records if error_id in r.getMessage()]
        assert logged and logged[0].exc_info is not None, "the traceback must be in the log under the id"

    with caplog.at_level(logging.ERROR, logger="loraplex.rpc"):
        asyncio.run(_with_server(body))


def test_streaming_handler_errors_are_mapped_after_partial_output():
    async def body(running, channel):
        stub = inference_pb2_grpc.InferenceStub(channel)
        call = stub.Generate(inference_pb2.GenerateRequest(request_id="r1"))
        received = []
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for message in call:
                received.append(message.delta.text)
        assert received == ["hel"]
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert error_info(caught.value).metadata["field"] == "sampling.temperature"

    asyncio.run(_with_server(body))


def test_health_follows_readiness_and_metrics_count_rpcs():
    metrics_port = free_port()
    start_metrics_server("127.0.0.1", metrics_port)

    async def body(running, channel):
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", INFERENCE.full_name):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await running.set_serving(True)
        reply = await health.Check(health_pb2.HealthCheckRequest(service=INFERENCE.full_name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = inference_pb2_grpc.InferenceStub(channel)
        await stub.LoadAdapter(inference_pb2.LoadAdapterRequest(adapter_id="m"))
        with pytest.raises(grpc.aio.AioRpcError):
            await stub.GetInfo(inference_pb2.GetInfoRequest())

    asyncio.run(_with_server(body))
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert ('loraplex_rpc_requests_total{code="OK",method="LoadAdapter",'
            'service="loraplex.inference.v1.Inference"}') in text
    assert ('loraplex_rpc_errors_total{code="NOT_FOUND",method="GetInfo",'
            'service="loraplex.inference.v1.Inference"}') in text
    assert 'loraplex_rpc_latency_seconds_count{method="LoadAdapter"' in text


def test_a_taken_port_is_a_clear_error():
    async def body(running, channel):
        with pytest.raises(OSError, match="address in use"):
            await start_server(FaultyApp(), ServerConfig(port=running.port))

    asyncio.run(_with_server(body))


@pytest.mark.parametrize("character", ["x", "%", "日", "\n"])
def test_the_trailers_of_any_error_stay_under_grpcs_soft_limit(character):
    """gRPC drops trailers past 8 KiB with a probability that grows with their size (a soft
    limit), so an error echoing multi-byte text (percent-encoded: 9 bytes a character) failed
    now and then as "Stream removed". The worst case: a huge message and 40 huge metadata entries."""
    huge = character * 100_000
    error = errors.InvalidArgument(huge, **{f"{character * 100}{i}": huge for i in range(40)})
    status = to_rpc_status(error)
    (details,) = [value for key, value in status.trailing_metadata if key == "grpc-status-details-bin"]
    size = percent_encoded_size(status.details) + len(base64.b64encode(details))
    assert size <= 7 * 1024, size
    assert status.details.startswith(character * 10) and "more characters)" in status.details
