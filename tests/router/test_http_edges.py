"""The HTTP API at its edges: bodies too big or too deep to parse, OpenAI's signed seeds,
request ids (the router's and the caller's own), stop sequences the node would refuse, wrong
methods, and logprob text offsets where tokens split characters."""

from __future__ import annotations

import json
import urllib.request

import openai
import pytest
from openai import OpenAI
from transformers import AutoTokenizer

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


def test_a_callers_own_request_id_is_used_and_echoed_but_each_response_keeps_its_own_id(router, world):
    client = OpenAI(base_url=router.base_url, api_key=world.a.token, max_retries=0)
    ids = []
    for _ in range(2):  # a client reusing its id (the SDK's retries resend the same headers)
        done = client.completions.with_raw_response.create(model=CUSTOMER_A_MODEL, prompt="hi", max_tokens=1,
                                                           extra_headers={"X-Client-Request-Id": "trace-42"})
        assert done.headers["x-request-id"] == "trace-42" and done.request_id == "trace-42"
        ids.append(done.parse().id)
    assert ids[0] != ids[1] and all(i.startswith("cmpl-") and "trace-42" not in i for i in ids)
    with client.chat.completions.with_streaming_response.create(
            model=CUSTOMER_A_MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2, stream=True,
            extra_headers={"X-Request-Id": "proxy-7"}) as streamed:
        assert streamed.headers["x-request-id"] == "proxy-7"
        chunk_ids = {chunk.id for chunk in streamed.parse()}
    assert len(chunk_ids) == 1 and chunk_ids.pop().startswith("chatcmpl-")
    both = {"X-Client-Request-Id": "from-the-client", "X-Request-Id": "from-a-proxy"}
    done = client.completions.with_raw_response.create(model=CUSTOMER_A_MODEL, prompt="hi", max_tokens=1,
                                                       extra_headers=both)
    assert done.headers["x-request-id"] == "from-the-client"
    with pytest.raises(openai.NotFoundError) as caught:  # errors carry it too
        client.completions.create(model="nope", prompt="hi", extra_headers={"X-Request-Id": "lost-1"})
    assert caught.value.request_id == "lost-1"


@pytest.mark.parametrize(("header", "value"), [("X-Request-Id", "has space"),
                                               ("X-Client-Request-Id", "x" * 129)])
def test_a_malformed_request_id_header_is_a_400_naming_it(router, world, header, value):
    client = OpenAI(base_url=router.base_url, api_key=world.a.token, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=CUSTOMER_A_MODEL, prompt="hi", max_tokens=1, extra_headers={header: value})
    assert caught.value.body["param"] == header.lower() and caught.value.code == "bad_request_id"
    assert caught.value.request_id and caught.value.request_id != value  # the router's own, for its logs


@pytest.mark.parametrize(("stop", "wording"), [("", "non-empty"), (["END", ""], "non-empty"),
                                               ([f"s{i}" for i in range(17)], "array too long")])
def test_stop_sequences_the_node_would_refuse_are_refused_by_the_router(router, world, stop, wording):
    client = OpenAI(base_url=router.base_url, api_key=world.a.token, max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=[{"role": "user", "content": "hi"}],
                                       max_tokens=1, stop=stop)
    assert caught.value.body["param"] == "stop" and caught.value.code != "node_rejected"
    assert wording in caught.value.message
    done = client.completions.create(model=CUSTOMER_A_MODEL, prompt="hi", max_tokens=1,
                                     stop=[f"s{i}" for i in range(16)])  # the node's limit is allowed
    assert done.usage.completion_tokens == 1


def test_wrong_methods_say_which_are_allowed(router):
    for method, path, allowed in (("OPTIONS", "/chat/completions", "POST"), ("DELETE", "/models", "GET")):
        status, body, headers = http(method, f"{router.base_url}{path}")
        assert status == 405 and body["error"]["code"] == "method_not_allowed"
        assert allowed in {m.strip() for m in headers["allow"].split(",")}
    request = urllib.request.Request(f"{router.base_url}/nowhere", method="HEAD")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=60)
    assert caught.value.code == 404


def test_completion_text_offsets_index_the_text_where_tokens_split_characters(router, world, tiny_model_dir):
    """Over the whole answer: past a character split over tokens and past special tokens, which
    the text leaves out (an EOS under ignore_eos) and so must not move the offsets after them."""
    special = set(AutoTokenizer.from_pretrained(tiny_model_dir).all_special_tokens)  # the text skips them
    client = OpenAI(base_url=router.base_url, api_key=world.a.token, max_retries=0)
    for seed in range(80):  # the base model's random weights: find an answer with both in it
        args = dict(model="tiny", prompt="你好, é à ü — 日本語", max_tokens=48, temperature=1.0, seed=seed,
                    logprobs=0, extra_body={"ignore_eos": True})
        choice = client.completions.create(**args).choices[0]
        tokens, offsets = choice.logprobs.tokens, choice.logprobs.text_offset
        whole = [i for i, (token, offset) in enumerate(zip(tokens, offsets))
                 if token == "\ufffd" and offset < len(choice.text) and ord(choice.text[offset]) > 127
                 and choice.text[offset] != "\ufffd"]
        skipped = [i for i, token in enumerate(tokens[:-1]) if token in special]
        if whole and skipped and any(token not in special for token in tokens[skipped[0] + 1:]):
            break
    else:
        pytest.fail("no answer held both a character split over tokens and a special token before its end")
    assert offsets == sorted(offsets) and all(offset <= len(choice.text) for offset in offsets)
    checked_after_special = 0
    for i, (token, offset) in enumerate(zip(tokens, offsets)):
        if token in special:  # where it would be: the text so far, none of it its own (the next
            # token's offset, unless a character cut off before it became a U+FFFD there)
            later = [o for t, o in zip(tokens[i + 1:], offsets[i + 1:]) if t not in special]
            assert offset == (later[0] if later else len(choice.text)) or choice.text[offset:][:1] == "\ufffd"
        elif token != "\ufffd":
            assert choice.text[offset:offset + len(token)] == token
            checked_after_special += i > skipped[0]
    assert checked_after_special
    streamed = [offset for chunk in client.completions.create(**args, stream=True)
                if chunk.choices and chunk.choices[0].logprobs for offset in chunk.choices[0].logprobs.text_offset]
    assert streamed == offsets
