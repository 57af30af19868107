"""The node's chat rendering with tool use: what reaches the tokenizer's template, in HF's
format, for the tiny model's template (which knows no tools) and for one that renders them."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from services.common.errors import InvalidArgument
from services.inference.chat_template import ChatTurn, ToolCall, render

TOOLS = [{"type": "function", "function": {"name": "get_rate", "description": "A bond's rate.",
                                           "parameters": {"type": "object", "properties": {"bond": {"type": "string"}}}}}]
HISTORY = [ChatTurn("user", "What does the 10y pay?"),
           ChatTurn("assistant", "", (ToolCall("call_1", "get_rate", '{"bond": "10y"}'),)),
           ChatTurn("tool", "4.2%", tool_call_id="call_1")]
#: A template in the style of tool-aware ones (Qwen, Llama 3.1): tools listed up front, calls
#: written from their argument objects, tool results tagged with the call they answer.
TOOL_TEMPLATE = (
    "{% if tools %}TOOLS:{% for tool in tools %}{{ tool.function.name }};{% endfor %}|{% endif %}"
    "{% for message in messages %}<{{ message.role }}>{{ message.content }}"
    "{% for call in message.tool_calls or [] %}CALL {{ call.id }} {{ call.function.name }} "
    "bond={{ call.function.arguments.bond }}{% endfor %}"
    "{% if message.tool_call_id %} (answers {{ message.tool_call_id }}){% endif %}|{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}")
REFUSING_TEMPLATE = ("{% for message in messages %}{% if message.role == 'tool' %}"
                     "{{ raise_exception('tool turns are not supported') }}{% endif %}{{ message.content }}"
                     "{% endfor %}")


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_a_template_without_tool_support_still_shows_the_tool_results(tokenizer):
    text = tokenizer.decode(render(tokenizer, HISTORY, json.dumps(TOOLS)))
    assert "<|im_start|>tool\n4.2%<|im_end|>" in text and text.endswith("<|im_start|>assistant\n")
    without_tools = render(tokenizer, HISTORY)
    assert tokenizer.decode(without_tools) == text  # it ignores the definitions, without failing


def test_a_tool_aware_template_gets_hf_format(tokenizer):
    tokenizer.chat_template = TOOL_TEMPLATE
    text = tokenizer.decode(render(tokenizer, HISTORY, json.dumps(TOOLS)))
    assert text == ("TOOLS:get_rate;|<user>What does the 10y pay?|<assistant>CALL call_1 get_rate bond=10y|"
                    "<tool>4.2% (answers call_1)|<assistant>")


def test_a_template_refusing_the_conversation_is_the_callers_400(tokenizer):
    tokenizer.chat_template = REFUSING_TEMPLATE
    with pytest.raises(InvalidArgument) as caught:
        render(tokenizer, HISTORY)
    assert caught.value.metadata["field"] == "messages" and "tool turns are not supported" in caught.value.message


@pytest.mark.parametrize(("turns", "tools_json", "field"), [
    ([ChatTurn("function", "x")], "", "messages[0].role"),
    ([ChatTurn("tool", "x")], "", "messages[0].tool_call_id"),
    ([ChatTurn("user", "x", tool_call_id="c")], "", "messages[0].tool_call_id"),
    ([ChatTurn("user", "x", (ToolCall("c", "f", "{}"),))], "", "messages[0].tool_calls"),
    ([ChatTurn("assistant", "", (ToolCall("c", "f", '"text"'),))], "", "messages[0].tool_calls[0].arguments"),
    ([ChatTurn("assistant", "", (ToolCall("c", "f", "{"),))], "", "messages[0].tool_calls[0].arguments"),
    ([ChatTurn("user", "x")], '{"not": "a list"}', "messages.tools_json"),
])
def test_malformed_tool_turns_are_refused_naming_the_part(tokenizer, turns, tools_json, field):
    with pytest.raises(InvalidArgument) as caught:
        render(tokenizer, turns, tools_json)
    assert caught.value.metadata["field"] == field


THINKING_TEMPLATE = ("{% for message in messages %}<{{ message.role }}>{{ message.content }}|{% endfor %}"
                     "<assistant>{% if enable_thinking is defined and enable_thinking is false %}"
                     "<think>\n\n</think>\n\n{% endif %}{% if greeting %}{{ greeting }}{% endif %}")


def test_template_kwargs_reach_the_template(tokenizer):
    """vLLM's chat_template_kwargs: Qwen3's enable_thinking false writes an empty thought."""
    tokenizer.chat_template = THINKING_TEMPLATE
    turns = [ChatTurn("user", "hi")]
    assert tokenizer.decode(render(tokenizer, turns)) == "<user>hi|<assistant>"
    off = tokenizer.decode(render(tokenizer, turns, "", '{"enable_thinking": false, "greeting": "Hey"}'))
    assert off == "<user>hi|<assistant><think>\n\n</think>\n\nHey"


@pytest.mark.parametrize(("kwargs", "message"), [
    ("[1]", "must be JSON text of an object"),
    ("{not json", "must be JSON text of an object"),
    ('{"add_generation_prompt": false}', "'add_generation_prompt' is not a variable"),
    ('{"tools": null}', "'tools' is not a variable"),
    ('{"bad-name": 1}', "'bad-name' is not a variable"),
    ('{"enable_thinking": [true]}', "enable_thinking must be true, false"),
    ('{"x": "' + "a" * 257 + '"}', "x must be true, false"),
    (json.dumps({f"k{i}": 1 for i in range(17)}), "at most 16 keys"),
])
def test_bad_template_kwargs_are_refused_naming_the_field(tokenizer, kwargs, message):
    with pytest.raises(InvalidArgument, match=message) as refused:
        render(tokenizer, [ChatTurn("user", "hi")], "", kwargs)
    assert refused.value.metadata["field"] == "messages.template_kwargs_json"
