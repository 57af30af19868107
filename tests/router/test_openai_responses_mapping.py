"""The Responses API as pure functions: a Responses body -> the chat call it stands for, 400s
naming the Responses parameter, and the response object and stream events checked against the
`openai` SDK's own (strict) pydantic types, so field names and shapes are OpenAI's."""

from __future__ import annotations

import json

import pydantic
import pytest
from openai.types.responses import Response, ResponseStreamEvent

from services.common.errors import InvalidArgument
from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.router import openai_schema as schema
from services.router.openai_responses import responses_call
from services.router.openai_responses_output import ResponseOutput, response_object
from services.router.openai_responses_stream import ResponseFrames
from services.router.proxy import Completion
from services.router.resolution import Target

EVENT = pydantic.TypeAdapter(ResponseStreamEvent)
QUOTE = {"type": "object", "properties": {"years": {"type": "integer"}}, "required": ["years"]}


def chat_of(body: dict):
    call, options = responses_call({"model": "m", **body})
    return call, options


def turns(call) -> list[tuple]:
    return [(m.role, m.content, [(c.id, c.name, c.arguments) for c in m.tool_calls], m.tool_call_id)
            for m in call.messages.messages]


def test_a_string_input_with_instructions_is_the_chat_request_with_a_system_turn():
    ours, options = chat_of({"input": "Hi", "instructions": "Be brief.", "max_output_tokens": 7, "temperature": 0})
    chat, _ = schema.chat_call({"model": "m", "max_completion_tokens": 7, "temperature": 0,
                                "messages": [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Hi"}]})
    assert (ours.messages, ours.sampling) == (chat.messages, chat.sampling)
    assert options.max_tokens_param == "max_output_tokens" and options.n == 1 and options.tool_use is None


def test_items_become_turns_calls_joining_the_assistant_turn_before_them():
    """A conversation replayed as the SDK's users write it: their messages, then an earlier
    response's output items (ids and statuses included), then the call's result."""
    call, _ = chat_of({"input": [
        {"role": "developer", "content": [{"type": "input_text", "text": "Use "},
                                          {"type": "input_text", "text": "tools"}]},
        {"type": "message", "role": "user", "content": "Price it."},
        {"type": "message", "id": "msg_1", "role": "assistant", "status": "completed",
         "content": [{"type": "output_text", "text": "Checking.", "annotations": [], "logprobs": []}]},
        {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": "quote", "arguments": '{"years": 2}',
         "status": "completed"},
        {"type": "function_call", "call_id": "call_2", "name": "quote", "arguments": '{"years": 5}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "98.5"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "97"}]}],
        "tools": [{"type": "function", "name": "quote", "parameters": QUOTE, "strict": True}]})
    assert turns(call) == [("system", "Use tools", [], ""), ("user", "Price it.", [], ""),
                           ("assistant", "Checking.", [("call_1", "quote", '{"years": 2}'),
                                                       ("call_2", "quote", '{"years": 5}')], ""),
                           ("tool", "98.5", [], "call_1"), ("tool", "97", [], "call_2")]


def test_flat_tools_and_tool_choice_are_chats_nested_ones():
    flat = {"tools": [{"type": "function", "name": "quote", "description": "A price.", "parameters": QUOTE}],
            "tool_choice": {"type": "function", "name": "quote"}, "parallel_tool_calls": False}
    ours, options = chat_of({"input": "x", **flat})
    chat, chat_options = schema.chat_call({
        "model": "m", "messages": [{"role": "user", "content": "x"}], "parallel_tool_calls": False,
        "tools": [{"type": "function", "function": {"name": "quote", "description": "A price.", "parameters": QUOTE}}],
        "tool_choice": {"type": "function", "function": {"name": "quote"}}})
    assert ours.sampling == chat.sampling and ours.messages.tools_json == chat.messages.tools_json
    assert options.tool_use == chat_options.tool_use and options.structured_output_param == "tools"
    for empty in ({"tools": []}, {"tools": [], "tool_choice": "auto"}):  # what some clients send for none
        assert chat_of({"input": "x", **empty})[1].tool_use is None


def test_text_format_is_chats_response_format():
    form = {"type": "json_schema", "name": "quote", "schema": QUOTE, "strict": True}
    ours, options = chat_of({"input": "x", "text": {"format": form}})
    assert ours.sampling.structured_output.json_schema == json.dumps(QUOTE, separators=(",", ":"))
    assert options.structured_output_param == "text.format" and options.settings["text"] == {"format": form}
    json_mode, _ = chat_of({"input": "x", "text": {"format": {"type": "json_object"}}})
    assert json_mode.sampling.structured_output.json_object
    assert not chat_of({"input": "x", "text": {"format": {"type": "text"}}})[0].sampling.HasField("structured_output")


def test_settings_not_served_but_harmless_are_accepted():
    _, options = chat_of({"input": "x", "store": True, "metadata": {"k": "v"}, "user": "u", "include": [],
                          "truncation": "disabled", "background": False, "top_logprobs": 0, "reasoning": None,
                          "previous_response_id": None, "stream": True,
                          "stream_options": {"include_obfuscation": False}})
    assert options.stream and options.settings["metadata"] == {"k": "v"} and options.settings["user"] == "u"


@pytest.mark.parametrize(("body", "param"), [
    ({"input": "x", "temperture": 1}, "temperture"),
    ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
    ({"input": "x", "conversation": "conv_1"}, "conversation"),
    ({"input": "x", "background": True}, "background"),
    ({"input": "x", "include": ["file_search_call.results"]}, "include"),
    ({"input": "x", "include": "message.output_text.logprobs"}, "include"),
    ({"input": "x", "top_logprobs": 21}, "top_logprobs"),
    ({"input": "x", "top_logprobs": True}, "top_logprobs"),
    ({"input": "x", "truncation": "auto"}, "truncation"),
    ({"input": "x", "reasoning": {"effort": "low"}}, "reasoning"),
    ({"input": "x", "max_output_tokens": 0}, "max_output_tokens"),
    ({"input": "x", "instructions": ["a"]}, "instructions"),
    ({"input": []}, "input"),
    ({"input": 5}, "input"),
    ({"input": [{"type": "input_image", "image_url": "x"}]}, "input[0].type"),
    ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0].type"),
    ({"input": [{"content": "x"}]}, "input[0].type"),
    ({"input": [{"role": "tool", "content": "x"}]}, "input[0].role"),
    ({"input": [{"role": "user", "content": "x", "name": "bob"}]}, "input[0].name"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_text"}]}]}, "input[0].content[0].text"),
    ({"input": ["x", {"type": "function_call", "call_id": "c", "name": "f", "arguments": "[]"}]}, "input[0]"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[]"}]}, "input[0].arguments"),
    ({"input": [{"type": "function_call", "call_id": "", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call", "call_id": "c", "arguments": "{}"}]}, "input[0].name"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}, "input[0].call_id"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{}"},
                {"type": "function_call_output", "call_id": "c", "output": 1}]}, "input[1].output"),
    ({"input": "x", "instructions": "y", "text": {"format": {"type": "json_schema", "name": "a b"}}},
     "text.format.name"),
    ({"input": "x", "text": {"format": {"type": "xml"}}}, "text.format.type"),
    ({"input": "x", "text": {"format": {"type": "json_schema", "name": "q", "shema": {}}}}, "text.format.shema"),
    ({"input": "x", "text": {"verbosity": "low"}}, "text.verbosity"),
    ({"input": "x", "text": "json"}, "text"),
    ({"input": "x", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "x", "tools": [{"type": "function", "function": {"name": "f"}}]}, "tools[0].function"),
    ({"input": "x", "tools": [{"type": "function", "name": "f", "parameters": {"type": "array"}}]},
     "tools[0].parameters"),
    ({"input": "x", "tools": [{"type": "function", "name": "f"}, {"type": "function", "name": "f"}]}, "tools[1].name"),
    ({"input": "x", "tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function",
                                                                                  "function": {"name": "f"}}},
     "tool_choice"),
    ({"input": "x", "tool_choice": "required"}, "tool_choice"),
    ({"input": "x", "tools": [{"type": "function", "name": "f"}], "text": {"format": {"type": "json_object"}}},
     "text.format"),
])
def test_a_malformed_or_unserved_request_is_a_400_naming_the_responses_parameter(body, param):
    with pytest.raises(InvalidArgument) as caught:
        chat_of(body)
    assert caught.value.metadata["field"] == param and caught.value.message.startswith(f"'{param}': ")
    assert not any(chat in caught.value.message for chat in ("messages[", "response_format", "max_completion_tokens"))


def completion(text: str, finish: int = gen.FINISH_REASON_STOP) -> Completion:
    return Completion(request_id="r", target=Target(model="m", base_model="b", tenant_id="t"), text=text, token_ids=[],
                      logprobs=[], finish_reason=finish, matched_stop="",
                      usage=gen.Usage(prompt_tokens=5, completion_tokens=3, total_tokens=8, cached_prompt_tokens=2))


def test_the_response_object_is_openais_and_the_sdks_output_text_reads_it():
    _, options = chat_of({"input": "x", "metadata": {"k": "v"}, "max_output_tokens": 3})
    body = response_object([completion("Hello there")], "abc", 1700000000, options)
    response = Response.model_validate(body)  # strict: every required field present and typed
    assert response.id == "resp_abc" and response.status == "completed" and response.output_text == "Hello there"
    assert response.output[0].id.startswith("msg_") and response.output[0].content[0].annotations == []
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == (5, 3, 8)
    assert response.usage.input_tokens_details.cached_tokens == 2 and response.metadata == {"k": "v"}
    cut = Response.model_validate(response_object([completion("Hel", gen.FINISH_REASON_LENGTH)], "abc", 1, options))
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.output[0].status == "incomplete"


def test_calls_are_function_call_items_after_any_text():
    tools = [{"type": "function", "name": "quote", "parameters": QUOTE}]
    _, options = chat_of({"input": "x", "tools": tools, "tool_choice": "required"})
    body = response_object([completion('[{"name": "quote", "arguments": {"years": 3}}]')], "abc", 1, options)
    response = Response.model_validate(body)
    assert [item.type for item in response.output] == ["function_call"] and response.output_text == ""
    call = response.output[0]
    assert call.id.startswith("fc_") and call.call_id.startswith("call_") and json.loads(call.arguments) == {"years": 3}
    assert response.tools[0].name == "quote" and response.tool_choice == "required"


def test_streamed_events_build_the_same_output_and_are_the_sdks_events():
    tools = [{"type": "function", "name": "quote", "parameters": QUOTE}]
    _, options = chat_of({"input": "x", "tools": tools, "tool_choice": "required"})
    frames, output = ResponseFrames(), ResponseOutput(options.tool_use)
    events = output.feed('[{"name": "quote", "arguments": ') + output.feed('{"years": 3}}]') + output.finish("stop")
    sent = [EVENT.validate_json(frames.event(e).split("data: ", 1)[1]) for e in events]
    assert [e.type for e in sent] == ["response.output_item.added", "response.function_call_arguments.delta",
                                      "response.function_call_arguments.done", "response.output_item.done"]
    assert [e.sequence_number for e in sent] == [0, 1, 2, 3] and sent[-1].item.arguments == '{"years":3}'
    text = ResponseOutput(None)
    events = text.feed("Hel") + text.feed("lo") + text.finish("length")
    assert [e["type"].removeprefix("response.") for e in events] == [
        "output_item.added", "content_part.added", "output_text.delta", "output_text.delta", "output_text.done",
        "content_part.done", "output_item.done"]
    assert "".join(e.get("delta", "") for e in events) == events[-1]["item"]["content"][0]["text"] == "Hello"
    assert text.status == "incomplete" and events[-1]["item"]["status"] == "incomplete"
    for event in events:
        EVENT.validate_json(frames.event(event).split("data: ", 1)[1])
    error = frames.error({"error": {"message": "node lost", "type": "server_error", "param": None, "code": "x"}})
    assert error.startswith("event: error\n") and EVENT.validate_json(error.split("data: ", 1)[1]).sequence_number == 11


def test_an_empty_answer_is_one_empty_message():
    output = ResponseOutput(None)
    events = output.finish("stop")
    assert [item["content"][0]["text"] for item in output.items] == [""] and len(events) == 5
