"""What the demo prints: answers, throughput, the adapter pools, the checks, how to connect."""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Iterable
from pathlib import Path

from services.common.pb.loraplex.inference.v1 import inference_pb2 as ipb
from services.common.pb.loraplex.router.v1 import nodes_pb2 as npb
from services.common.tls import grpcurl_flags
from services.demo.checks import Check
from services.demo.clients import Endpoints
from services.demo.setup import Tenant
from services.demo.text import shorten
from services.demo.traffic import TrafficRun
from services.demo.training import Trained


def step(number: int, total: int, title: str) -> None:
    print(f"\n[{number}/{total}] {title}", flush=True)


def answers(run: TrafficRun) -> None:
    shown: set[tuple[str, str]] = set()
    for answer in run.answers:
        key = (answer.call.tenant.customer.letter, answer.call.transport)
        if key in shown:  # one example per customer and transport; the checks cover the rest
            continue
        shown.add(key)
        customer = answer.call.tenant.customer
        print(f"  {customer.display_name} via {answer.call.transport}, model={answer.call.model}")
        print(f"    Q: {answer.call.question}")
        print(f"    A: {answer.error or shorten(answer.text, 200)}")
    print(f"  {len(run.answers)} concurrent requests, {run.completion_tokens} completion tokens in "
          f"{run.seconds:.2f}s = {run.tokens_per_second:.1f} tokens/s", flush=True)


def pools(stats: list[tuple[npb.NodeStatus, ipb.Stats]], trained: list[Trained]) -> None:
    names = {t.job.adapter_id: f"{t.job.output_adapter_name} v{t.job.adapter_version}" for t in trained}
    for node, s in stats:
        resident = ", ".join(names.get(a, a) for a in s.resident_adapter_ids) or "none"
        health = npb.NodeHealth.Name(node.health).removeprefix("NODE_HEALTH_")
        print(f"  node {node.node_id} ({node.address}, {health})")
        print(f"    resident adapters: {s.resident_adapters} [{resident}]")
        print(f"    pool pages: {s.pool.pages_used} used / {s.pool.pages_total}   hits {s.adapter_hits}  "
              f"misses {s.adapter_misses}  loads {s.adapter_loads}  evictions {s.adapter_evictions}  "
              f"load latency mean {s.adapter_load_ms_mean:.1f} ms")
        print(f"    requests finished {s.requests_finished}  generated tokens {s.generated_tokens_total}  "
              f"KV blocks {s.kv_blocks_used}/{s.kv_blocks_total}", flush=True)


def checks(results: Iterable[Check]) -> bool:
    results = list(results)
    for check in results:
        detail = f"  -> {check.detail}" if check.detail else ""
        print(f"  {'PASS' if check.passed else 'FAIL'}  {check.name}{detail}")
    failed = sum(not check.passed for check in results)
    print(f"  {len(results) - failed} of {len(results)} checks passed", flush=True)
    return failed == 0


def connect(endpoints: Endpoints, tenants: list[Tenant]) -> None:
    """The lines to paste: each on its own line, KEY=value first so scripts can grep them."""
    first = tenants[0]
    customer = first.customer
    base_url, router = endpoints.public_openai_base_url, endpoints.public_router
    print(f"OPENAI_BASE_URL={base_url}")
    print(f"OPENAI_API_KEY={first.api_key}")
    for tenant in tenants[1:]:
        print(f"# {tenant.customer.display_name}: OPENAI_API_KEY={tenant.api_key}")
    messages = customer.chat(customer.questions(1)[0])
    body = json.dumps({"model": customer.deployment, "messages": {"messages": messages},
                       "sampling": {"temperature": 0, "max_tokens": 64}})
    if hint := shell_hint():
        print(f"\n{hint}")
    security, tls = grpcurl_flags(endpoints.client_tls), endpoints.client_tls
    # The SDK's HTTP client (httpx) reads its CA bundle from SSL_CERT_FILE.
    sdk_env = "" if tls is None or tls.ca is None else f"SSL_CERT_FILE={shlex.quote(str(tls.ca))} "
    print("\ngrpcurl (customer A over gRPC):")
    print(f"  grpcurl {security} -H {shlex.quote('authorization: Bearer ' + first.api_key)} "
          f"-d {shlex.quote(body)} {router} loraplex.router.v1.Router/Generate")
    print("\nPython (OpenAI SDK; reads OPENAI_BASE_URL and OPENAI_API_KEY from the environment):")
    python = (f"from openai import OpenAI; r = OpenAI().chat.completions.create(model={customer.deployment!r}, "
              f"messages={messages!r}, temperature=0); print(r.choices[0].message.content)")
    print(f"  {sdk_env}OPENAI_BASE_URL={base_url} OPENAI_API_KEY={first.api_key} "
          f"python -c {shlex.quote(python)}", flush=True)


def shell_hint() -> str:
    """Where a pasted command finds grpcurl and the OpenAI SDK when the demo runs from a virtual
    environment (`make demo`: .venv, which also holds grpcurl): a fresh shell has neither on its
    PATH, and `grpcurl: command not found` is not what the printout promised."""
    if sys.prefix == sys.base_prefix:
        return ""
    activate = Path(sys.prefix) / "bin" / "activate"
    if activate.is_relative_to(Path.cwd()):
        activate = activate.relative_to(Path.cwd())
    return f"In a new shell, run `. {activate}` first: the grpcurl and python below are the ones it holds."
