"""Hot swaps: time to the first token of the first request after a deployment is bound, with
and without the router's adapter prefetch (--prefetch-adapters).

    python -m bench.prefetch --preset small --repetitions 5 --json out.json

Every part is its own process, as deployed: a Registry (SQLite, local blobs), one inference
node on the CPU, and a Router, started once with prefetch off and once with it on. Each
repetition uploads a fresh adapter (rank `--rank` on all seven projections of the preset's
shape: its realistic size), binds a new deployment to it, and sends one short greedy request
through the router, timing from the request to its first token:

- `no_prefetch`: the request right after BindDeployment returns; the node downloads the
  adapter from the Registry, checks its sha256 and parses it while the request waits.
- `prefetch_request_at_bind`: the same with prefetch on; the request races the prefetch.
  It usually reaches the node first (the prefetch waits for the feed event and a resolution),
  so the prefetch joins its download and saves it nothing: the gain is for requests that come
  once the prefetch has landed, as after a swap made ahead of traffic.
- `prefetch_request_after_warm`: prefetch on, the request once the node lists the adapter in
  its host tier (`bind_to_host_tier_ms`: how long that took after the bind); it only copies
  host -> device pages. `node_fetches_during_request` (the node's own counter) says whether
  the request had to download anything (1 without prefetch, 0 here).
- `resident`: a second request to the same deployment, adapter already on the device: the
  floor a prefetch cannot beat.
Medians over the repetitions. On a 2-core machine client, router, registry and node share
the cores, so the figures include that contention.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import grpc

from bench.engine import build_adapters
from bench.machine import describe, report
from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.common.pb.loraplex.inference.v1 import inference_pb2, inference_pb2_grpc
from services.common.pb.loraplex.registry.v1 import registry_pb2 as rpb
from services.common.pb.loraplex.registry.v1 import registry_pb2_grpc
from services.common.pb.loraplex.router.v1 import router_pb2, router_pb2_grpc
from tests.conftest import free_port, start_module, stop_process, wait_for_health

ADMIN = "bench-admin"
BASE = "bench-base"


class Stack:
    """Clients of the Registry and node processes that both router settings share, a tenant and its
    key, and the adapters to bind."""

    def __init__(self, work: Path, base: Path, registry_address: str, node_address: str, adapters: int,
                 rank: int) -> None:
        import torch
        from transformers import AutoConfig

        from tests.registry.client import Client

        self._registry_channel = grpc.insecure_channel(registry_address)
        self.admin = Client(registry_pb2_grpc.RegistryStub(self._registry_channel), ADMIN)
        self._node_channel = grpc.insecure_channel(node_address)
        self.node = inference_pb2_grpc.InferenceStub(self._node_channel)
        self.node_metadata = (("authorization", f"Bearer {ADMIN}"),)
        self.admin.RegisterBaseModel(rpb.RegisterBaseModelRequest(name=BASE, location=str(base)))
        self.tenant = self.admin.CreateTenant(rpb.CreateTenantRequest(name="bench")).id
        self.key = self.admin.CreateApiKey(rpb.CreateApiKeyRequest(tenant=self.tenant, name="bench")).secret
        # Every adapter its own random draws: fresh bytes for every bind, as a new version has.
        self._folders = [work / "adapters" / name for name in build_adapters(
            AutoConfig.from_pretrained(base), work / "adapters", adapters, rank, torch.float32)]
        self.adapter_ids: dict[str, str] = {}

    def new_deployment(self) -> tuple[str, str, int]:
        """(deployment name, adapter name, weight bytes) of a fresh adapter, uploaded, not yet bound."""
        folder = self._folders[len(self.adapter_ids)]
        name = f"adapter-{folder.name}"
        config, weights = (folder / "adapter_config.json").read_bytes(), (folder / "adapter_model.safetensors").read_bytes()
        uploaded = self.admin.upload_bytes(config + weights, name=name, tenant=self.tenant, base_model=BASE,
                                           archive=rpb.ADAPTER_ARCHIVE_FILES,
                                           files=[("adapter_config.json", len(config)),
                                                  ("adapter_model.safetensors", len(weights))])
        self.adapter_ids[name] = uploaded.adapter.id
        return f"deployment-{folder.name}", name, len(weights)

    def bind(self, deployment: str, adapter_name: str) -> None:
        self.admin.BindDeployment(rpb.BindDeploymentRequest(name=deployment, tenant=self.tenant,
                                                            adapter_name=adapter_name))

    def host_tier_holds(self, adapter_name: str) -> bool:
        adapter_id = self.adapter_ids[adapter_name]
        listed = self.node.ListAdapters(inference_pb2.ListAdaptersRequest(), metadata=self.node_metadata, timeout=10)
        return any(s.adapter_id == adapter_id and s.tier in (inference_pb2.ADAPTER_TIER_HOST,
                                                              inference_pb2.ADAPTER_TIER_DEVICE)
                   for s in listed.adapters)

    def fetches(self) -> int:
        return self.node.GetStats(inference_pb2.GetStatsRequest(), metadata=self.node_metadata, timeout=10).adapter_fetches

    def close(self) -> None:
        self._registry_channel.close()
        self._node_channel.close()


def first_token_ms(router: router_pb2_grpc.RouterStub, key: str, model: str) -> float:
    request = router_pb2.GenerateRequest(model=model, prompt="hello there",
                                         sampling=gen.SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    started = time.perf_counter()
    stream = router.Generate(request, metadata=(("authorization", f"Bearer {key}"),), timeout=300)
    try:
        for message in stream:
            if message.delta.token_ids:
                return (time.perf_counter() - started) * 1000
    finally:
        stream.cancel()
    raise RuntimeError(f"no token for {model}")


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"not within {timeout_s}s: {what}")
        time.sleep(0.01)


def run_router(stack: Stack, work: Path, registry_address: str, node_address: str, prefetch: bool,
               args) -> dict:
    """Starts a router with prefetch on or off and measures each repetition's first requests."""
    port = free_port()
    router_process = start_module("services.router", "--port", str(port), "--metrics-port", "0", "--http-port", "-1",
                                  "--registry-address", registry_address, "--admin-token", ADMIN,
                                  "--node", node_address, "--node-poll-seconds", "0.2", "--log-level", "WARNING",
                                  "--tenant-max-concurrent", "0", "--prefetch-adapters", str(prefetch).lower(),
                                  log=work / f"router-prefetch-{prefetch}.log")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        wait_for_health(f"127.0.0.1:{port}", timeout=120, process=router_process)
        router = router_pb2_grpc.RouterStub(channel)
        # Warm-up (not counted): connections, the node's LoRA path, the router's feed and node poll.
        deployment, adapter_name, _ = stack.new_deployment()
        stack.bind(deployment, adapter_name)
        wait_for(lambda: _answers(router, stack.key, deployment), 120, "the router serving its first deployment")
        scenarios = ("prefetch_request_at_bind", "prefetch_request_after_warm") if prefetch else ("no_prefetch",)
        figures = {name: {"ttft_ms": [], "node_fetches_during_request": []} for name in scenarios}
        figures["resident"] = {"ttft_ms": []}
        warm_ms = []
        for _ in range(args.repetitions):
            for scenario in scenarios:
                deployment, adapter_name, adapter_bytes = stack.new_deployment()
                bound_at = time.perf_counter()
                stack.bind(deployment, adapter_name)
                if scenario == "prefetch_request_after_warm":
                    wait_for(lambda: stack.host_tier_holds(adapter_name), 120, f"{adapter_name} prefetched")
                    warm_ms.append((time.perf_counter() - bound_at) * 1000)
                # Not read when racing the prefetch: the extra call would give the prefetch a head start.
                fetched = stack.fetches() if scenario != "prefetch_request_at_bind" else None
                figures[scenario]["ttft_ms"].append(first_token_ms(router, stack.key, deployment))
                if fetched is not None:
                    figures[scenario]["node_fetches_during_request"].append(stack.fetches() - fetched)
                figures["resident"]["ttft_ms"].append(first_token_ms(router, stack.key, deployment))
        figures.get("prefetch_request_at_bind", {}).pop("node_fetches_during_request", None)  # never read
        for entry in figures.values():
            entry["ttft_ms_median"] = round(statistics.median(entry["ttft_ms"]), 2)
            entry["ttft_ms"] = [round(v, 2) for v in entry["ttft_ms"]]
        if warm_ms:
            figures["prefetch_request_after_warm"]["bind_to_host_tier_ms_median"] = round(statistics.median(warm_ms), 2)
        figures["adapter_bytes"] = adapter_bytes
        return figures
    finally:
        channel.close()
        stop_process(router_process)


def _answers(router, key: str, model: str) -> bool:
    try:
        first_token_ms(router, key, model)
        return True
    except grpc.RpcError:  # feed or node not there yet
        time.sleep(0.2)
        return False


def run(args) -> dict:
    from services.common.tiny_model import build_model_folder

    work = Path(tempfile.mkdtemp(prefix="bench-prefetch-"))
    base = build_model_folder(work / "base", preset=args.preset)
    processes = []
    try:
        registry_port, node_port = free_port(), free_port()
        processes.append(start_module("services.registry", "--port", str(registry_port), "--metrics-port", "0",
                                      "--data-dir", str(work / "registry"), "--admin-token", ADMIN,
                                      log=work / "registry.log"))
        registry_address = f"127.0.0.1:{registry_port}"
        wait_for_health(registry_address, timeout=120, process=processes[-1])
        processes.append(start_module("services.inference", "--port", str(node_port), "--metrics-port", "0",
                                      "--base-model", str(base), "--base-model-name", BASE,
                                      "--registry-address", registry_address, "--admin-token", ADMIN,
                                      "--kv-cache-mb", "64", log=work / "node.log"))
        node_address = f"127.0.0.1:{node_port}"
        wait_for_health(node_address, timeout=300, process=processes[-1])
        # A warm-up adapter per router, then one per repetition: one scenario with prefetch off, two with it on.
        stack = Stack(work, base, registry_address, node_address, 2 + 3 * args.repetitions, args.rank)
        try:
            off = run_router(stack, work, registry_address, node_address, False, args)
            on = run_router(stack, work, registry_address, node_address, True, args)
        finally:
            stack.close()
        return {"off": off, "on": on}
    finally:
        for process in reversed(processes):
            stop_process(process)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.prefetch", description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small", help="services/common/tiny_model.py preset")
    parser.add_argument("--rank", type=int, default=16, help="adapter rank, on all seven projections")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--json", type=Path, help="also write the report here")
    args = parser.parse_args(argv)
    figures = run(args)
    off, on = figures["off"], figures["on"]
    cold, warm = off["no_prefetch"]["ttft_ms_median"], on["prefetch_request_after_warm"]["ttft_ms_median"]
    report({"benchmark": "prefetch", "machine": describe(),
            "settings": {"preset": args.preset, "rank": args.rank, "modules": 7, "repetitions": args.repetitions,
                         "adapter_bytes": off["adapter_bytes"], "new_tokens": 4},
            "no_prefetch": off["no_prefetch"], "prefetch_request_at_bind": on["prefetch_request_at_bind"],
            "prefetch_request_after_warm": on["prefetch_request_after_warm"],
            "resident": {"ttft_ms_median": round(statistics.median(off["resident"]["ttft_ms"]
                                                                   + on["resident"]["ttft_ms"]), 2)},
            "first_token_speedup_median": round(cold / warm, 2),
            "first_token_ms_saved_median": round(cold - warm, 2)}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
