"""Tools and tool_choice -> the node's structured output and the template's tools, and the
constrained text -> OpenAI's tool_calls, as pure functions (openai_tools.py, openai_schema.py)."""

from __future__ import annotations

import json

import jsonschema
import pytest

from services.common.errors import InvalidArgument
from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.router import openai_schema as schema
from services.router.openai_tools import ToolUse
from services.router.proxy import Completion
from services.router.resolution import Target

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
                   "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}  # no parameters: it takes none
#: What pydantic (and so the SDK's pydantic_function_tool) writes for a nested model: $defs at its root.
BOOKING = {"type": "function", "function": {"name": "book", "parameters": {
    "type": "object", "properties": {"guest": {"$ref": "#/$defs/Guest"}}, "required": ["guest"],
    "additionalProperties": False, "$defs": {"Guest": {
        "type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"],
        "additionalProperties": False}}}}}
HI = [{"role": "user", "content": "Weather in Paris?"}]


def chat(**fields):
    return schema.chat_call({"model": "m", "messages": HI, **fields})


def named(name: str) -> dict:
    return {"type": "function", "function": {"name": name}}


def test_a_named_function_generates_its_arguments_alone():
    call, options = chat(tools=[WEATHER, CLOCK], tool_choice=named("get_weather"))
    constraint = json.loads(call.sampling.structured_output.json_schema)
    assert constraint == WEATHER["function"]["parameters"]
    assert json.loads(call.messages.tools_json) == [  # both tools shown to the template, strict dropped
        {"type": "function", "function": {k: v for k, v in WEATHER["function"].items() if k != "strict"}},
        {"type": "function", "function": {"name": "get_time", "parameters": {
            "type": "object", "properties": {}, "additionalProperties": False}}}]
    assert options.tool_use.named == "get_weather" and options.structured_output_param == "tools"


@pytest.mark.parametrize("parallel", [True, False])
def test_required_generates_an_array_of_calls_of_any_tool(parallel):
    call, options = chat(tools=[WEATHER, CLOCK, BOOKING], tool_choice="required", parallel_tool_calls=parallel)
    constraint = json.loads(call.sampling.structured_output.json_schema)
    good = [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", "arguments": {}},
            {"name": "book", "arguments": {"guest": {"name": "Ada"}}}]
    for single in good:
        jsonschema.validate([single], constraint)
    if parallel:
        jsonschema.validate(good, constraint)
    else:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(good[:2], constraint)
    for bad in ([], [{"name": "get_weather", "arguments": {}}], [{"name": "get_time", "arguments": {"x": 1}}],
                [{"name": "book", "arguments": {"guest": {}}}], [{"name": "other", "arguments": {}}]):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, constraint)
    assert options.tool_use.named is None


def test_tool_choice_none_is_plain_generation_without_the_tools():
    call, options = chat(tools=[WEATHER], tool_choice="none")
    assert not call.sampling.HasField("structured_output") and not call.messages.tools_json
    assert options.tool_use is None
    call, _ = chat(tools=[WEATHER], tool_choice="none", response_format={"type": "json_object"})
    assert call.sampling.structured_output.json_object


def test_a_history_of_calls_and_results_reaches_the_node():
    messages = [*HI, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": [{"type": "text", "text": "sunny"}]}]
    call, _ = schema.chat_call({"model": "m", "messages": messages})
    assistant, tool = call.messages.messages[1:]
    assert list(assistant.tool_calls) == [gen.ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris"}')]
    assert (assistant.content, tool.role, tool.tool_call_id, tool.content) == ("", "tool", "call_1", "sunny")


@pytest.mark.parametrize(("fields", "param"), [
    ({"tools": [WEATHER], "tool_choice": "any"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": named("get_time")}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [], "tool_choice": "required"}, "tools"),
    ({"tools": [WEATHER] * 129, "tool_choice": "required"}, "tools"),
    ({"tools": [WEATHER, WEATHER], "tool_choice": "required"}, "tools[1].function.name"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}], "tool_choice": "required"}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}], "tool_choice": "required"},
     "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
      "tool_choice": "required"}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "{}"}}], "tool_choice": "required"},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "maximum": float(
        "nan")}}}], "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "description": "x" * (
        65 * 1024)}}}], "tool_choice": "required"}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "params": {}}}], "tool_choice": "required"},
     "tools[0].function.params"),
    ({"tools": [WEATHER], "tool_choice": "required", "parallel_tool_calls": "no"}, "parallel_tool_calls"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format"),
    ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format"),  # "auto"
    ({"tools": [WEATHER], "parallel_tool_calls": 1}, "parallel_tool_calls"),
    ({"functions": [{"name": "f"}], "function_call": "auto"}, "functions"),
])
def test_tool_requests_that_cannot_be_honoured_are_400s_naming_the_param(fields, param):
    with pytest.raises(InvalidArgument) as caught:
        chat(**fields)
    assert caught.value.metadata["field"] == param and f"'{param}'" in caught.value.message


@pytest.mark.parametrize("fields", [{}, {"tool_choice": "auto"}, {"parallel_tool_calls": False}])
def test_auto_generates_freely_with_the_tools_shown(fields):
    """OpenAI's default with tools: no grammar, the tools in the template, the text read for calls."""
    call, options = chat(tools=[WEATHER, CLOCK], **fields)
    assert not call.sampling.HasField("structured_output")
    assert [tool["function"]["name"] for tool in json.loads(call.messages.tools_json)] == ["get_weather", "get_time"]
    assert options.tool_use.names == ("get_weather", "get_time") and not options.tool_use.schema
    assert options.tool_use.parallel == fields.get("parallel_tool_calls", True)


HERMES_CALLS = ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')


def test_auto_reads_the_calls_in_the_nodes_format():
    auto = ToolUse("[]", names=("get_weather", "get_time"))
    message, finish = auto.answer(HERMES_CALLS, "stop", "hermes")
    assert finish == "tool_calls" and message["content"] == "Let me look."
    assert [c["function"] for c in message["tool_calls"]] == [
        {"name": "get_weather", "arguments": '{"city":"Paris"}'}, {"name": "get_time", "arguments": "{}"}]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in message["tool_calls"])
    one, _ = ToolUse("[]", names=("get_weather", "get_time"), parallel=False).answer(HERMES_CALLS, "stop", "hermes")
    assert [c["function"]["name"] for c in one["tool_calls"]] == ["get_weather"]


@pytest.mark.parametrize(("fmt", "text", "finish"), [
    ("", HERMES_CALLS, "stop"),  # a model without a known format: text only
    ("hermes", HERMES_CALLS[:60], "length"),  # cut in its first call
    ("hermes", HERMES_CALLS.replace("get_weather", "get_rain"), "stop"),  # a function not among the tools
    ("hermes", "Just text.", "stop"),
    ("llama3_json", HERMES_CALLS, "stop"),  # the node's format is not the one the text is in
])
def test_auto_without_calls_answers_the_text_as_it_is(fmt, text, finish):
    message, reason = ToolUse("[]", names=("get_weather", "get_time")).answer(text, finish, fmt)
    assert (message, reason) == ({"content": text}, finish)


def test_auto_streamed_gives_what_unstreamed_gives():
    auto = ToolUse("[]", names=("get_weather", "get_time"))
    calls = auto.stream("hermes")
    deltas = [delta for char in HERMES_CALLS for delta in calls.feed(char)]
    last, finish = calls.finish("stop")
    deltas += last
    assert finish == "tool_calls" and "".join(d.get("content", "") for d in deltas) == "Let me look."
    streamed = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    assert [(c["index"], c["function"]["name"]) for c in streamed] == [(0, "get_weather"), (1, "get_time")]
    assert deltas[-1]["tool_calls"][0]["function"]["arguments"] == "{}"


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "tool", "content": "x"}, "messages[1].tool_call_id"),
    ({"role": "tool", "content": "x", "tool_call_id": "call_9"}, "messages[1].tool_call_id"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f"}}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f",
                                                                                       "arguments": "[1]"}}]},
     "messages[1].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
     "messages[1].tool_calls[0].id"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "type": "custom", "function": {}}]},
     "messages[1].tool_calls[0].type"),
    ({"role": "assistant", "tool_calls": {"id": "c"}}, "messages[1].tool_calls"),
    ({"role": "user", "content": "x", "tool_call_id": "c"}, "messages[1].tool_call_id"),
])
def test_malformed_tool_turns_are_400s_naming_the_part(message, param):
    with pytest.raises(InvalidArgument) as caught:
        schema.chat_call({"model": "m", "messages": [*HI, message]})
    assert caught.value.metadata["field"] == param


def test_the_text_becomes_tool_calls():
    required = ToolUse("[]", "{}")
    message, finish = required.answer('[{"name":"get_weather","arguments":{"city":"Paris"}},'
                                      '{"name":"get_time","arguments":{}}]', "stop")
    assert finish == "tool_calls" and message["content"] is None
    assert [(c["type"], c["function"]) for c in message["tool_calls"]] == [
        ("function", {"name": "get_weather", "arguments": '{"city":"Paris"}'}),
        ("function", {"name": "get_time", "arguments": "{}"})]
    ids = [c["id"] for c in message["tool_calls"]]
    assert len(set(ids)) == 2 and all(i.startswith("call_") and len(i) == 29 for i in ids)
    message, finish = ToolUse("[]", "{}", named="get_weather").answer('{"city":"Paris"}', "stop")
    assert finish == "stop"  # as OpenAI answers a named tool_choice
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Paris"}'}


@pytest.mark.parametrize(("text", "finish"), [('[{"name":"get_time","argu', "length"),
                                              ('[{"name":"get_time","argu', "stop"),  # a stop string cut it
                                              ('[{"name":"x","arguments":{"n":1e999}}]', "stop")])
def test_calls_cut_short_come_back_as_text(text, finish):
    message, reason = ToolUse("[]", "{}").answer(text, finish)
    assert (message, reason) == ({"content": text}, finish)


def test_chat_completion_with_tool_calls_is_openai_shaped():
    _, options = chat(tools=[WEATHER], tool_choice="required")
    body = schema.chat_completion([completion('[{"name":"get_weather","arguments":{"city":"Oslo"}}]')], "r1", 0,
                                  options)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["role"] == "assistant"
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": '{"city":"Oslo"}'}


def completion(text: str) -> Completion:
    return Completion("r1", Target("m", "tiny", "t"), text, [], [], gen.FINISH_REASON_STOP, "",
                      gen.Usage(prompt_tokens=1, completion_tokens=1, total_tokens=2))
