"""Concurrent requests for every customer through the Router, over gRPC and the OpenAI API.

All requests are in flight at once (one thread each), so the inference node batches requests
for different adapters into the same forward passes. Greedy decoding: a tiny model's answers
are then the ones it was taught, and reruns print the same text.
"""

from __future__ import annotations

import dataclasses
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import openai

from services.common.pb.loraplex.common.v1 import generation_pb2 as gpb
from services.common.pb.loraplex.router.v1 import router_pb2 as rpb
from services.demo.clients import Channels, Endpoints
from services.demo.setup import Tenant

GRPC, HTTP = "gRPC", "OpenAI HTTP"


@dataclasses.dataclass(frozen=True)
class Call:
    tenant: Tenant
    model: str
    question: str
    transport: str


@dataclasses.dataclass(frozen=True)
class Answer:
    call: Call
    text: str = ""
    completion_tokens: int = 0
    adapter_id: str = ""  # the adapter version the Router says served it (gRPC only)
    error: str = ""  # "CODE: message" when the call failed
    seconds: float = 0.0


def _grpc(channels: Channels, call: Call, max_tokens: int) -> Answer:
    messages = gpb.ChatMessages(messages=[gpb.ChatMessage(**m) for m in call.tenant.customer.chat(call.question)])
    request = rpb.GenerateRequest(model=call.model, messages=messages,
                                  sampling=gpb.SamplingParams(max_tokens=max_tokens, temperature=0.0))
    text, tokens, adapter_id = [], 0, ""
    for reply in channels.router(call.tenant.api_key).Generate(request, timeout=300):
        adapter_id = adapter_id or reply.adapter_id
        text.append(reply.delta.text)
        if reply.delta.HasField("usage"):
            tokens = reply.delta.usage.completion_tokens
    return Answer(call, "".join(text), tokens, adapter_id)


def _http(endpoints: Endpoints, call: Call, max_tokens: int) -> Answer:
    http_client = None if endpoints.client_tls is None else openai.DefaultHttpxClient(
        verify=endpoints.client_tls.ssl_context())
    client = openai.OpenAI(base_url=endpoints.openai_base_url, api_key=call.tenant.api_key, max_retries=0,
                           timeout=300, http_client=http_client)
    try:
        completion = client.chat.completions.create(model=call.model, messages=call.tenant.customer.chat(call.question),
                                                    max_tokens=max_tokens, temperature=0.0)
    finally:
        client.close()
    return Answer(call, completion.choices[0].message.content or "", completion.usage.completion_tokens)


def run_call(channels: Channels, call: Call, max_tokens: int) -> Answer:
    started = time.perf_counter()
    try:
        if call.transport == GRPC:
            answer = _grpc(channels, call, max_tokens)
        else:
            answer = _http(channels.endpoints, call, max_tokens)
    except grpc.RpcError as exc:
        answer = Answer(call, error=f"{exc.code().name}: {exc.details()}")
    except openai.APIStatusError as exc:
        answer = Answer(call, error=f"HTTP {exc.status_code}: {exc.message}")
    except openai.APIError as exc:
        answer = Answer(call, error=f"{type(exc).__name__}: {exc}")
    return dataclasses.replace(answer, seconds=time.perf_counter() - started)


@dataclasses.dataclass(frozen=True)
class TrafficRun:
    answers: list[Answer]
    seconds: float

    @property
    def completion_tokens(self) -> int:
        return sum(answer.completion_tokens for answer in self.answers)

    @property
    def tokens_per_second(self) -> float:
        return self.completion_tokens / self.seconds if self.seconds else 0.0


def run_concurrently(channels: Channels, calls: list[Call], max_tokens: int) -> TrafficRun:
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        answers = list(pool.map(lambda call: run_call(channels, call, max_tokens), calls))
    return TrafficRun(answers, time.perf_counter() - started)


def adapter_calls(tenants: list[Tenant], per_customer: int) -> list[Call]:
    """Each customer's questions against its own deployment, alternating gRPC and HTTP."""
    return [Call(tenant, tenant.customer.deployment, question, (GRPC, HTTP)[i % 2])
            for tenant in tenants for i, question in enumerate(tenant.customer.questions(per_customer))]


def base_calls(tenants: list[Tenant], base_model: str) -> list[Call]:
    """The same first question to the bare base model: it must not answer like any adapter."""
    return [Call(tenant, base_model, tenant.customer.questions(1)[0], GRPC) for tenant in tenants]


def foreign_calls(tenants: list[Tenant]) -> list[Call]:
    """Each customer asks for the next customer's deployment: tenant isolation must refuse it."""
    return [Call(tenant, other.customer.deployment, tenant.customer.questions(1)[0], transport)
            for tenant, other in zip(tenants, tenants[1:] + tenants[:1]) for transport in (GRPC, HTTP)]
