"""One choice's text read into thinking, answer and tool calls (services/router/choice_reader.py):
the two readers layered, streamed or whole alike."""

from __future__ import annotations

import pytest

from services.router.choice_reader import ChoiceReader
from services.router.openai_tools import ToolUse

CALL = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
TOOLS = ToolUse("[]", names=("get_time",))


def streamed(reader: ChoiceReader, text: str, finish: str, size: int) -> tuple[list[dict], str | None]:
    deltas = [d for k in range(0, len(text), size) for d in reader.feed(text[k:k + size])]
    last, reason = reader.finish(finish)
    return deltas + last, reason


def joined(deltas: list[dict], key: str) -> str:
    return "".join(d.get(key, "") for d in deltas)


@pytest.mark.parametrize("size", [1, 3, 1000])
def test_a_call_after_thinking_is_a_call_and_one_inside_it_is_not(size):
    text = f"<think>Maybe {CALL}? Yes.</think>\n\nLet me look.\n{CALL}"
    deltas, reason = streamed(ChoiceReader(TOOLS, "hermes", "closed"), text, "stop", size)
    assert joined(deltas, "reasoning_content") == f"Maybe {CALL}? Yes."  # thinking is never read for calls
    assert joined(deltas, "content") == "Let me look."
    assert [d["tool_calls"][0]["function"]["name"] for d in deltas if "tool_calls" in d] == ["get_time"]
    assert reason == "tool_calls"
    kinds = [next(iter(d)) for d in deltas]
    assert kinds.index("content") > max(i for i, k in enumerate(kinds) if k == "reasoning_content")


def test_the_whole_answer_adds_the_stream_up():
    message, reason = ChoiceReader(TOOLS, "hermes", "open").answer(f"Plan.</think>\n\n{CALL}", "stop")
    assert message["reasoning_content"] == "Plan." and message["content"] is None
    assert message["tool_calls"][0]["function"]["name"] == "get_time" and reason == "tool_calls"
    plain, _ = ChoiceReader(None, "", "closed").answer("Just text.", "stop")
    assert plain == {"content": "Just text."}  # no block: no reasoning_content at all
    empty, _ = ChoiceReader(None, "", "closed").answer("<think></think>Hi", "stop")
    assert empty == {"content": "Hi", "reasoning_content": ""}


def test_no_split_under_a_grammar_or_for_a_model_that_does_not_think():
    text = "<think>x</think>y"
    assert ChoiceReader(None, "", "open", constrained=True).answer(text, "stop")[0] == {"content": text}
    assert ChoiceReader(None, "", "").answer(text, "stop")[0] == {"content": text}
