"""The node's tool-call format: told by the chat template or set by --tool-call-format, and its
markers kept in the text where they are special tokens (services/inference/tool_format.py)."""

from __future__ import annotations

import pytest

from services.common.tiny_model import CHAT_TEMPLATE, build_tokenizer
from services.inference.config import InferenceConfig
from services.inference.engine.detokenizer import IncrementalDetokenizer
from services.inference.token_bytes import special_token_ids
from services.inference.tool_format import detect, kept_marker_ids, resolve

#: The lines of real templates that give each family away (abridged).
QWEN25 = ('{%- if tools %}{{- "<|im_start|>system\\n" }}# Tools\\n<tools>{%- for tool in tools %}{{ tool | tojson }}'
          '{%- endfor %}</tools>\\nFor each function call, return a json object with function name and arguments '
          'within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{"name": <function-name>, "arguments": '
          '<args-json-object>}\\n</tool_call><|im_end|>\\n{%- endif %}')
LLAMA31 = ('{%- if builtin_tools is defined or tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}'
           '{%- if tool_call.name in builtin_tools %}{{- "<|python_tag|>" + tool_call.name }}{%- endif %}')
LLAMA32 = ('{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}{{- \'{"name": "\' + '
           'tool_call.name + \'", "parameters": \' }}')
MISTRAL = ('{%- if message.tool_calls %}{{- "[TOOL_CALLS] [" }}{%- for tool_call in message.tool_calls %}'
           '{{- tool_call.function | tojson }}{%- endfor %}{{- "]" + eos_token }}{%- endif %}')


@pytest.mark.parametrize(("template", "fmt"), [
    (QWEN25, "hermes"), (LLAMA31, "llama3_json"), (LLAMA32, "llama3_json"), (MISTRAL, "mistral"),
    (CHAT_TEMPLATE, ""), (None, ""), ("", ""),
    ({"default": CHAT_TEMPLATE, "tool_use": QWEN25}, "hermes"),  # Hermes 2 Pro: a named tool_use template
])
def test_the_chat_template_tells_the_format(template, fmt):
    assert detect(template) == fmt


def test_the_operator_overrides_the_template():
    tokenizer = build_tokenizer()
    assert resolve("auto", tokenizer) == ""  # the tiny model's ChatML shows no tools
    tokenizer.chat_template = QWEN25
    assert resolve("auto", tokenizer) == "hermes"
    assert resolve("none", tokenizer) == "" and resolve("mistral", tokenizer) == "mistral"


def test_the_flag_takes_only_known_formats(tiny_model_dir):
    assert InferenceConfig(base_model=tiny_model_dir).tool_call_format == "auto"
    assert InferenceConfig(base_model=tiny_model_dir, tool_call_format="llama3_json").tool_call_format == "llama3_json"
    with pytest.raises(ValueError, match="--tool-call-format"):
        InferenceConfig(base_model=tiny_model_dir, tool_call_format="qwen")


def test_markers_that_are_special_tokens_stay_in_the_text():
    """Mistral's [TOOL_CALLS] is a special token: decoding skips it, which would hide the calls."""
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    tokenizer.add_tokens(["<tool_call>"])  # Qwen's: an added token, not special, decoded as text anyway
    special = special_token_ids(tokenizer)
    marker = tokenizer.convert_tokens_to_ids("[TOOL_CALLS]")
    assert kept_marker_ids(tokenizer, "mistral", special) == (marker,)
    assert kept_marker_ids(tokenizer, "hermes", special) == ()
    assert kept_marker_ids(tokenizer, "", special) == ()
    text = 'Sure.[TOOL_CALLS] [{"name": "f", "arguments": {}}]'
    ids = tokenizer.encode(text, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert marker in ids
    plain = IncrementalDetokenizer(tokenizer, [])
    assert "".join(plain.push([t]) for t in ids) + plain.flush() == text.replace("[TOOL_CALLS]", "")
    keeping = IncrementalDetokenizer(tokenizer, [], kept={marker: "[TOOL_CALLS]"})
    chunks = [keeping.push([t]) for t in ids] + [keeping.flush()]
    assert "".join(chunks) == text  # the end-of-turn token is still skipped


def test_the_node_reports_its_format_on_the_first_delta_of_a_stream_with_tools(tiny_model_dir, tmp_path):
    from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
    from services.common.pb.loraplex.inference.v1 import inference_pb2 as pb
    from tests.inference.test_servicer import collect, greedy, serve_and_run

    tools = '[{"type": "function", "function": {"name": "f"}}]'
    hello = [gen.ChatMessage(role="user", content="hello")]

    async def body(stub, app):
        with_tools = await collect(stub.Generate(pb.GenerateRequest(
            messages=gen.ChatMessages(messages=hello, tools_json=tools), sampling=greedy(max_tokens=3))))
        without = await collect(stub.Generate(pb.GenerateRequest(
            messages=gen.ChatMessages(messages=hello), sampling=greedy(max_tokens=3))))
        return [r.delta.tool_call_format for r in with_tools], [r.delta.tool_call_format for r in without]

    # the tiny template shows no tools: the operator says the model writes hermes calls
    with_tools, without = serve_and_run(tiny_model_dir, tmp_path, body, tool_call_format="hermes")
    assert with_tools == ["hermes", "", ""] and without == ["", "", ""]


MISTRAL_V11 = ('{%- for tool_call in message.tool_calls %}{{- "[TOOL_CALLS]" + tool_call.function.name + "[ARGS]" + '
               'tool_call.function.arguments|tojson }}{%- endfor %}')


def test_mistral_v11_markers_are_kept_too():
    """From tokenizer v11 on, Mistral writes `[TOOL_CALLS]name[ARGS]{...}`: [ARGS] is special as
    well, and the Router could not tell the name from the arguments without it."""
    assert detect(MISTRAL_V11) == "mistral"
    tokenizer = build_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]", "[ARGS]"]})
    markers = tuple(sorted(tokenizer.convert_tokens_to_ids(m) for m in ("[TOOL_CALLS]", "[ARGS]")))
    assert kept_marker_ids(tokenizer, "mistral", special_token_ids(tokenizer)) == markers
