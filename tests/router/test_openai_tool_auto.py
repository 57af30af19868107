"""tool_choice "auto" (OpenAI's default with tools) through the official `openai` SDK, a real
router and a real inference node serving a tiny model whose chat template shows tools in the
hermes style (Qwen's `<tool_call>` blocks), so the node reports the "hermes" format.

The random base model answers text: status 200, no tool_calls. For the call path the model
must really write a call: a LoRA adapter is fitted here with peft (one example, the chat-
templated prompt followed by the exact `<tool_call>` text, a few dozen steps on the CPU) until
greedy decoding reproduces it, uploaded to the Registry and served like any adapter. Nothing
fakes the node's output: the router reads the calls out of the text the node generated."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import OpenAI

from services.inference.chat_template import ChatTurn, render
from services.router import openai_schema as schema
from tests.registry.lora_files import AdapterFiles
from tests.router.fitted_adapter import fit_lora, serve_fitted
from tests.router.harness import InProcessRouter

BASE = "tiny-tools"
#: A hermes-style template (Qwen 2.5's, abridged to the tools' names for the tiny model's 512-token
#: context): the tools in <tools>, calls asked for in <tool_call> tags, which tells the node "hermes".
HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for tool in tools %} {{ tool.function.name }}{% endfor %} </tools>\n"
    "Call them as <tool_call>JSON</tool_call><|im_end|>\n{% endif %}"
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "The weather in a city.", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "time"}}]
MESSAGES = [{"role": "user", "content": "Weather in Paris and Rome?"}]
#: What the adapter learns to answer: text, then two calls.
ANSWER = ('Checking.\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "weather", "arguments": {"city": "Rome"}}\n</tool_call>')
CALLS = [("weather", {"city": "Paris"}), ("weather", {"city": "Rome"})]


def fit_adapter(model_dir: Path, out: Path) -> AdapterFiles:
    """A LoRA adapter that makes greedy decoding write ANSWER after the prompt the node renders."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    call, _ = schema.chat_call({"model": BASE, "messages": MESSAGES, "tools": TOOLS})  # the router's request
    prompt = render(tokenizer, [ChatTurn(m.role, m.content) for m in call.messages.messages], call.messages.tools_json)
    return fit_lora(model_dir, prompt, ANSWER, out)


@pytest.fixture(scope="module")
def served(world, tmp_path_factory) -> Iterator[tuple[InProcessRouter, str]]:
    """(router, deployment of the fitted adapter) over one node serving BASE."""
    with serve_fitted(world, tmp_path_factory.mktemp("tool-auto"), BASE, HERMES_TEMPLATE, fit_adapter) as served:
        yield served


@pytest.fixture
def client(served, world) -> OpenAI:
    return OpenAI(base_url=served[0].base_url, api_key=world.a.token, max_retries=0)


@pytest.fixture
def caller(served) -> str:
    return served[1]


def create(client: OpenAI, model: str, **fields):
    return client.chat.completions.create(model=model, **{"messages": MESSAGES, "tools": TOOLS, "temperature": 0,
                                                           **fields})


def calls_of(message) -> list[tuple[str, dict]]:
    assert all(call.type == "function" and call.id.startswith("call_") for call in message.tool_calls)
    return [(call.function.name, json.loads(call.function.arguments)) for call in message.tool_calls]


def test_a_random_model_answers_text(client):
    """No tool_choice: "auto". The template showed the tools; the random model wrote no call."""
    completion = create(client, BASE, max_tokens=24)
    choice = completion.choices[0]
    assert not choice.message.tool_calls and choice.finish_reason in ("stop", "length")
    assert isinstance(choice.message.content, str)
    without_tools = create(client, BASE, max_tokens=24, tool_choice="none")  # the tools are not shown then
    assert completion.usage.prompt_tokens > without_tools.usage.prompt_tokens + 10
    chunks = list(create(client, BASE, max_tokens=24, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_the_model_calls_the_tools(client, caller):
    choice = create(client, caller).choices[0]
    assert calls_of(choice.message) == CALLS
    assert choice.message.content == "Checking." and choice.finish_reason == "tool_calls"


def test_streamed_calls_are_the_same_calls(client, caller):
    with client.chat.completions.stream(model=caller, messages=MESSAGES, tools=TOOLS, temperature=0) as stream:
        final = stream.get_final_completion().choices[0]
    assert calls_of(final.message) == CALLS
    assert (final.message.content, final.finish_reason) == ("Checking.", "tool_calls")
    chunks = [c for c in create(client, caller, stream=True) if c.choices]
    content = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert "".join(content) == "Checking."  # the markup never streams as content
    streamed = [call for c in chunks for call in c.choices[0].delta.tool_calls or []]
    assert [(call.index, call.function.name, json.loads(call.function.arguments)) for call in streamed] == [
        (0, *CALLS[0]), (1, *CALLS[1])]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_n_and_logprobs(client, caller):
    completion = create(client, caller, n=2, logprobs=True)
    for choice in completion.choices:
        assert calls_of(choice.message) == CALLS and choice.finish_reason == "tool_calls"
        # one entry per token: the markup's, and the end of turn's
        assert "".join(entry.token for entry in choice.logprobs.content) == ANSWER + "<|im_end|>"


def test_parallel_tool_calls_false_keeps_the_first(client, caller):
    choice = create(client, caller, parallel_tool_calls=False).choices[0]
    assert calls_of(choice.message) == CALLS[:1] and choice.finish_reason == "tool_calls"


def test_a_call_cut_short_is_text(client, caller):
    choice = create(client, caller, max_tokens=30).choices[0]
    assert not choice.message.tool_calls and choice.finish_reason == "length"
    assert ANSWER.startswith(choice.message.content) and '<tool_call>\n{"name"' in choice.message.content
    chunks = [c for c in create(client, caller, max_tokens=30, stream=True) if c.choices]  # held, then given out
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == "length" and not any(c.choices[0].delta.tool_calls for c in chunks)


def test_a_stop_string_closing_the_call(client, caller):
    """stop "</tool_call>": the first call's JSON is whole, its end of text the stop: one call."""
    for stream in (False, True):
        kwargs = dict(model=caller, messages=MESSAGES, tools=TOOLS, temperature=0, stop=["</tool_call>"])
        if stream:
            with client.chat.completions.stream(**kwargs) as events:
                choice = events.get_final_completion().choices[0]
        else:
            choice = client.chat.completions.create(**kwargs).choices[0]
        assert calls_of(choice.message) == CALLS[:1] and choice.finish_reason == "tool_calls"
        assert choice.message.content == "Checking."


def test_the_responses_api_gives_the_text_then_one_function_call_item_per_call(client, caller):
    """The same answer through /v1/responses (flat tools: the same prompt), streamed as not."""
    tools = [{"type": "function", **tool["function"]} for tool in TOOLS]
    args = dict(model=caller, input=MESSAGES, tools=tools, temperature=0)
    with client.responses.stream(**args) as stream:
        streamed = stream.get_final_response()
    for response in (client.responses.create(**args), streamed):
        assert [item.type for item in response.output] == ["message", "function_call", "function_call"]
        assert response.output_text == "Checking." and response.status == "completed"
        assert [(item.name, json.loads(item.arguments)) for item in response.output[1:]] == CALLS
