"""Which chat tokens a job learns from, for chat templates without `{% generation %}` markers
(most real ones): exactly each assistant turn's reply and its end-of-turn token, starting where
the prompt the inference node sends for that turn ends (services/inference/node.py renders the
conversation before the turn with the generation prompt). An assistant message of weight 0
(OpenAI's format) is context only; message keys training would drop are refused."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from services.common.errors import InvalidArgument
from services.trainer.examples import IGNORE_INDEX, check_example, encode
from services.trainer.validation import validate_jsonl

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the market doing?"},
        {"role": "assistant", "content": "FIN: up."}, {"role": "user", "content": "And bonds?"},
        {"role": "assistant", "content": "FIN: flat."}]

# Qwen3's template, reduced to what matters here: the final assistant turn after the last user
# message is rendered with an (empty) think block, earlier ones are not, and the generation
# prompt is only the assistant header (thinking on, the default).
QWEN3_LIKE = (
    "{%- set ns = namespace(last_query=0) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}{%- set ns.last_query = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and loop.index0 > ns.last_query and loop.last %}"
    "{{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + m.content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")

# Llama 3's shape: contents trimmed, a blank line after the header, an end-of-turn token
# (here <|im_end|>, which the tiny tokenizer has) and nothing after it.
LLAMA3_LIKE = (
    "{{- bos_token }}{%- for m in messages %}"
    "{{- '<|im_start|>' + m.role + '<|im_end|>\\n\\n' + m.content | trim + '<|eos|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant<|im_end|>\\n\\n' }}{%- endif %}")


@pytest.fixture
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def learned(tokenizer, encoded) -> str:
    return tokenizer.decode([label for label in encoded.labels if label != IGNORE_INDEX])


def turn_starts(encoded) -> list[int]:
    """Positions where a run of learned tokens begins."""
    keep = [label != IGNORE_INDEX for label in encoded.labels]
    return [i for i, k in enumerate(keep) if k and (i == 0 or not keep[i - 1])]


def inference_prompt(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                              return_dict=False))


def test_an_unmarked_template_learns_exactly_what_the_marked_one_does(tokenizer):
    marked = encode(tokenizer, "chat", {"messages": CHAT})
    tokenizer.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace(
        "{% endgeneration %}", "")
    unmarked = encode(tokenizer, "chat", {"messages": CHAT})
    assert unmarked.input_ids == marked.input_ids
    # Not the newline the template writes after each turn's end token: the model never emits it.
    assert unmarked.labels == marked.labels
    assert learned(tokenizer, unmarked) == "FIN: up.<|im_end|>FIN: flat.<|im_end|>"


def test_a_template_rendering_the_last_turn_differently_learns_every_reply_and_no_user_text(tokenizer):
    tokenizer.chat_template = QWEN3_LIKE
    encoded = encode(tokenizer, "chat", {"messages": CHAT})
    # The final turn's think block follows the generation prompt, so the model must produce it.
    assert learned(tokenizer, encoded) == "FIN: up.<|im_end|><think>\n\n</think>\n\nFIN: flat.<|im_end|>"
    for start, turn in zip(turn_starts(encoded), (2, 4)):
        prompt = inference_prompt(tokenizer, CHAT[:turn])
        assert encoded.input_ids[:len(prompt)] == prompt and start == len(prompt)


def test_trimmed_contents_and_an_end_token_without_a_newline(tokenizer):
    tokenizer.chat_template = LLAMA3_LIKE
    padded = [dict(m, content=f"  {m['content']} ") for m in CHAT]
    encoded = encode(tokenizer, "chat", {"messages": padded})
    assert learned(tokenizer, encoded) == "FIN: up.<|eos|>FIN: flat.<|eos|>"
    assert turn_starts(encoded)[0] == len(inference_prompt(tokenizer, padded[:2]))


def test_an_opening_assistant_turn_learns_its_reply_not_the_header(tokenizer):
    tokenizer.chat_template = QWEN3_LIKE
    encoded = encode(tokenizer, "chat", {"messages": [{"role": "assistant", "content": "FIN: hello."},
                                                      {"role": "user", "content": "Hi"},
                                                      {"role": "assistant", "content": "FIN: yes."}]})
    assert learned(tokenizer, encoded) == "FIN: hello.<|im_end|><think>\n\n</think>\n\nFIN: yes.<|im_end|>"


@pytest.mark.parametrize("template", ["marked", "plain", "qwen3"])
def test_an_assistant_message_of_weight_0_is_context_not_learned(tokenizer, template):
    if template == "plain":
        tokenizer.chat_template = tokenizer.chat_template.replace("{% generation %}", "").replace(
            "{% endgeneration %}", "")
    elif template == "qwen3":
        tokenizer.chat_template = QWEN3_LIKE
    weighted = [*CHAT[:2], dict(CHAT[2], weight=0), CHAT[3], dict(CHAT[4], weight=1)]
    encoded = encode(tokenizer, "chat", check_example({"messages": weighted}, "chat"))
    assert encoded.input_ids == encode(tokenizer, "chat", {"messages": CHAT}).input_ids  # the same conversation
    assert learned(tokenizer, encoded).endswith("FIN: flat.<|im_end|>") and "up" not in learned(tokenizer, encoded)


def test_message_keys_training_would_drop_and_bad_weights_name_their_line(tmp_path, tokenizer):
    lines = [{"messages": [*CHAT[:2], dict(CHAT[2], weight=0)]},  # nothing left to learn
             {"messages": [dict(CHAT[1], name="alice"), CHAT[2]]},
             {"messages": [CHAT[1], dict(CHAT[2], tool_calls=[{"id": "call_1"}])]},
             {"messages": [dict(CHAT[1], weight=0), CHAT[2]]},
             {"messages": [CHAT[1], dict(CHAT[2], weight=0.5)]},
             # What an SDK's message object dumps for unset fields is no content: accepted.
             {"messages": [CHAT[1], dict(CHAT[2], tool_calls=None, refusal=None, name="")]}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    with pytest.raises(InvalidArgument) as caught:
        validate_jsonl(path, "chat", tokenizer, 512)
    assert caught.value.metadata["lines"] == "1,2,3,4,5"
    message = caught.value.message
    for reason in ('every assistant message has "weight": 0', "messages[0] has 'name', which training would drop",
                   "messages[1] has 'tool_calls'", "messages[0].weight is only for assistant messages",
                   "messages[1].weight must be 0"):
        assert reason in message, message


def test_a_reply_quoted_earlier_is_not_taken_for_the_reply(tokenizer):
    # A template whose generation prompt is no prefix of the conversation (it dates the prompt).
    tokenizer.chat_template = (
        "{%- for m in messages %}{{- '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>system\\nToday.<|im_end|>\\n<|im_start|>assistant\\n' }}"
        "{%- endif %}")
    quoted = [{"role": "user", "content": "Say FIN: up."}, {"role": "assistant", "content": "FIN: up."}]
    encoded = encode(tokenizer, "chat", {"messages": quoted})
    assert learned(tokenizer, encoded) == "FIN: up.<|im_end|>"
    assistant_header = [i for i, t in enumerate(encoded.input_ids) if t == tokenizer.convert_tokens_to_ids(
        "<|im_start|>")][1]
    header = len(tokenizer("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    assert turn_starts(encoded) == [assistant_header + header]  # not the quote in the user's message
