"""OpenAI's Responses API (`client.responses`) through the official `openai` SDK, a real router
and real inference nodes serving the tiny model (whose free text is noise): the same tokens as
chat completions, adapters, streaming as the SDK reads it, incomplete answers, structured
output, function calls, and OpenAI's errors naming the parameter."""

from __future__ import annotations

import json
import urllib.request

import jsonschema
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from services.common.pb.loraplex.registry.v1 import registry_pb2 as rpb
from services.common.tiny_model import build_tokenizer
from tests.router.conftest import CUSTOMER_A_MODEL
from tests.router.harness import wait_until
from tests.router.test_openai_api import http

QUOTE = {"type": "object", "properties": {"bond": {"enum": ["2y", "10y", "30y"]},
                                          "years": {"type": "integer", "minimum": 1, "maximum": 30}},
         "required": ["bond", "years"], "additionalProperties": False}
TOOLS = [{"type": "function", "name": "quote", "description": "A bond's price.", "parameters": QUOTE, "strict": True}]


class Quote(BaseModel):
    bond: str = Field(pattern="^(2y|10y|30y)$")
    years: int = Field(ge=1, le=30)


@pytest.fixture
def client(router, world) -> OpenAI:
    return OpenAI(base_url=router.base_url, api_key=world.a.token, max_retries=0)


def test_a_string_input_answers_what_chat_completions_answers(client):
    # ignore_eos (vLLM's extension, taken by both APIs): the random tiny model would often stop at once
    response = client.responses.create(model=CUSTOMER_A_MODEL, input="Summarize Q3.", temperature=0,
                                       max_output_tokens=24, extra_body={"ignore_eos": True})
    chat = client.chat.completions.create(model=CUSTOMER_A_MODEL,
                                          messages=[{"role": "user", "content": "Summarize Q3."}], temperature=0,
                                          max_completion_tokens=24, extra_body={"ignore_eos": True})
    assert response.object == "response" and response.id.startswith("resp_") and response.model == CUSTOMER_A_MODEL
    assert response.output_text and response.output_text == chat.choices[0].message.content
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens and usage.output_tokens > 0
    assert response.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    echoed = (response.temperature, response.max_output_tokens, response.tools, response.tool_choice)
    assert echoed == (0, 24, [], "auto")


def test_logprobs_cover_every_token_streamed_or_not(client):
    """include message.output_text.logprobs with top_logprobs: one entry per generated token on the
    answer's text, as chat's logprobs (the streamed deltas' entries add up to the same list)."""
    fields = dict(model=CUSTOMER_A_MODEL, input="Summarize Q3.", temperature=0, max_output_tokens=12, top_logprobs=2,
                  include=["message.output_text.logprobs"], extra_body={"ignore_eos": True})
    response = client.responses.create(**fields)
    part = response.output[0].content[0]
    assert len(part.logprobs) == response.usage.output_tokens == 12 and response.top_logprobs == 2
    assert all(len(entry.top_logprobs) == 2 and entry.logprob <= 0 for entry in part.logprobs)
    special = set(build_tokenizer().all_special_tokens)  # in logprobs (ignore_eos goes past <|eos|>), not in text
    assert b"".join(bytes(e.bytes) for e in part.logprobs if e.token not in special).decode() == part.text
    with client.responses.stream(**fields) as stream:
        events = list(stream)
    streamed = [entry for e in events if e.type == "response.output_text.delta" for entry in e.logprobs]
    done = next(e for e in events if e.type == "response.output_text.done")
    assert [e.token for e in streamed] == [e.token for e in done.logprobs] == [e.token for e in part.logprobs]
    plain = client.responses.create(**{**fields, "include": [], "top_logprobs": 0})
    assert plain.output[0].content[0].logprobs == [] and plain.output_text == response.output_text


def test_messages_with_instructions_are_chats_system_and_user_turns(client):
    response = client.responses.create(
        model=CUSTOMER_A_MODEL, instructions="You are a finance assistant.", temperature=0, max_output_tokens=16,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "What is a dividend?"}]}],
        metadata={"ticket": "42"}, extra_body={"ignore_eos": True})
    chat = client.chat.completions.create(
        model=CUSTOMER_A_MODEL, temperature=0, max_completion_tokens=16, extra_body={"ignore_eos": True},
        messages=[{"role": "system", "content": "You are a finance assistant."},
                  {"role": "user", "content": "What is a dividend?"}])
    assert response.output_text and response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.instructions == "You are a finance assistant." and response.metadata == {"ticket": "42"}


def test_an_adapters_deployment_name_is_served_with_its_adapter(client):
    def answer(model: str) -> str:
        return client.responses.create(model=model, input="The contract says", temperature=0, max_output_tokens=12,
                                       extra_body={"ignore_eos": True}).output_text

    legal = answer("customerA-legal")
    assert legal and legal != answer("tiny")  # the adapter changes the greedy answer of the base model


def test_streamed_events_come_in_order_and_add_up_to_the_answer(client):
    args = dict(model=CUSTOMER_A_MODEL, input="What is an index fund?", temperature=0, max_output_tokens=20,
                extra_body={"ignore_eos": True})
    whole = client.responses.create(**args)
    events = list(client.responses.create(**args, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{whole.status}"]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    deltas = [event for event in events if event.type == "response.output_text.delta"]
    text = "".join(event.delta for event in deltas)
    done = events[-1].response
    assert text == done.output_text == whole.output_text
    assert {event.item_id for event in deltas} == {done.output[0].id} and events[0].response.id == done.id
    assert done.usage.output_tokens == whole.usage.output_tokens and events[0].response.status == "in_progress"


def test_max_output_tokens_makes_an_incomplete_response(client):
    args = dict(model=CUSTOMER_A_MODEL, input="Tell me everything.", max_output_tokens=4,
                extra_body={"ignore_eos": True})
    response = client.responses.create(**args)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 4 and response.output[0].status == "incomplete"
    last = list(client.responses.create(**args, stream=True))[-1]
    assert last.type == "response.incomplete" and last.response.incomplete_details.reason == "max_output_tokens"


def test_a_json_schema_format_answers_json_matching_the_schema(client):
    response = client.responses.create(
        model=CUSTOMER_A_MODEL, input="Rate this bond.", max_output_tokens=200, temperature=0,
        text={"format": {"type": "json_schema", "name": "quote", "schema": QUOTE, "strict": True}})
    jsonschema.validate(json.loads(response.output_text), QUOTE)
    assert response.status == "completed" and response.text.format.name == "quote"
    args = dict(model=CUSTOMER_A_MODEL, input="Rate this bond.", max_output_tokens=200, temperature=0,
                text_format=Quote)  # the SDK's parse and stream send the pydantic model's strict schema
    parsed = client.responses.parse(**args).output_parsed
    assert isinstance(parsed, Quote)
    with client.responses.stream(**args) as stream:  # the SDK's helper accumulates the events
        assert stream.get_final_response().output_parsed == parsed


def test_a_required_function_tool_answers_a_function_call_whose_arguments_parse(client):
    # parallel_tool_calls false: one call (the random model would go on listing calls until the limit)
    args = dict(model=CUSTOMER_A_MODEL, input="Price the 10y bond.", tools=TOOLS, tool_choice="required",
                parallel_tool_calls=False, temperature=0, max_output_tokens=200)
    response = client.responses.create(**args)
    assert response.status == "completed" and [item.type for item in response.output] == ["function_call"]
    call = response.output[0]
    jsonschema.validate(json.loads(call.arguments), QUOTE)
    assert call.name == "quote" and call.call_id.startswith("call_") and call.id.startswith("fc_")
    assert response.output_text == "" and response.tool_choice == "required" and response.tools[0].name == "quote"
    events = list(client.responses.create(**args, stream=True))
    [done] = [event for event in events if event.type == "response.function_call_arguments.done"]
    assert done.arguments == call.arguments and events[-1].response.output[-1].arguments == call.arguments
    # the usual loop: the call and its result go back in, and the model answers
    result = {"type": "function_call_output", "call_id": call.call_id, "output": "98.5"}
    answer = client.responses.create(model=CUSTOMER_A_MODEL, input=[{"role": "user", "content": "Price the 10y bond."},
                                                                     *response.output, result],
                                     tools=TOOLS, tool_choice="none", max_output_tokens=4)
    assert answer.usage.input_tokens > response.usage.input_tokens and answer.output[0].type == "message"


@pytest.mark.parametrize(("fields", "param"), [
    ({"extra_body": {"frequency_penalty": 1}}, "frequency_penalty"),
    ({"input": [{"type": "input_image", "image_url": "https://x"}]}, "input[0].type"),
    ({"previous_response_id": "resp_123"}, "previous_response_id"),
    ({"text": {"format": {"type": "json_schema", "name": "bad name", "schema": QUOTE}}}, "text.format.name"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
])
def test_a_bad_or_unserved_parameter_is_a_400_naming_it(client, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(**{"model": CUSTOMER_A_MODEL, "input": "hi", **fields})
    assert caught.value.body["param"] == param and caught.value.body["type"] == "invalid_request_error"
    if param == "previous_response_id":
        assert "not stored" in caught.value.message


def test_the_nodes_limits_name_the_responses_parameters(client):
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=CUSTOMER_A_MODEL, input="hi", max_output_tokens=100_000)
    assert caught.value.code == "context_length_exceeded" and caught.value.body["param"] == "max_output_tokens"
    with pytest.raises(openai.BadRequestError) as caught:
        client.responses.create(model=CUSTOMER_A_MODEL, input="word " * 400)
    assert caught.value.code == "context_length_exceeded" and caught.value.body["param"] == "input"


def test_another_tenants_deployment_is_not_found(router, world):
    client_b = OpenAI(base_url=router.base_url, api_key=world.b.token, max_retries=0)
    for stream in (False, True):
        with pytest.raises(openai.NotFoundError) as caught:
            client_b.responses.create(model=CUSTOMER_A_MODEL, input="hi", stream=stream)
        assert caught.value.code == "model_not_found" and caught.value.body["param"] == "model"


def test_responses_are_not_stored_so_none_can_be_retrieved(router, world, client):
    with pytest.raises(openai.NotFoundError) as caught:
        client.responses.retrieve("resp_x")
    assert "not stored" in caught.value.message and caught.value.body["param"] == "response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.delete("resp_x")
    assert http("GET", f"{router.base_url}/responses/resp_x")[0] == 401  # no key: who asks comes first


def test_a_failure_mid_stream_is_an_error_event(held_node, world):
    """The node holds the stream after two tokens; revoking the key ends it (as for chat)."""
    router, node = held_node()
    key_id, secret = world.new_key(world.a)
    client = OpenAI(base_url=router.base_url, api_key=secret, max_retries=0, timeout=30)
    events = iter(client.responses.create(model="tiny", input="go on", stream=True))
    seen = [next(events) for _ in range(6)]
    assert [event.type for event in seen][-2:] == ["response.output_text.delta"] * 2
    world.admin.RevokeApiKey(rpb.RevokeApiKeyRequest(key_id=key_id))
    error = next(events)
    assert error.type == "error" and error.code == "invalid_api_key" and error.sequence_number == 6
    assert "was revoked while this request" in error.message and next(events, None) is None
    wait_until(lambda: router.run(lambda: node.cancelled) == 1, what="the node call is cancelled")


def test_the_wire_names_each_event_and_sends_no_done_sentinel(router, world):
    body = json.dumps({"model": CUSTOMER_A_MODEL, "input": "hi", "max_output_tokens": 3, "stream": True}).encode()
    request = urllib.request.Request(f"{router.base_url}/responses", data=body, method="POST",
                                     headers={"authorization": f"Bearer {world.a.token}"})
    with urllib.request.urlopen(request, timeout=60) as reply:
        frames = reply.read().decode().split("\n\n")
    frames = [frame for frame in frames if frame]
    for frame in frames:
        event, data = frame.split("\n")
        assert event == f"event: {json.loads(data.removeprefix('data: '))['type']}"
    assert "[DONE]" not in frames[-1]
