"""Per-tenant usage on the router's /metrics, through the OpenAI SDK against a real router and
nodes: tokens as usage reports them (the prompt once for n choices), how each request ended,
quota refusals by tenant, time to first token; and no series for names that resolve to nothing."""

from __future__ import annotations

import openai
import pytest
from openai import OpenAI
from prometheus_client import REGISTRY, generate_latest

from services.router.quotas import Limits
from tests.router.harness import wait_until

HI = [{"role": "user", "content": "Summarize today's stock market trends."}]
FIXED = {"max_tokens": 5, "temperature": 0.0, "extra_body": {"ignore_eos": True}}


def value(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def tokens(tenant: str, model: str, kind: str) -> float:
    return value("loraplex_router_tenant_tokens_total", tenant=tenant, model=model, kind=kind)


def requests(tenant: str, model: str, outcome: str) -> float:
    return value("loraplex_router_tenant_requests_total", tenant=tenant, model=model, outcome=outcome)


@pytest.fixture
def tenant(world):
    return world.new_tenant("usage")  # series no other test adds to


def test_tokens_and_outcomes_are_counted_per_tenant_and_model_as_usage_reports_them(router, tenant):
    client = OpenAI(base_url=router.base_url, api_key=tenant.token, max_retries=0)
    name = tenant.tenant_name
    one = client.chat.completions.create(model="tiny", messages=HI, **FIXED)
    assert tokens(name, "tiny", "prompt") == one.usage.prompt_tokens
    assert tokens(name, "tiny", "completion") == 5
    assert requests(name, "tiny", "length") == 1
    three = client.chat.completions.create(model="tiny", messages=HI, n=3, **FIXED)
    assert tokens(name, "tiny", "prompt") == one.usage.prompt_tokens + three.usage.prompt_tokens  # once for n
    assert tokens(name, "tiny", "completion") == 5 + 15
    assert tokens(name, "tiny", "cached_prompt") == (one.usage.prompt_tokens_details.cached_tokens
                                                     + three.usage.prompt_tokens_details.cached_tokens)
    assert requests(name, "tiny", "length") == 4
    stream = client.chat.completions.create(model="tiny", messages=HI, stream=True,
                                            **{**FIXED, "max_tokens": 200})
    next(iter(stream))
    stream.close()  # the caller leaves before the end
    wait_until(lambda: requests(name, "tiny", "cancelled") == 1, what="the abandoned request is counted")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HI, **FIXED)
    assert not any(sample.labels.get("model") == "no-such-model" for metric in REGISTRY.collect()
                   for sample in metric.samples)  # made-up names add no series
    scraped = generate_latest(REGISTRY).decode()  # what /metrics serves
    assert f'loraplex_router_tenant_requests_total{{model="tiny",outcome="length",tenant="{name}"}} 4.0' in scraped
    assert 'loraplex_router_time_to_first_token_seconds_count{base_model="tiny"}' in scraped


def test_quota_refusals_are_counted_by_tenant(router, tenant):
    overrides = router.app.core.quotas.overrides
    router.run(lambda: overrides.__setitem__(tenant.tenant_id, Limits(max_concurrent=1)))
    try:
        client = OpenAI(base_url=router.base_url, api_key=tenant.token, max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="tiny", messages=HI, n=2, **FIXED)
        assert value("loraplex_router_quota_rejections_total", tenant=tenant.tenant_name,
                     reason="CONCURRENCY_QUOTA") == 1
    finally:
        router.run(lambda: overrides.pop(tenant.tenant_id))
