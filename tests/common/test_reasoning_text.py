"""Thinking split from the answer (services/router/reasoning_text.py): each case read whole
and streamed in many chunkings must agree, and no tag may leak into either part."""

from __future__ import annotations

import random

import pytest

from services.common.reasoning_text import ReasoningSplitter, ReasoningTokens, split_reasoning

CASES = [
    # (start, text, reasoning, content)
    ("closed", "<think>\nThe user greets me.\n</think>\n\nHello!", "\nThe user greets me.\n", "Hello!"),
    ("closed", "  <think>a</think>b", "a", "b"),
    ("closed", "<think>\n\n</think>\n\nHi", "\n\n", "Hi"),  # Qwen3 with thinking turned off
    ("closed", "Hello there", None, "Hello there"),  # no block: all answer
    ("closed", "Hi <think>not a block</think>", None, "Hi <think>not a block</think>"),
    ("closed", "<thinking>x", None, "<thinking>x"),
    ("closed", "<thi", None, "<thi"),  # the end came before the tag did
    ("closed", "<think>cut off by max_tokens", "cut off by max_tokens", ""),
    ("closed", "<think>a</think>", "a", ""),
    ("closed", "<think>a</thi", "a</thi", ""),
    ("open", "I should add.\n</think>\n\n4", "I should add.\n", "4"),  # DeepSeek-R1: the prompt opened it
    ("open", "no end tag", "no end tag", ""),
    ("open", "</think>answer", "", "answer"),
    ("open", "a < b and a </ b</think> yes <think> no", "a < b and a </ b", "yes <think> no"),
    ("closed", "", None, ""),
]


def streamed(start: str, text: str, sizes) -> tuple[str, str, list[tuple[str, str]]]:
    splitter = ReasoningSplitter(start)
    pieces, position, k = [], 0, 0
    while position < len(text):
        size = sizes[k % len(sizes)]
        pieces.append(splitter.feed(text[position:position + size]))
        position, k = position + size, k + 1
    pieces.append(splitter.finish())
    return "".join(r for r, _ in pieces), "".join(c for _, c in pieces), pieces


@pytest.mark.parametrize(("start", "text", "reasoning", "content"), CASES)
def test_read_whole(start, text, reasoning, content):
    assert split_reasoning(start, text) == (reasoning, content)


@pytest.mark.parametrize(("start", "text", "reasoning", "content"), CASES)
@pytest.mark.parametrize("sizes", [[1], [2], [3, 1, 7], "random"])
def test_streamed_in_any_chunks_gives_the_same(start, text, reasoning, content, sizes):
    if sizes == "random":
        sizes = [random.Random(len(text)).randint(1, 9) for _ in range(50)]
    got_reasoning, got_content, pieces = streamed(start, text, sizes)
    assert (got_reasoning, got_content) == (reasoning or "", content)
    if reasoning is not None:  # the tags are never given out as either part
        for piece_reasoning, piece_content in pieces:
            assert "<think>" not in piece_reasoning and "</think" not in piece_reasoning
        assert "</think>" not in got_content or "</think>" in text.split("</think>", 1)[1]


def test_reasoning_streams_as_it_comes():
    splitter = ReasoningSplitter("closed")
    assert splitter.feed("<th") == ("", "")
    assert splitter.feed("ink>Let me") == ("Let me", "")
    assert splitter.feed(" see.</") == (" see.", "")  # "</" may be the closing tag: held
    assert splitter.feed("think>\n\n") == ("", "")
    assert splitter.feed("Yes.") == ("", "Yes.")
    assert splitter.finish() == ("", "")


@pytest.mark.parametrize(("start", "deltas", "count"), [
    ("closed", ["<think>", "a", " b", "</think>", "\n\n", "Hi", "!"], 4),
    ("closed", ["Hi", " there"], 0),  # no thinking
    ("closed", ["<th", "ink>", "a"], 3),  # cut off while thinking: all of it
    ("open", ["a", "</think>", "Hi"], 2),
    ("open", ["a</think>Hi"], 1),  # one delta ending the thinking counts whole
    ("closed", ["   ", "<think>", "</think>", "x"], 3),
])
def test_reasoning_tokens_are_counted_per_delta(start, deltas, count):
    counter = ReasoningTokens(start)
    for text in deltas:
        counter.feed(text, 1)
    assert counter.count == count
