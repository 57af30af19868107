"""OpenAI function calling: tool_choice "auto", "required", a named function, or "none".

"required" and a named function are guaranteed: the calls are generated under a JSON schema
(grammar-constrained decoding on the node, as vLLM does for these two choices), so the text
*is* the calls, guaranteed to parse and to match each function's parameters:
- a named function ({"type": "function", "function": {"name": X}}): the text is X's arguments
  object, nothing else (no name or wrapper for the model to spend tokens on);
- "required": the text is an array of calls [{"name": N, "arguments": {...}}, ...], each
  item one of the tools (anyOf); one or more calls, exactly one with parallel_tool_calls false.
"auto" (OpenAI's default when tools are given) leaves the choice between text and calls to the
model, as production servers do: it generates freely, with the tools shown by its chat
template, and its text is read for calls in its family's own format (tool_parsers.py: hermes,
llama3_json, mistral). The node says which format its model writes (GenerationDelta's
tool_call_format, on the first delta of a stream with tools: it reads it from the chat
template, or an operator sets it with --tool-call-format). A model without a known format
answers text only: the tools were shown to it, but nothing it writes is read as a call (no
400: a caller cannot know in advance which models can call tools, and "auto" allows text).
Nothing guarantees the arguments match the parameters; they are JSON objects, for a function
of the request. parallel_tool_calls false keeps the first call only.
"none" is plain generation, the tools neither shown to the model nor called.

The definitions reach the chat template (`tools=`) for every choice but "none", so a model
trained on tool use sees them as it was trained to; a template without tool support ignores
them, the grammar still holds. A function without `parameters` takes none (OpenAI: "an empty
parameter list"), so its arguments are {}; `strict` is taken either way (for "required" and a
named function the schema is always enforced).

Answers: `tool_calls` (ids call_..., arguments as compact JSON text); `content` is null, or with
"auto" the text the model wrote before its calls. finish_reason is what OpenAI answers (vLLM
matches it, vllm-project/vllm#25054): "tool_calls" for "required" and for "auto" when calls were
read, "stop" for a named function. Text cut short (max_tokens, a stop string) is incomplete
JSON: it comes back as `content`, with no tool_calls and the finish_reason that ended it ("auto":
a call cut short is text unless a call before it was already given out, see tool_parsers.py).
Streamed, every choice gives the same answer as unstreamed, in chunks: content as it comes
(with "auto", less anything that may be call markup), each call in one chunk once read whole
("required" and named: at the end, as their JSON parses only once whole).
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

from services.router.openai_messages import bad_param, flag
from services.router.openai_response_format import named_object, schema_text
from services.router.tool_parsers import FORMATS, ToolCallReader

#: OpenAI's limit on tools per request.
MAX_TOOLS = 128
#: Each key of a function definition, with the JSON type OpenAI gives it.
FUNCTION_KEYS = {"name": str, "description": str, "parameters": dict, "strict": bool}
#: What a function without `parameters` takes: nothing.
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
CHOICES = ("none", "auto", "required")


@dataclasses.dataclass(frozen=True)
class ToolUse:
    """A request whose answer may be tool calls."""

    #: The tool definitions as JSON text, for the chat template.
    tools_json: str
    #: The JSON schema the answer's text matches (see the module docstring); "" for "auto".
    schema: str = ""
    #: The function tool_choice names (the text is its arguments); None: an array of calls.
    named: str | None = None
    #: "auto": the functions a call may name, and parallel_tool_calls.
    names: tuple[str, ...] = ()
    parallel: bool = True

    def stream(self, fmt: str = "") -> ChoiceCalls:
        """One choice's reading, for the node's tool-call format `fmt` (used by "auto" only)."""
        return ChoiceCalls(self, ToolCallReader(fmt, self.names, self.parallel)
                           if not self.schema and fmt in FORMATS else None)

    def answer(self, text: str, finish_reason: str | None, fmt: str = "") -> tuple[dict, str | None]:
        """The assistant message's fields and the finish_reason, for one choice's whole text:
        what its stream gives, added up (by the reader every API uses, which imports this one)."""
        from services.router.choice_reader import ChoiceReader

        return ChoiceReader(self, fmt).answer(text, finish_reason)

    def schema_calls(self, text: str) -> list[dict] | None:
        """"required" and named: the calls the whole text makes, None unless it is whole."""
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):  # a stop string cut it
            return None
        if self.named:  # the text is the arguments, as generated
            return [_call(self.named, text)] if isinstance(value, dict) else None
        if not isinstance(value, list) or not all(isinstance(item, dict) and isinstance(item.get("name"), str)
                                                  and isinstance(item.get("arguments"), dict) for item in value):
            return None  # the grammar allows nothing else: only a matcher stopped by a limit gets here
        try:
            return [_call(item["name"], _compact(item["arguments"])) for item in value]
        except ValueError:  # a number beyond a float's range (1e999) would come back as Infinity
            return None


class ChoiceCalls:
    """One choice's text in (as it streams), its chat deltas out: {"content": ...} and
    {"tool_calls": [{"index", "id", "type", "function"}]}, in order."""

    def __init__(self, use: ToolUse, reader: ToolCallReader | None) -> None:
        self.use, self.reader = use, reader
        self.held: list[str] = []  # "required" and named: the whole text, parsed at the end
        self.count = 0

    def feed(self, text: str) -> list[dict]:
        if self.use.schema:
            self.held.append(text)
            return []
        if self.reader is None:  # "auto" for a model without a known format: text only
            return [{"content": text}] if text else []
        return self._deltas(*self.reader.feed(text))

    def finish(self, finish_reason: str | None) -> tuple[list[dict], str | None]:
        """The last deltas and the choice's finish_reason."""
        if self.use.schema:
            text = "".join(self.held)
            calls = self.use.schema_calls(text) if finish_reason == "stop" else None
            if calls is None:  # cut short: the JSON is incomplete
                return ([{"content": text}] if text else []), finish_reason
            return self._deltas("", calls), "stop" if self.use.named else "tool_calls"
        if self.reader is None:
            return [], finish_reason
        deltas = self._deltas(*self.reader.finish(finish_reason))
        return deltas, "tool_calls" if self.count else finish_reason

    def _deltas(self, content: str, calls: list) -> list[dict]:
        deltas = [{"content": content}] if content else []
        for call in calls:
            if isinstance(call, tuple):
                call = _call(*call)
            deltas.append({"tool_calls": [{"index": self.count, **call}]})
            self.count += 1
        return deltas


def tool_use(body: dict) -> ToolUse | None:
    """The request's tool calling, None without it (no tools, or tool_choice "none"); a 400
    naming the parameter at fault for anything malformed or that cannot be honoured."""
    parallel = flag(body, "parallel_tool_calls", default=True)
    tools = body.get("tools")
    choice = body.get("tool_choice", "auto" if tools else "none")
    if tools is None:
        if choice != "none":
            raise bad_param("tool_choice", "only allowed when tools are given")
        return None
    functions = _functions(tools)
    tools_json = json.dumps([{"type": "function", "function": function} for function in functions.values()],
                            ensure_ascii=False)
    if choice == "auto":
        return ToolUse(tools_json, names=tuple(functions), parallel=parallel)
    named = _named(choice, functions)
    if named is None:
        return None
    if named:
        return ToolUse(tools_json, schema_text(functions[named]["parameters"], "tools"), named)
    calls = [_call_schema(name, k) for k, name in enumerate(functions)]
    schema = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1,
              **({} if parallel else {"maxItems": 1}),
              "$defs": {f"tool_{k}": _rooted(function["parameters"], f"#/$defs/tool_{k}")
                        for k, function in enumerate(functions.values())}}
    return ToolUse(tools_json, schema_text(schema, "tools"))


def _named(choice: Any, functions: dict[str, dict]) -> str | None:
    """The function the choice names, "" for "required", None for "none"."""
    if choice in ("none", "required"):
        return None if choice == "none" else ""
    if not isinstance(choice, dict) or choice.get("type") != "function" or set(choice) != {"type", "function"}:
        raise bad_param("tool_choice", f"expected one of {', '.join(CHOICES)} or {{'type': 'function', 'function': "
                                       f"{{'name': ...}}}}, got {choice!r}"[:300])
    function = choice["function"]
    if not isinstance(function, dict) or set(function) != {"name"} or function["name"] not in functions:
        raise bad_param("tool_choice", f"names no function among tools ({', '.join(functions)}): {function!r}"[:300])
    return function["name"]


def _functions(tools: Any) -> dict[str, dict]:
    """Name -> the function's definition, as the template gets it (parameters filled in)."""
    if not isinstance(tools, list) or not 1 <= len(tools) <= MAX_TOOLS:
        raise bad_param("tools", f"expected a list of 1 to {MAX_TOOLS} tools")
    functions = {}
    for index, tool in enumerate(tools):
        where = f"tools[{index}]"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise bad_param(f"{where}.type", "only function tools are supported: {'type': 'function', 'function': "
                                             "{...}}")
        unknown = sorted(key for key, value in tool.items() if key not in ("type", "function") and value is not None)
        if unknown:
            raise bad_param(f"{where}.{unknown[0]}", f"unrecognized key: {', '.join(unknown)}")
        function = _function(tool.get("function"), f"{where}.function")
        if function["name"] in functions:  # a call names its function: two alike would be ambiguous
            raise bad_param(f"{where}.function.name", f"two tools are named {function['name']!r}")
        functions[function["name"]] = function
    return functions


def _function(function: Any, where: str) -> dict:
    present = named_object(function, where, FUNCTION_KEYS, "expected an object with a name")
    parameters = present.get("parameters", NO_PARAMETERS)
    if parameters.get("type", "object") != "object":  # arguments are an object, in OpenAI's calls and templates
        raise bad_param(f"{where}.parameters", f"must be a schema of type 'object', got {parameters['type']!r}"[:200])
    definition = {"name": present["name"], "description": present.get("description"),
                  "parameters": {"type": "object", **parameters}}
    return {key: value for key, value in definition.items() if value is not None}


def _call_schema(name: str, index: int) -> dict:
    return {"type": "object", "properties": {"name": {"const": name}, "arguments": {"$ref": f"#/$defs/tool_{index}"}},
            "required": ["name", "arguments"], "additionalProperties": False}


def _rooted(schema: Any, at: str) -> Any:
    """A copy of `schema` to live at the JSON pointer `at` of a larger schema: its references
    within itself ("#", "#/$defs/X") are made to point inside `at` (a pydantic model's nested
    models are $defs of its own root)."""
    try:
        return _rebased(schema, at)
    except RecursionError:
        raise bad_param("tools", "a parameters schema is nested too deeply") from None


def _rebased(value: Any, at: str) -> Any:
    if isinstance(value, list):
        return [_rebased(item, at) for item in value]
    if not isinstance(value, dict):
        return value
    copy = {key: _rebased(item, at) for key, item in value.items()}
    ref = value.get("$ref")
    if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
        copy["$ref"] = at + ref[1:]
    return copy


def _call(name: str, arguments: str) -> dict:
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
