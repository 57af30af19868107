"""Function calling through the official `openai` SDK, the router and real nodes (the tiny
model, whose free text is noise): tool_choice named, "required" and "auto", parallel_tool_calls,
streaming (the SDK's own accumulation), n, logprobs, the SDK's `parse` with a pydantic tool,
and a multi-turn history of calls and results. Whatever the model would say, the calls name
the tools and their arguments match the parameters: the grammar guarantees it."""

from __future__ import annotations

import json
from typing import Literal

import jsonschema
import openai
import pytest
from openai import OpenAI
from pydantic import BaseModel, Field

from tests.router.conftest import CUSTOMER_A_MODEL
from tests.router.test_openai_sdk_conformance import refused

MESSAGES = [{"role": "system", "content": "You call tools."}, {"role": "user", "content": "Price this bond."}]
#: Bounded parameters (enums, capped strings and integers): the tiny model's noise ends.
QUOTE = {"type": "object", "properties": {"bond": {"enum": ["2y", "10y", "30y"]},
                                          "years": {"type": "integer", "minimum": 1, "maximum": 30}},
         "required": ["bond", "years"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "quote", "description": "A bond's price.", "parameters": QUOTE,
                                           "strict": True}},
         {"type": "function", "function": {"name": "weather", "parameters": WEATHER, "strict": True}}]
PARAMETERS = {"quote": QUOTE, "weather": WEATHER}
NAMED = {"type": "function", "function": {"name": "quote"}}


class Quote(BaseModel):
    """What a user hands to pydantic_function_tool: the SDK turns it into a strict function."""

    bond: Literal["2y", "10y", "30y"]
    years: int = Field(ge=1, le=30)


@pytest.fixture
def client(router, world) -> OpenAI:
    return OpenAI(base_url=router.base_url, api_key=world.a.token, max_retries=0)


def create(client: OpenAI, **fields):
    return client.chat.completions.create(model=CUSTOMER_A_MODEL, **{
        "messages": MESSAGES, "tools": TOOLS, "max_tokens": 200, "temperature": 0, **fields})


def calls_of(message) -> list[tuple[str, dict]]:
    """(name, arguments) of each call, the arguments checked against the function's parameters."""
    calls = [(call.function.name, json.loads(call.function.arguments)) for call in message.tool_calls]
    for name, arguments in calls:
        jsonschema.validate(arguments, PARAMETERS[name])
    assert all(call.type == "function" and call.id.startswith("call_") for call in message.tool_calls)
    return calls


def test_a_named_function_is_called_once_with_valid_arguments(client):
    choice = create(client, tool_choice=NAMED).choices[0]
    assert [name for name, _ in calls_of(choice.message)] == ["quote"]
    assert choice.message.content is None and choice.finish_reason == "stop"  # OpenAI's finish for a named choice


@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_the_tools(client, parallel):
    completion = create(client, tool_choice="required", parallel_tool_calls=parallel, temperature=1.0, seed=5, n=2)
    for choice in completion.choices:  # each choice makes its own calls
        calls = calls_of(choice.message)
        assert calls and {name for name, _ in calls} <= {"quote", "weather"}
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        if not parallel:
            assert len(calls) == 1


def test_streamed_calls_are_the_same_calls(client):
    """Chunks as the SDK's stream helper accumulates them, and as a client adds them up by hand."""
    whole = create(client, tool_choice="required").choices[0]
    with client.chat.completions.stream(model=CUSTOMER_A_MODEL, messages=MESSAGES, tools=TOOLS, max_tokens=200,
                                        temperature=0, tool_choice="required") as stream:
        streamed = stream.get_final_completion().choices[0]
    assert calls_of(streamed.message) == calls_of(whole.message)
    assert (streamed.finish_reason, streamed.message.content) == ("tool_calls", None)
    chunks = [c for c in create(client, tool_choice=NAMED, stream=True) if c.choices]
    by_hand: dict[int, dict] = {}
    for chunk in chunks:
        assert chunk.choices[0].delta.content in (None, "")  # the JSON text is never streamed as content
        for call in chunk.choices[0].delta.tool_calls or []:
            entry = by_hand.setdefault(call.index, {"name": "", "arguments": ""})
            entry["name"] += call.function.name or ""
            entry["arguments"] += call.function.arguments or ""
    named = create(client, tool_choice=NAMED).choices[0].message.tool_calls
    assert [(e["name"], e["arguments"]) for e in by_hand.values()] == [
        (c.function.name, c.function.arguments) for c in named]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_cut_short_the_calls_come_back_as_text(client):
    choice = create(client, tool_choice=NAMED, max_tokens=3).choices[0]
    assert choice.finish_reason == "length" and not choice.message.tool_calls
    assert choice.message.content.startswith("{")


def test_logprobs_are_those_of_the_calls_text(client):
    choice = create(client, tool_choice=NAMED, logprobs=True).choices[0]
    text = "".join(entry.token for entry in choice.logprobs.content)
    assert text == choice.message.tool_calls[0].function.arguments


def test_the_sdks_parse_with_a_pydantic_tool(client):
    completion = client.chat.completions.parse(
        model=CUSTOMER_A_MODEL, messages=MESSAGES, max_tokens=200, temperature=0,
        tools=[openai.pydantic_function_tool(Quote)], tool_choice={"type": "function", "function": {"name": "Quote"}})
    parsed = completion.choices[0].message.tool_calls[0].function.parsed_arguments
    assert isinstance(parsed, Quote) and 1 <= parsed.years <= 30


def test_a_history_of_calls_and_results_is_accepted_and_rendered(client):
    """The usual loop: the call the model made goes back in, followed by the tool's result."""
    first = create(client, tool_choice=NAMED)
    call = first.choices[0].message.tool_calls[0]
    result = {"role": "tool", "tool_call_id": call.id, "content": "The 10y bond trades at 98.5."}
    answer = create(client, tool_choice="none", messages=[*MESSAGES, first.choices[0].message, result], max_tokens=2)
    # The tool's result reaches the node's template (the tiny one renders the tool turn, not the call).
    assert answer.usage.prompt_tokens > first.usage.prompt_tokens + 10
    again = create(client, tool_choice=NAMED, messages=[*MESSAGES, first.choices[0].message.model_dump(), result])
    calls_of(again.choices[0].message)


def test_auto_on_a_model_without_a_tool_format_answers_text(client):
    """OpenAI's default with tools. The tiny model's template shows no tools (its node knows no
    call format): its answer is its text, as the model wrote it (test_openai_tool_auto.py has a
    model that calls)."""
    for fields in ({}, {"tool_choice": "auto", "n": 2, "parallel_tool_calls": False}):
        completion = create(client, max_tokens=8, **fields)
        plain = create(client, max_tokens=8, tool_choice="none", n=fields.get("n", 1))
        for choice, text in zip(completion.choices, plain.choices, strict=True):
            assert not choice.message.tool_calls and choice.message.content == text.message.content
            assert choice.finish_reason == text.finish_reason
    chunks = [c for c in create(client, max_tokens=8, stream=True) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content


@pytest.mark.parametrize(("fields", "param"), [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required", "tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"x": {"type": "strin"}}}}}]}, "tools"),  # only the node compiles schemas
])
def test_tool_requests_that_cannot_be_honoured_are_400s_naming_the_param(client, fields, param):
    body = refused(lambda: create(client, **fields))
    assert body["param"] == param
