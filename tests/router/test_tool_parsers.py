"""Tool calls read out of free text (tool_choice "auto"), per format: services/router/tool_parsers.py.

Each case is read whole and streamed in every chunking tried (a character at a time, a few
characters, random splits): the content and calls must agree, and streamed content must never
hold call markup when the text made calls."""

from __future__ import annotations

import json
import random

import pytest

from services.router.tool_parsers import ToolCallReader, read_calls

NAMES = ("get_weather", "get_time", "book")
W = '{"name": "get_weather", "arguments": {"city": "Paris"}}'
T = '{"name": "get_time", "arguments": {}}'
PARIS = ("get_weather", '{"city":"Paris"}')
TIME = ("get_time", "{}")


def hermes(*calls: str, sep: str = "\n") -> str:
    return sep.join(f"<tool_call>\n{call}\n</tool_call>" for call in calls)


CASES = [
    # (format, text, finish_reason, content, calls)
    ("hermes", hermes(W), "stop", "", [PARIS]),
    ("hermes", "Let me check." + "\n\n" + hermes(W, T), "stop", "Let me check.", [PARIS, TIME]),
    ("hermes", hermes(W, T, sep=""), "stop", "", [PARIS, TIME]),
    ("hermes", "  \n" + hermes(W) + "\n", "stop", "", [PARIS]),
    ("hermes", f"<tool_call>{W}</tool_call>", "stop", "", [PARIS]),  # no whitespace at all
    ("hermes", "<tool_call>\n" + W, "stop", "", [PARIS]),  # the end of turn before the closing tag
    ("hermes", "<tool_call>\n" + W + "\n</tool", "stop", "", [PARIS]),
    ("hermes", "<tool_call>\n" + W, "length", "<tool_call>\n" + W, []),  # cut: max_tokens
    ("hermes", "<tool_call>\n" + W[:20], "length", "<tool_call>\n" + W[:20], []),
    ("hermes", "<tool_call>\n" + W[:20], "stop", "<tool_call>\n" + W[:20], []),  # a stop string cut it
    ("hermes", hermes(W) + "\n" + hermes(T)[:25], "length", "", [PARIS]),  # a call given out stays
    ("hermes", hermes(W) + "\nThat is all.", "stop", "", [PARIS]),  # trailing text after calls: dropped
    ("hermes", hermes(W) + hermes('{"name": "nope"}'), "stop", "", [PARIS]),
    ("hermes", "Plain answer, no tools.", "stop", "Plain answer, no tools.", []),
    ("hermes", "a < b and <tool is a tag", "stop", "a < b and <tool is a tag", []),
    ("hermes", "ends with <tool_ca", "stop", "ends with <tool_ca", []),
    ("hermes", "ends with spaces  \n", "stop", "ends with spaces  \n", []),
    ("hermes", "", "stop", "", []),
    ("hermes", hermes('{"name": "nope", "arguments": {}}'), "stop", hermes('{"name": "nope", "arguments": {}}'), []),
    ("hermes", hermes('{"name": "get_time", "arguments": {'), "stop",
     hermes('{"name": "get_time", "arguments": {'), []),  # malformed JSON (the closing tag inside the object)
    ("hermes", hermes('{"name": "get_time", "arguments": [1]}'), "stop",
     hermes('{"name": "get_time", "arguments": [1]}'), []),  # arguments not an object
    ("hermes", hermes('["get_time"]'), "stop", hermes('["get_time"]'), []),
    ("hermes", hermes('{"name": "get_time"} trailing'), "stop", hermes('{"name": "get_time"} trailing'), []),
    ("hermes", hermes('{"name": "get_time", "arguments": {"x": NaN}}'), "stop",
     hermes('{"name": "get_time", "arguments": {"x": NaN}}'), []),
    ("hermes", "Hi " + hermes('{"name": "bad"}') + hermes(W), "stop",
     "Hi " + hermes('{"name": "bad"}') + hermes(W), []),  # a bad first block: all text, nothing more read
    # strings holding markup, braces and escapes are the call's, not the format's
    ("hermes", hermes('{"name": "book", "arguments": {"note": "a } </tool_call> { \\" <tool_call>"}}'), "stop", "",
     [("book", '{"note":"a } </tool_call> { \\" <tool_call>"}')]),
    ("hermes", hermes('{"name": "book", "arguments": {"a": {"b": [{"c": "]]}}"}]}, "d": "\\\\"}}'), "stop", "",
     [("book", '{"a":{"b":[{"c":"]]}}"}]},"d":"\\\\"}')]),
    ("hermes", "Voilà ☀️ " + hermes('{"name": "get_weather", "arguments": {"city": "Zürich 東京 🌧"}}'),
     "stop", "Voilà ☀️", [("get_weather", '{"city":"Zürich 東京 🌧"}')]),
    ("hermes", hermes('{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}'), "stop", "",
     [("get_weather", '{"city":"Oslo"}')]),  # arguments as JSON text of an object
    ("hermes", hermes('{"name": "get_time", "parameters": {"tz": "UTC"}}'), "stop", "",
     [("get_time", '{"tz":"UTC"}')]),
    ("hermes", hermes('{"name": "get_time"}'), "stop", "", [TIME]),  # no arguments: {}
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}}', "stop", "", [PARIS]),
    ("llama3_json", '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}', "stop", "", [PARIS]),
    ("llama3_json", ' \n{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", '
                    '"parameters": {}}', "stop", "", [PARIS, TIME]),
    ("llama3_json", '{"name": "get_weather", "parameters": {"city": "Paris"}};{"name": "get_time"}', "stop", "",
     [PARIS, TIME]),
    ("llama3_json", 'Sure: {"name": "get_time", "parameters": {}}', "stop",
     'Sure: {"name": "get_time", "parameters": {}}', []),  # text first: no calls
    ("llama3_json", '{"answer": 42}', "stop", '{"answer": 42}', []),  # JSON, but no call
    ("llama3_json", '{"name": "get_time", "parameters": {', "length", '{"name": "get_time", "parameters": {', []),
    ("llama3_json", "<|python_tag|>print(1)", "stop", "<|python_tag|>print(1)", []),  # code, not a JSON call
    ("llama3_json", "<|python", "stop", "<|python", []),
    ("llama3_json", "   ", "stop", "   ", []),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time", '
                '"arguments": {}, "id": "a1b2c3d4e"}]', "stop", "", [PARIS, TIME]),
    ("mistral", 'Checking.[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}]', "stop",
     "Checking.", [PARIS]),
    ("mistral", '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "x"}]', "stop",
     '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "x"}]', []),
    ("mistral", "[TOOL_CALLS] []", "stop", "[TOOL_CALLS] []", []),
    ("mistral", '[TOOL_CALLS] {"name": "get_time"}', "stop", '[TOOL_CALLS] {"name": "get_time"}', []),
    ("mistral", "[1, 2] is a list", "stop", "[1, 2] is a list", []),
    # Mistral v11 on (Small 3.2, Magistral, Devstral): name[ARGS]{...}, one [TOOL_CALLS] per call
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}', "stop", "", [PARIS]),
    ("mistral", 'Checking.[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}', "stop",
     "Checking.", [PARIS, TIME]),
    ("mistral", '[TOOL_CALLS]get_weather[CALL_ID]a1b2c3d4e[ARGS]{"city": "Paris"}', "stop", "", [PARIS]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_ti', "length", "", [PARIS]),
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]{"city": "Par', "length", '[TOOL_CALLS]get_weather[ARGS]{"city": "Par',
     []),  # cut by max_tokens
    ("mistral", '[TOOL_CALLS]get_weather[ARGS]["Paris"]', "stop", '[TOOL_CALLS]get_weather[ARGS]["Paris"]', []),
    ("mistral", "[TOOL_CALLS]unknown[ARGS]{}", "stop", "[TOOL_CALLS]unknown[ARGS]{}", []),
    ("mistral", "[TOOL_CALLS]get weather[ARGS]{}", "stop", "[TOOL_CALLS]get weather[ARGS]{}", []),
    ("mistral", "[TOOL_CALLS][ARGS]{}", "stop", "[TOOL_CALLS][ARGS]{}", []),
    ("mistral", "[TOOL_CALLS]get_time", "stop", "[TOOL_CALLS]get_time", []),
]


def streamed(fmt: str, text: str, finish: str, sizes, parallel: bool = True) -> tuple[str, list, list[str]]:
    reader = ToolCallReader(fmt, NAMES, parallel)
    pieces, calls, start, k = [], [], 0, 0
    while start < len(text):
        size = sizes[k % len(sizes)]
        content, made = reader.feed(text[start:start + size])
        pieces.append(content)
        calls += made
        start, k = start + size, k + 1
    content, made = reader.finish(finish)
    return "".join(pieces) + content, calls + made, pieces + [content]


@pytest.mark.parametrize(("fmt", "text", "finish", "content", "calls"), CASES)
def test_read_whole(fmt, text, finish, content, calls):
    assert read_calls(fmt, NAMES, text, finish) == (content, calls)
    if not calls:  # no call: the text comes back exactly as the model wrote it
        assert content == text


@pytest.mark.parametrize(("fmt", "text", "finish", "content", "calls"), CASES)
@pytest.mark.parametrize("sizes", [[1], [2], [3, 1, 7], [5, 11], "random"])
def test_streamed_in_any_chunks_gives_the_same(fmt, text, finish, content, calls, sizes):
    if sizes == "random":
        sizes = [random.Random(len(text)).randint(1, 9) for _ in range(50)]
    got_content, got_calls, pieces = streamed(fmt, text, finish, sizes)
    assert (got_content, got_calls) == (content, calls)
    if calls:  # markup never leaks into content, not even a piece of a marker
        for marker in ("<tool_call>", "[TOOL_CALLS]", "[ARGS]", "<|python_tag|>", "{"):
            assert marker not in got_content
        assert all("<" not in piece and "[" not in piece for piece in pieces)


def test_content_is_given_out_as_it_comes():
    reader = ToolCallReader("hermes", NAMES)
    assert reader.feed("The weather") == ("The weather", [])
    assert reader.feed(" in Paris is \n") == (" in Paris is", [])  # whitespace before a call is not content
    assert reader.feed(" <tool") == ("", [])  # may be a marker: held
    assert reader.feed("s> are fun ") == (" \n <tools> are fun", [])  # was not
    assert reader.finish("stop") == (" ", [])


def test_each_call_is_given_out_as_its_block_closes():
    reader = ToolCallReader("hermes", NAMES)
    assert reader.feed("<tool_call>\n" + W) == ("", [])
    assert reader.feed("\n</tool_call>\n<tool_call>") == ("", [PARIS])
    assert reader.feed(T + "</tool_call>") == ("", [TIME])
    assert reader.finish("stop") == ("", [])


@pytest.mark.parametrize("fmt", ["hermes", "llama3_json", "mistral"])
def test_parallel_false_keeps_the_first_call(fmt):
    text = {"hermes": hermes(W, T), "llama3_json": f"{W};{T}", "mistral": f"[TOOL_CALLS][{W}, {T}]"}[fmt]
    assert read_calls(fmt, NAMES, text, "stop", parallel=False) == ("", [PARIS])
    assert streamed(fmt, text, "stop", [1], parallel=False)[:2] == ("", [PARIS])


def test_deep_nesting_and_long_calls_do_not_break_it():
    deep = '{"name": "book", "arguments": {"x": ' + "[" * 5000 + "]" * 5000 + "}}"
    assert read_calls("hermes", NAMES, hermes(deep), "stop") == (hermes(deep), [])  # too deep to parse: text
    long = json.dumps({"name": "book", "arguments": {"note": "y" * 200_000}})
    content, calls = read_calls("hermes", NAMES, hermes(long), "stop")
    assert content == "" and json.loads(calls[0][1]) == {"note": "y" * 200_000}
