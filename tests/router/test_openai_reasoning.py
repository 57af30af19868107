"""A model that thinks (Qwen3 style: `<think>` ... `</think>`, then the answer) through the
official `openai` SDK, a real router and a real node: the thinking comes back as chat's
`reasoning_content` and as the Responses API's `reasoning` item, never as the answer.

The tiny model's template here is Qwen3's in miniature (both tags, and `enable_thinking`
false writing an empty block), so the node says its model thinks. A LoRA adapter fitted in the
test (tests/router/fitted_adapter.py) makes it really write THOUGHT then the answer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from openai import BadRequestError, OpenAI
from prometheus_client import REGISTRY

from services.common.tiny_model import build_tokenizer
from services.inference.chat_template import ChatTurn, render
from tests.registry.lora_files import AdapterFiles
from tests.router.fitted_adapter import fit_lora, serve_fitted
from tests.router.harness import InProcessRouter

BASE = "tiny-thinks"
TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message.role }}\n{{ message.content.split('</think>')[-1] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}")
MESSAGES = [{"role": "user", "content": "Say hello."}]
THOUGHT = "\nThe user wants a greeting.\n"
REPLY = "Hello there!"
ANSWER = f"<think>{THOUGHT}</think>\n\n{REPLY}"


def fit_adapter(model_dir: Path, out: Path) -> AdapterFiles:
    from transformers import AutoTokenizer

    prompt = render(AutoTokenizer.from_pretrained(model_dir), [ChatTurn(m["role"], m["content"]) for m in MESSAGES])
    return fit_lora(model_dir, prompt, ANSWER, out)


@pytest.fixture(scope="module")
def served(world, tmp_path_factory) -> Iterator[tuple[InProcessRouter, str]]:
    with serve_fitted(world, tmp_path_factory.mktemp("reasoning"), BASE, TEMPLATE, fit_adapter) as served:
        yield served


@pytest.fixture
def client(served, world) -> OpenAI:
    return OpenAI(base_url=served[0].base_url, api_key=world.a.token, max_retries=0)


@pytest.fixture
def thinker(served) -> str:
    return served[1]


def test_the_thinking_is_reasoning_content_and_the_answer_content(client, thinker, served, world):
    completion = client.chat.completions.create(model=thinker, messages=MESSAGES, temperature=0)
    choice = completion.choices[0]
    assert choice.message.content == REPLY and choice.finish_reason == "stop"
    assert choice.message.reasoning_content == THOUGHT
    # the thinking's tokens, tags included: all but the answer's (and the end of turn's)
    tokenizer = build_tokenizer()
    thinking = len(tokenizer.encode(f"<think>{THOUGHT}</think>", add_special_tokens=False))
    reasoning = completion.usage.completion_tokens_details.reasoning_tokens
    assert thinking <= reasoning < completion.usage.completion_tokens
    # and on /metrics, for the tenant's billing (the deployment's name is the model)
    assert REGISTRY.get_sample_value("loraplex_router_tenant_tokens_total", {
        "tenant": world.a.tenant_name, "model": thinker, "kind": "reasoning"}) >= reasoning
    plain = client.chat.completions.create(model=BASE, messages=MESSAGES, temperature=0, max_tokens=3)
    if getattr(plain.choices[0].message, "reasoning_content", None) is None:  # the random model did not think
        assert plain.usage.completion_tokens_details.reasoning_tokens == 0


def test_streamed_the_same(client, thinker):
    chunks = [c for c in client.chat.completions.create(model=thinker, messages=MESSAGES, temperature=0, stream=True)
              if c.choices]
    reasoning = [getattr(c.choices[0].delta, "reasoning_content", None) for c in chunks]
    content = [c.choices[0].delta.content for c in chunks]
    assert "".join(r for r in reasoning if r) == THOUGHT and "".join(c for c in content if c) == REPLY
    last_thought = max(i for i, r in enumerate(reasoning) if r)
    assert not any(content[:last_thought + 1])  # the thinking streams first, then the answer
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_cut_off_while_thinking_is_all_reasoning(client, thinker):
    choice = client.chat.completions.create(model=thinker, messages=MESSAGES, temperature=0, max_tokens=6).choices[0]
    assert choice.finish_reason == "length" and choice.message.content == ""
    assert THOUGHT.startswith(choice.message.reasoning_content) and choice.message.reasoning_content


def test_a_json_response_format_is_not_split(client, thinker):
    """Under a grammar the text is the answer from its first token: nothing to split off."""
    choice = client.chat.completions.create(model=thinker, messages=MESSAGES, temperature=0, max_tokens=8,
                                            response_format={"type": "json_object"}).choices[0]
    assert choice.message.content.startswith("{")
    assert getattr(choice.message, "reasoning_content", None) is None


def test_chat_template_kwargs_reach_the_template(client, thinker):
    plain = client.chat.completions.create(model=thinker, messages=MESSAGES, temperature=0, max_tokens=2)
    off = client.chat.completions.create(model=thinker, messages=MESSAGES, temperature=0, max_tokens=2,
                                         extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    # the template wrote its empty block: "<think>\n\n</think>\n\n"
    assert off.usage.prompt_tokens > plain.usage.prompt_tokens
    with pytest.raises(BadRequestError) as refused:
        client.chat.completions.create(model=thinker, messages=MESSAGES,
                                       extra_body={"chat_template_kwargs": {"add_generation_prompt": False}})
    assert refused.value.body["param"] == "chat_template_kwargs"
    assert "not a variable a request may set" in refused.value.body["message"]


def test_the_responses_api_gives_a_reasoning_item_then_the_message(client, thinker):
    response = client.responses.create(model=thinker, input=MESSAGES[0]["content"], temperature=0)
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert 0 < response.usage.output_tokens_details.reasoning_tokens < response.usage.output_tokens
    assert response.output[0].content[0].text == THOUGHT and response.output_text == REPLY
    # a client that sends the output back as the next turn's input (as the SDK's docs show) is served
    again = client.responses.create(model=thinker, temperature=0, max_output_tokens=4, input=[
        *MESSAGES, *[item.model_dump(exclude_none=True) for item in response.output],
        {"role": "user", "content": "Again."}])
    assert again.status == "incomplete"


def test_the_responses_stream_sends_the_reasoning_first(client, thinker):
    with client.responses.stream(model=thinker, input=MESSAGES[0]["content"], temperature=0) as stream:
        events = list(stream)
        final = stream.get_final_response()
    kinds = [event.type for event in events]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == THOUGHT
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == REPLY
    assert kinds.index("response.reasoning_text.done") < kinds.index("response.output_text.delta")
    assert [item.type for item in final.output] == ["reasoning", "message"] and final.output_text == REPLY
