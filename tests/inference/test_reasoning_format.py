"""Reasoning models (services/inference/reasoning_format.py): told by the chat template, where
generation starts (inside a block the prompt opened, or before any), reported on the first delta
of chat streams, and the tags kept in the text where they are special tokens."""

from __future__ import annotations

import shutil

import pytest

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.common.pb.loraplex.inference.v1 import inference_pb2 as pb
from services.common.tiny_model import CHAT_TEMPLATE, build_tokenizer
from services.inference.config import InferenceConfig
from services.inference.reasoning_format import detect, kept_tag_ids, reasoning_start, resolve
from services.inference.token_bytes import special_token_ids
from tests.inference.test_servicer import collect, greedy, serve_and_run

#: The parts of real templates that give them away (abridged). Qwen3 strips old thinking from
#: the history and, with enable_thinking false, writes an empty block itself.
QWEN3 = ("{%- if '</think>' in content %}{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
         "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- if enable_thinking is defined and "
         "enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}{%- endif %}")
#: DeepSeek-R1's: the generation prompt opens the block.
R1 = ("{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content.split('</think>')[-1] }}"
      "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n{% endif %}")


@pytest.mark.parametrize(("template", "fmt"), [(QWEN3, "think"), (R1, "think"), (CHAT_TEMPLATE, ""), (None, ""),
                                               ("{{ '<think>' }}", ""), ({"default": R1}, "think")])
def test_the_chat_template_tells_whether_the_model_thinks(template, fmt):
    assert detect(template) == fmt


def test_where_generation_starts_is_read_from_the_end_of_the_prompt():
    tokenizer = build_tokenizer()

    def start(text: str) -> str:
        return reasoning_start(tokenizer, tokenizer.encode(text, add_special_tokens=False))

    assert start("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n") == "open"
    assert start("<|im_start|>assistant\n<think>\n\n</think>\n\n") == "closed"  # thinking turned off
    assert start("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n") == "closed"
    # a user who ends a message with the tag does not open a block
    assert start("<|im_start|>user\nsay <think><|im_end|>\n<|im_start|>assistant\n") == "closed"


def test_the_operator_overrides_the_template_and_the_flag_is_checked(tiny_model_dir):
    tokenizer = build_tokenizer()
    assert resolve("auto", tokenizer) == "" and resolve("think", tokenizer) == "think"
    tokenizer.chat_template = QWEN3
    assert resolve("auto", tokenizer) == "think" and resolve("none", tokenizer) == ""
    assert InferenceConfig(base_model=tiny_model_dir).reasoning_format == "auto"
    with pytest.raises(ValueError, match="--reasoning-format"):
        InferenceConfig(base_model=tiny_model_dir, reasoning_format="deepseek")


def test_tags_that_are_special_tokens_are_kept():
    tokenizer = build_tokenizer()
    assert kept_tag_ids(tokenizer, special_token_ids(tokenizer)) == ()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<think>", "</think>"]})
    tags = tuple(sorted(tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>")))
    assert kept_tag_ids(tokenizer, special_token_ids(tokenizer)) == tags


def test_the_node_reports_where_chat_generation_starts(tiny_model_dir, tmp_path):
    model = shutil.copytree(tiny_model_dir, tmp_path / "r1")
    (model / "chat_template.jinja").write_text(R1)
    hello = gen.ChatMessages(messages=[gen.ChatMessage(role="user", content="hello")])

    async def body(stub, app):
        chat = await collect(stub.Generate(pb.GenerateRequest(messages=hello, sampling=greedy(max_tokens=3))))
        text = await collect(stub.Generate(pb.GenerateRequest(prompt="hello", sampling=greedy(max_tokens=3))))
        return [r.delta.reasoning_start for r in chat], [r.delta.reasoning_start for r in text]

    chat, text = serve_and_run(model, tmp_path / "adapters", body)
    assert chat == ["open", "", ""] and text == ["", "", ""]  # raw completions are never split
    # --reasoning-format none: the node says nothing, and the Router leaves the text whole
    chat, _ = serve_and_run(model, tmp_path / "adapters", body, reasoning_format="none")
    assert chat == ["", "", ""]
