"""Router overhead: the latency the router adds per request (time to first token) and per
token (gap between tokens) compared with calling the inference node directly, p50/p99, at
1 and 64 concurrent streams. Prints one JSON object.

    .venv/bin/python -m bench.router [--tokens 64] [--requests 64] [--rounds 4] [--skip-real]

Every part is its own process, as deployed: a Registry (SQLite), the Router, and two kinds
of node behind it, each measured through its own router:
- `synthetic`: a stub Inference server that streams `max_tokens` tokens as fast as it can.
  With no model in the way, router - direct is the router's own cost: bearer check
  (cached), name resolution (cached), quota, placement, and relaying each message.
- `tiny`: a real node (`python -m services.inference`, the tiny model on CPU, an adapter
  downloaded from the Registry) to show the same overhead against real decode times.
The client is one asyncio process (grpc.aio). On a 2-core machine client, router and node
share the cores, so the figures include that contention: it is part of a one-box router.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.machine import describe
from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.common.pb.loraplex.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common.pb.loraplex.registry.v1 import registry_pb2 as rpb
from services.common.pb.loraplex.registry.v1 import registry_pb2_grpc
from services.common.pb.loraplex.router.v1 import router_pb2, router_pb2_grpc
from services.common.tiny_model import build_model_folder
from tests.conftest import free_port, start_module, stop_process, wait_for_health

ADMIN = "bench-admin"
MODEL = "bench-deployment"


# --- the synthetic node ---------------------------------------------------------------

class SyntheticNode(inference_pb2_grpc.InferenceServicer):
    async def Generate(self, request, context):
        count = request.sampling.max_tokens or 16
        for i in range(count):
            delta = gen.GenerationDelta(text="x", token_ids=[i % 500])
            if i == count - 1:
                delta.finish_reason = gen.FINISH_REASON_LENGTH
                delta.usage.prompt_tokens, delta.usage.completion_tokens = 8, count
                delta.usage.total_tokens = 8 + count
            yield inference_pb2.GenerateResponse(delta=delta)

    async def GetStats(self, request, context):
        return inference_pb2.Stats()

    async def GetInfo(self, request, context):
        return inference_pb2.ModelInfo(node_id="synthetic", base_model="tiny")


async def serve_synthetic(port: int) -> None:
    server = grpc.aio.server()
    inference_pb2_grpc.add_InferenceServicer_to_server(SyntheticNode(), server)
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_health.v1._async import HealthServicer

    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


# --- measurement ------------------------------------------------------------------------

async def one_stream(call) -> tuple[float, list[float]]:
    """(time to first token, gaps between tokens) of one stream, seconds."""
    started = time.perf_counter()
    stamps = []
    async for message in call:
        if message.delta.token_ids:
            stamps.append(time.perf_counter())
    return stamps[0] - started, [b - a for a, b in zip(stamps, stamps[1:])]


async def measure(open_call, concurrency: int, rounds: int) -> dict:
    ttfts, gaps = [], []
    for _ in range(rounds):
        results = await asyncio.gather(*(one_stream(open_call()) for _ in range(concurrency)))
        for ttft, stream_gaps in results:
            ttfts.append(ttft)
            gaps += stream_gaps
    return {"ttft_ms": percentiles(ttfts), "inter_token_ms": percentiles(gaps), "streams": len(ttfts)}


def percentiles(values: list[float]) -> dict:
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000  # noqa: E731
    return {"p50": round(pick(0.5), 4), "p99": round(pick(0.99), 4), "mean": round(statistics.fmean(values) * 1000, 4)}


def added(direct: dict, routed: dict) -> dict:
    return {f"{metric}_{q}": round(routed[metric][q] - direct[metric][q], 4)
            for metric in ("ttft_ms", "inter_token_ms") for q in ("p50", "p99")}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def compare(node_address: str, router_address: str, router_pid: int, key: str, adapter: rpb.Adapter,
                  tokens: int, requests: int, rounds: int) -> dict:
    sampling = gen.SamplingParams(max_tokens=tokens, ignore_eos=True, temperature=0)
    async with grpc.aio.insecure_channel(node_address) as node_channel, \
            grpc.aio.insecure_channel(router_address) as router_channel:
        node = inference_pb2_grpc.InferenceStub(node_channel)
        router = router_pb2_grpc.RouterStub(router_channel)
        ref = inference_pb2.AdapterRef(adapter_id=adapter.id, sha256=adapter.sha256, tenant_id=adapter.tenant_id)
        metadata = (("authorization", f"Bearer {key}"),)

        prompt = "benchmark prompt"

        def direct():
            return node.Generate(inference_pb2.GenerateRequest(adapter=ref, prompt=prompt, sampling=sampling))

        def routed():
            return router.Generate(router_pb2.GenerateRequest(model=MODEL, prompt=prompt, sampling=sampling),
                                   metadata=metadata)

        await measure(direct, 4, 1)  # warm-up: adapter resident, channels and caches hot
        await measure(routed, 4, 1)
        result = {}
        for concurrency, rounds_here in ((1, requests), (64, rounds)):
            d = await measure(direct, concurrency, rounds_here)
            cpu_before = cpu_seconds(router_pid)
            r = await measure(routed, concurrency, rounds_here)
            # Contention-free view: the router's own CPU per request and per relayed token.
            cpu = cpu_seconds(router_pid) - cpu_before
            r["router_cpu_us_per_token"] = round(cpu / (r["streams"] * tokens) * 1e6, 2)
            result[f"concurrency_{concurrency}"] = {"direct": d, "router": r, "router_adds": added(d, r)}
        return result


# --- the stack --------------------------------------------------------------------------

def provision(registry_address: str, model_dir: Path, work: Path) -> tuple[str, rpb.Adapter]:
    from tests.registry.client import Client
    from tests.registry.lora_files import make_peft_adapter

    with grpc.insecure_channel(registry_address) as channel:
        admin = Client(registry_pb2_grpc.RegistryStub(channel), ADMIN)
        admin.RegisterBaseModel(rpb.RegisterBaseModelRequest(name="tiny", location=str(model_dir)))
        tenant = admin.CreateTenant(rpb.CreateTenantRequest(name="bench"))
        key = admin.CreateApiKey(rpb.CreateApiKeyRequest(tenant=tenant.id, name="bench")).secret
        files = make_peft_adapter(model_dir, work / "adapter", r=8, alpha=16)
        adapter = admin.upload(files, name="bench", tenant=tenant.id, as_files=True).adapter
        admin.BindDeployment(rpb.BindDeploymentRequest(name=MODEL, tenant=tenant.id, adapter_name="bench"))
    return key, adapter


def start(module_args: list[str], log: Path):
    port = free_port()
    process = start_module(module_args[0], "--port", str(port), *module_args[1:], log=log)
    wait_for_health(f"127.0.0.1:{port}", timeout=180, process=process)
    return process, f"127.0.0.1:{port}"


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-router-"))
    model_dir = build_model_folder(work / "tiny")
    processes = []
    try:
        registry, registry_address = start(["services.registry", "--metrics-port", "0", "--data-dir",
                                            str(work / "registry"), "--admin-token", ADMIN], work / "registry.log")
        processes.append(registry)
        key, adapter = provision(registry_address, model_dir, work)
        nodes = {}
        synthetic_port = free_port()
        synthetic = start_module("bench.router", "synthetic-node", str(synthetic_port), log=work / "synthetic.log")
        processes.append(synthetic)
        wait_for_health(f"127.0.0.1:{synthetic_port}", process=synthetic)
        nodes["synthetic"] = f"127.0.0.1:{synthetic_port}"
        if not args.skip_real:
            node, nodes["tiny"] = start(["services.inference", "--metrics-port", "0", "--base-model", str(model_dir),
                                         "--registry-address", registry_address, "--admin-token", ADMIN],
                                        work / "node.log")
            processes.append(node)
        figures = {}
        for name, node_address in nodes.items():
            router, router_address = start(["services.router", "--metrics-port", "0", "--http-port", "-1",
                                            "--registry-address", registry_address, "--admin-token", ADMIN,
                                            "--node", node_address, "--log-level", "WARNING",
                                            "--tenant-max-concurrent", "0"], work / f"router-{name}.log")
            processes.append(router)
            time.sleep(1.5)  # first node poll and change-feed connection, so caches are trusted
            figures[name] = asyncio.run(compare(node_address, router_address, router.pid, key, adapter,
                                                args.tokens, args.requests, args.rounds))
        return figures
    finally:
        for process in reversed(processes):
            stop_process(process)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["synthetic-node"]:
        asyncio.run(serve_synthetic(int(argv[1])))
        return 0
    parser = argparse.ArgumentParser(prog="python -m bench.router", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens per stream")
    parser.add_argument("--requests", type=int, default=64, help="sequential streams at concurrency 1")
    parser.add_argument("--rounds", type=int, default=4, help="rounds of 64 concurrent streams")
    parser.add_argument("--skip-real", action="store_true", help="only the synthetic node")
    args = parser.parse_args(argv)
    figures = run(args)
    print(json.dumps({"benchmark": "router", "machine": describe(),
                      "settings": {"tokens_per_stream": args.tokens, "sequential_requests": args.requests,
                                   "rounds_at_64": args.rounds},
                      "nodes": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
