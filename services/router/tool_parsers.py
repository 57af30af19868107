"""Tool calls read out of a model's free text, in its family's format (vLLM's tool parsers).

Pure: no grpc, no HTTP. The formats (services/inference/tool_format.py tells which a model uses):
- "hermes": `<tool_call>{"name": N, "arguments": {...}}</tool_call>` blocks (whitespace around
  the JSON as the model writes it), one after another, after any text;
- "llama3_json": the whole output is `{"name": N, "parameters": {...}}` (optionally after
  `<|python_tag|>`), or several such objects separated by `;`; text first means no calls;
- "mistral": `[TOOL_CALLS]` then a JSON array `[{"name": N, "arguments": {...}}, ...]`, after
  any text (tokenizers up to v7), or, from v11 on (Mistral Small 3.2, Magistral, Devstral),
  `[TOOL_CALLS]N[ARGS]{...}` once per call (`[CALL_ID]id` before `[ARGS]` where the template
  writes one); which of the two follows each `[TOOL_CALLS]` is read from its first character.
"arguments" and "parameters" are taken in every format, as an object or as JSON text of one
(some fine-tunes write it so); absent, they are {}. Other keys (Mistral's "id") are ignored.

`ToolCallReader` reads one choice's text as it streams; an answer read whole is the same reader
fed everything at once, so streamed and unstreamed answers agree by construction:
- Text before the first call is content, as it comes, less its trailing whitespace (held back
  until something other than whitespace or a marker follows). Text that could be the start of
  a marker (`<tool_`) is held until it cannot, so markup never leaks into content.
- A call is given out when its block is complete (closing tag, closing bracket) and valid: JSON
  that parses, an object naming one of the request's functions, arguments an object.
- Until the first call is given out, a block that turns out invalid (bad JSON, an unknown
  function, markup cut off by the end of the text) makes the whole output text: everything
  held comes out as content, and no more calls are read. Once a call is given out it cannot be
  taken back (streamed, the client has it): whatever follows that is not a further valid call
  (trailing text, a bad block, one cut off by max_tokens) is dropped, as vLLM drops it.
- parallel=False (parallel_tool_calls false): the first call only, the rest dropped.
- A hermes block whose JSON is whole but whose closing tag never came is still a call when the
  text ended with "stop" (the model's end of turn, or a stop string such as "</tool_call>").
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection

from services.inference.tool_format import FORMATS

#: One call: (function name, arguments as compact JSON text of an object).
Call = tuple[str, str]
PYTHON_TAG = "<|python_tag|>"
#: format -> (marker opening a block, tag closing it after its JSON, the JSON's opening bracket).
SYNTAX = {"hermes": ("<tool_call>", "</tool_call>", "{"), "mistral": ("[TOOL_CALLS]", "", "["),
          "llama3_json": ("", "", "{")}
assert set(SYNTAX) == set(FORMATS)
#: Mistral v11's markers inside a call: `[TOOL_CALLS]name[CALL_ID]id[ARGS]{...}`.
ARGS, CALL_ID = "[ARGS]", "[CALL_ID]"
#: A v11 call's head so far (a function name, perhaps its call id), before `[ARGS]`.
_V11_HEAD = re.compile(r"\s*[A-Za-z0-9_.\-]*(?:\[CALL_ID\][A-Za-z0-9_\-]*)?")


class ToolCallReader:
    """One choice's text in, content and calls out (see the module docstring)."""

    def __init__(self, fmt: str, names: Collection[str], parallel: bool = True) -> None:
        self.start, self.end, self.opener = SYNTAX[fmt]
        self.names, self.parallel = frozenset(names), parallel
        #: text, block, between (after a call), lead (llama3_json's first characters), plain, dropped
        self.state = "text" if self.start else "lead"
        self.held = ""  # read, not yet given out nor dropped
        self.block: _JsonExtent | None = None
        self.calls = 0  # given out so far

    def feed(self, text: str) -> tuple[str, list[Call]]:
        """(content to give out now, calls completed now); content comes before the calls."""
        self.held += text
        out: tuple[list[str], list[Call]] = ([], [])
        while self._step(out, final=None):
            pass
        return "".join(out[0]), out[1]

    def finish(self, finish_reason: str | None) -> tuple[str, list[Call]]:
        """At the end of the text: what is left, decided (finish_reason: "stop", "length")."""
        out: tuple[list[str], list[Call]] = ([], [])
        while self._step(out, final=finish_reason or "length"):
            pass
        if self.state in ("text", "lead", "plain"):
            out[0].append(self.held)
        self.held, self.state = "", "dropped"
        return "".join(out[0]), out[1]

    def _step(self, out, final: str | None) -> bool:
        """Moves on as far as the text held allows; True when it changed state (step again)."""
        if self.state == "plain":
            out[0].append(self.held)
            self.held = ""
        elif self.state == "dropped":
            self.held = ""
        elif self.state == "text":
            return self._text(out)
        elif self.state == "lead":
            return self._lead(out, final)
        elif self.state == "between":
            return self._between(final)
        elif self.state == "block":
            return self._block(out, final)
        return False

    def _text(self, out) -> bool:
        found = self.held.find(self.start)
        if found < 0:  # give out what cannot be a marker's start, nor whitespace before one
            keep = next((k for k in range(min(len(self.start) - 1, len(self.held)), 0, -1)
                         if self.held.endswith(self.start[:k])), 0)
            cut = len(self.held[:len(self.held) - keep].rstrip())
            out[0].append(self.held[:cut])
            self.held = self.held[cut:]
            return False
        content = self.held[:found].rstrip()
        out[0].append(content)
        self.held = self.held[len(content):]  # the whitespace stays held: it is content if no call follows
        self._open_block(found - len(content) + len(self.start))
        return True

    def _lead(self, out, final: str | None) -> bool:
        rest = self.held.lstrip()
        offset = len(self.held) - len(rest)
        if rest.startswith(PYTHON_TAG):
            self._open_block(offset + len(PYTHON_TAG))
        elif rest.startswith(self.opener):
            self._open_block(offset)
        elif PYTHON_TAG.startswith(rest) and final is None:
            return False  # could still be the tag (or only whitespace so far)
        else:
            self.state = "plain"
        return True

    def _between(self, final: str | None) -> bool:
        rest = self.held.lstrip()
        offset = len(self.held) - len(rest)
        opens = self.start or ";"  # llama3_json separates its objects with ";"
        if rest.startswith(opens):
            self._open_block(offset + len(opens))
            return True
        if final is None and opens.startswith(rest):
            return False
        self.state = "dropped"
        return True

    def _open_block(self, at: int) -> None:
        self.state, self.block_at = "block", at
        self.block = None if self.start == "[TOOL_CALLS]" else _JsonExtent(self.opener, at)

    def _block(self, out, final: str | None) -> bool:
        if self.block is None:  # Mistral: an array (up to v7) or `name[ARGS]{...}` (v11)
            rest = self.held[self.block_at:].lstrip()
            if not rest and final is None:
                return False
            self.block = (_JsonExtent("[", self.block_at) if rest.startswith("[") and not rest.startswith(CALL_ID)
                          else _NamedCallExtent(self.block_at))
        block = self.block
        end = block.scan(self.held)
        if end is None and final is None:
            return False
        closed = end
        if end is not None and self.end:  # whitespace, then the closing tag
            rest = self.held[end:].lstrip()
            if rest.startswith(self.end):
                closed = len(self.held) - len(rest) + len(self.end)
            elif self.end.startswith(rest) and final is None:
                return False
            elif not (self.end.startswith(rest) and final == "stop"):  # see the docstring on stop
                closed = None
        calls = block.calls(self.held, end, self.names) if closed is not None else None
        if calls is None:
            if self.calls:
                self.state = "dropped"
            else:  # the first block is no call: all of it is text
                self.state = "plain"
            return True
        if not self.parallel:
            calls = calls[:1]
        out[1].extend(calls)
        self.calls += len(calls)
        self.held = self.held[closed:]
        self.state = "between" if self.parallel else "dropped"
        return True


class _JsonExtent:
    """Finds where one JSON object or array ends in text that grows, without parsing it: brackets
    counted outside strings (a `}` or a closing tag inside a string is text). Resumes where it
    stopped, so a long call costs one pass in all."""

    def __init__(self, opener: str, at: int) -> None:
        self.opener, self.pos = opener, at
        self.begin = -1  # where the value starts, once its opening bracket is seen
        self.depth, self.in_string, self.escaped = 0, False, False
        self.end: int | None = None
        self.bad = False

    def scan(self, text: str) -> int | None:
        """The index just past the value, None while it is incomplete or when it is no value
        (`bad`: its first character is not the opening bracket; the caller sees it as incomplete
        until the end, then as invalid: fine, since it then parses as no call either)."""
        if self.end is not None or self.bad:
            return self.end
        if self.begin < 0:
            while self.pos < len(text) and text[self.pos].isspace():
                self.pos += 1
            if self.pos == len(text):
                return None
            if text[self.pos] != self.opener:
                self.bad = True
                self.end = self.begin = self.pos  # an empty "value": parses as no call
                return self.end
            self.begin = self.pos
        for index in range(self.pos, len(text)):
            char = text[index]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    self.end = index + 1
                    return self.end
        self.pos = len(text)
        return None

    def calls(self, text: str, end: int, names: frozenset[str]) -> list[Call] | None:
        return _calls(text[self.begin:end], names, self.opener)


class _NamedCallExtent:
    """One Mistral v11 call, `name[ARGS]{...}` (perhaps `name[CALL_ID]id[ARGS]{...}`): the head
    up to `[ARGS]`, then the arguments' JSON object, found as _JsonExtent finds it. A head that
    cannot become one (a space in the name, other markup) is no call at once, as a bad first
    bracket is."""

    def __init__(self, at: int) -> None:
        self.pos, self.name = at, ""
        self.arguments: _JsonExtent | None = None
        self.end: int | None = None

    def scan(self, text: str) -> int | None:
        if self.end is not None:
            return self.end
        if self.arguments is None:
            found = text.find(ARGS, self.pos)
            head = text[self.pos:] if found < 0 else text[self.pos:found]
            partial = _V11_HEAD.match(head).end()
            tail = head[partial:]
            if found < 0 and (not tail or ARGS.startswith(tail) or CALL_ID.startswith(tail)):
                return None  # still the head
            if tail or not head.strip():
                self.end = self.pos  # no call: parses as none
                return self.end
            self.name = head.strip().split(CALL_ID)[0]
            self.arguments = _JsonExtent("{", found + len(ARGS))
        end = self.arguments.scan(text)
        if end is not None:
            self.end = end
        return end

    def calls(self, text: str, end: int, names: frozenset[str]) -> list[Call] | None:
        if self.arguments is None or self.arguments.bad:
            return None
        try:
            arguments = json.loads(text[self.arguments.begin:end])
        except (ValueError, RecursionError):
            return None
        call = _call({"name": self.name, "arguments": arguments}, names)
        return None if call is None else [call]


def _calls(text: str, names: frozenset[str], opener: str) -> list[Call] | None:
    """The calls a block's JSON makes, None unless it is valid (see the module docstring)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    items = value if opener == "[" else [value]
    if not isinstance(items, list) or not items:
        return None
    calls = [_call(item, names) for item in items]
    return None if None in calls else calls


def _call(item, names: frozenset[str]) -> Call | None:
    if not isinstance(item, dict) or item.get("name") not in names:
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):
            return None
    if not isinstance(arguments, dict):
        return None
    try:
        return item["name"], json.dumps(arguments, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    except ValueError:  # NaN, Infinity: not JSON a client can parse
        return None


def read_calls(fmt: str, names: Collection[str], text: str, finish_reason: str | None,
               parallel: bool = True) -> tuple[str, list[Call]]:
    """A whole text's content and calls (its content is the text itself when there are none)."""
    reader = ToolCallReader(fmt, names, parallel)
    content, calls = reader.feed(text)
    rest, more = reader.finish(finish_reason)
    return content + rest, calls + more
