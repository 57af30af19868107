"""The HTTP API at its edges: bodies too big or too deep to parse, OpenAI's signed seeds, and
request ids on error answers."""

from __future__ import annotations

import json

import openai
import pytest
from openai import OpenAI

from tests.router.conftest import CUSTOMER_A_MODEL
from tests.router.test_openai_api import http


def test_a_body_over_the_size_limit_is_a_413_not_a_retryable_429(make_router, world, nodes):
    router = make_router([n.address for n in nodes], max_message_mb=1)
    router.wait_healthy(len(nodes))
    body = json.dumps({"model": CUSTOMER_A_MODEL, "prompt": "x" * (2 * 1024 * 1024), "max_tokens": 1}).encode()
    status, reply, _ = http("POST", f"{router.base_url}/completions", body, world.a.token)
    assert status == 413 and reply["error"]["type"] == "invalid_request_error"
    assert reply["error"]["code"] == "body_too_large" and "1 MiB" in reply["error"]["message"]
    client = OpenAI(base_url=router.base_url, api_key=world.a.token, max_retries=0)
    with pytest.raises(openai.APIStatusError) as caught:  # the SDK must not retry it as if it were busy
        client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=[{"role": "user", "content": "y" * 2**21}])
    assert caught.value.status_code == 413
    assert client.completions.create(model=CUSTOMER_A_MODEL, prompt="hi", max_tokens=1).usage.completion_tokens == 1


def test_json_nested_too_deep_is_a_400_not_a_500(router, world):
    status, reply, _ = http("POST", f"{router.base_url}/chat/completions", b"[" * 100_000, world.a.token)
    assert status == 400 and reply["error"]["param"] == "body" and reply["error"]["type"] == "invalid_request_error"


def test_negative_seeds_which_openai_accepts_work_and_are_reproducible(router, world):
    client = OpenAI(base_url=router.base_url, api_key=world.a.token, max_retries=0)
    args = dict(model=CUSTOMER_A_MODEL, messages=[{"role": "user", "content": "hi"}], temperature=1.0, max_tokens=12,
                extra_body={"ignore_eos": True})
    first = client.chat.completions.create(**args, seed=-1).choices[0].message.content
    assert client.chat.completions.create(**args, seed=-1).choices[0].message.content == first
    assert client.chat.completions.create(**args, seed=-(2**63)).choices[0].message.content
    body = {"model": CUSTOMER_A_MODEL, "messages": [{"role": "user", "content": "hi"}], "seed": -(2**63) - 1}
    status, reply, _ = http("POST", f"{router.base_url}/chat/completions", json.dumps(body).encode(), world.a.token)
    assert status == 400 and reply["error"]["param"] == "seed"  # below OpenAI's int64 range


def test_error_answers_carry_a_request_id_the_sdk_can_report(router, world):
    client = OpenAI(base_url=router.base_url, api_key=world.b.token, max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=[{"role": "user", "content": "hi"}])
    assert caught.value.request_id
    with pytest.raises(openai.BadRequestError) as caught:  # refused by the node, after placement
        client.completions.create(model="customerB-model", prompt="word " * 400)
    assert caught.value.request_id
    done = client.completions.with_raw_response.create(model="customerB-model", prompt="hi", max_tokens=1)
    assert done.parse().id == f"cmpl-{done.headers['x-request-id']}"
