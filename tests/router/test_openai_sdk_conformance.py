"""What a user of the official `openai` SDK meets at the edges of the HTTP API: every part of a
request that would change the answer is honoured or refused with a 400 naming it (never
dropped), fields without effect here are still typed as OpenAI types them, parameters newer
SDKs send are recognised, errors name the parameter the caller sent, and input the node cannot
encode is the caller's 400, not our 500."""

from __future__ import annotations

import json

import openai
import pytest
from openai import OpenAI

from tests.router.conftest import CUSTOMER_A_MODEL
from tests.router.test_openai_api import http

HI = [{"role": "user", "content": "hi"}]


@pytest.fixture
def client(router, world) -> OpenAI:
    return OpenAI(base_url=router.base_url, api_key=world.a.token, max_retries=0)


def refused(call) -> dict:
    """The OpenAI error body of a call the SDK raised as a 400."""
    with pytest.raises(openai.BadRequestError) as caught:
        call()
    assert caught.value.body["type"] == "invalid_request_error"
    return caught.value.body


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "user", "content": "hi", "name": "alice"}, "messages[1].name"),
    ({"role": "assistant", "content": None, "tool_calls": [  # a template takes the arguments as an object
        {"id": "call_1", "type": "function", "function": {"name": "quote", "arguments": "not json"}}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"role": "tool", "content": "4.2%", "tool_call_id": "call_never_made"}, "messages[1].tool_call_id"),
    ({"role": "assistant", "content": None, "function_call": {"name": "quote", "arguments": "{}"}},
     "messages[1].function_call"),
    ({"role": "assistant", "refusal": "I can't help with that."}, "messages[1].refusal"),
    ({"role": "user", "content": "hi", "contents": "typo"}, "messages[1].contents"),
])
def test_message_parts_the_model_would_not_see_are_a_400_not_dropped(client, message, param):
    body = refused(lambda: client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=[*HI, message],
                                                          max_tokens=1))
    assert body["param"] == param


def test_an_sdk_answer_appended_to_the_conversation_is_accepted(client):
    """The usual loop: the answer's message object (or its dump, unset fields as null) goes back in."""
    first = client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=HI, max_tokens=3)
    for previous in (first.choices[0].message, first.choices[0].message.model_dump()):
        answer = client.chat.completions.create(
            model=CUSTOMER_A_MODEL, max_tokens=2, messages=[*HI, previous, {"role": "user", "content": "more"}])
        assert answer.usage.prompt_tokens > first.usage.prompt_tokens


@pytest.mark.parametrize(("field", "value"), [
    ("store", "yes"), ("metadata", 5), ("metadata", {"tier": 1}), ("service_tier", 5),
    ("parallel_tool_calls", "no"), ("safety_identifier", 3), ("prompt_cache_key", 3)])
def test_fields_without_effect_are_still_typed_as_openai_types_them(client, field, value):
    body = refused(lambda: client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=HI, max_tokens=1,
                                                          extra_body={field: value}))
    assert body["param"].split(".")[0] == field


def test_fields_without_effect_pass_with_their_right_types(client):
    answer = client.chat.completions.create(
        model=CUSTOMER_A_MODEL, messages=HI, max_tokens=1, metadata={"tier": "gold"}, store=False,
        service_tier="auto", safety_identifier="user-7", prompt_cache_key="k", parallel_tool_calls=True,
        prompt_cache_retention="24h", prompt_cache_options={"mode": "implicit"})
    assert answer.usage.completion_tokens == 1


def test_moderation_which_newer_sdks_send_is_refused_by_name_not_as_unknown(client):
    body = refused(lambda: client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=HI, max_tokens=1,
                                                          moderation={"model": "omni-moderation-latest"}))
    assert body["param"] == "moderation" and "unrecognized" not in body["message"]


@pytest.mark.parametrize(("options", "param"), [({"include_usage": "yes"}, "stream_options.include_usage"),
                                                ({"include_usgae": True}, "stream_options.include_usgae")])
def test_stream_options_typos_and_wrong_types_are_a_400_naming_the_option(client, options, param):
    body = refused(lambda: client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=HI, max_tokens=1,
                                                          stream=True, stream_options=options))
    assert body["param"] == param


def test_include_obfuscation_false_is_accepted_as_we_never_obfuscate(client):
    chunks = list(client.chat.completions.create(
        model=CUSTOMER_A_MODEL, messages=HI, max_tokens=2, stream=True,
        stream_options={"include_usage": True, "include_obfuscation": False}))
    assert chunks[-1].usage.completion_tokens == 2


@pytest.mark.parametrize("stream", [False, True])
def test_a_limit_beyond_the_context_names_max_completion_tokens_when_that_was_sent(client, stream):
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=CUSTOMER_A_MODEL, messages=HI, max_completion_tokens=100_000,
                                       stream=stream)
    body = caught.value.body
    assert body["code"] == "context_length_exceeded" and body["param"] == "max_completion_tokens"
    assert body["message"].startswith("max_completion_tokens ")


@pytest.mark.parametrize(("path", "body", "param"), [
    ("chat/completions", {"model": CUSTOMER_A_MODEL, "messages": [{"role": "user", "content": "\ud800"}]},
     "messages[0].content"),
    ("chat/completions", {"model": "\udc00", "messages": HI}, "model"),
    ("chat/completions", {"model": CUSTOMER_A_MODEL, "messages": HI, "stop": ["ok", "\udc00"]}, "stop[1]"),
    ("completions", {"model": CUSTOMER_A_MODEL, "prompt": "a\ud800"}, "prompt"),
    ("completions", {"model": CUSTOMER_A_MODEL, "prompt": "a", "\ud800": 1}, "body"),
])
def test_unpaired_surrogates_which_json_allows_are_a_400_naming_the_field_not_a_500(router, world, path, body,
                                                                                     param):
    """Python's SDK cannot send them, but JSON can (a JS client that cut a string mid-pair)."""
    raw = json.dumps({"max_tokens": 1, **body}).encode()  # ensure_ascii keeps them as \\udXXX escapes
    status, reply, headers = http("POST", f"{router.base_url}/{path}", raw, world.a.token)
    assert status == 400 and reply["error"]["param"] == param and "surrogate" in reply["error"]["message"]
    assert reply["error"]["type"] == "invalid_request_error" and headers["x-request-id"]
