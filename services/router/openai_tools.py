"""OpenAI function calling, where it can be guaranteed: tool_choice "required" or a named function.

Telling a tool call from text in free output takes a parser for each model family's call
format (vLLM's --tool-call-parser). Instead the calls are generated under a JSON schema
(grammar-constrained decoding on the node, as vLLM does for these two choices), so the text
*is* the calls, guaranteed to parse and to match each function's parameters:
- a named function ({"type": "function", "function": {"name": X}}): the text is X's arguments
  object, nothing else (no name or wrapper for the model to spend tokens on);
- "required": the text is an array of calls [{"name": N, "arguments": {...}}, ...], each
  item one of the tools (anyOf); one or more calls, exactly one with parallel_tool_calls false.
- "none": plain generation, the tools neither shown to the model nor called;
- "auto" (OpenAI's default when tools are given) is refused: choosing between text and a call
  is the model's, and reading its choice back needs that per-model parser.
The definitions also reach the chat template (`tools=`), so a model trained on tool use sees
them as it was trained to; a template without tool support ignores them, the grammar still
holds. A function without `parameters` takes none (OpenAI: "an empty parameter list"), so
its arguments are {}; `strict` is taken either way (the schema is always enforced).

Answers: the text parsed into OpenAI's `tool_calls`, `content` null. finish_reason is what
OpenAI answers (vLLM matches it, vllm-project/vllm#25054): "tool_calls" for "required", "stop"
for a named function. Text cut short (max_tokens, a stop string) is incomplete JSON: it comes
back as `content`, with no tool_calls and the finish_reason that ended it.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Any

from services.router.openai_messages import bad_param, flag
from services.router.openai_response_format import named_object, schema_text

#: OpenAI's limit on tools per request.
MAX_TOOLS = 128
#: Each key of a function definition, with the JSON type OpenAI gives it.
FUNCTION_KEYS = {"name": str, "description": str, "parameters": dict, "strict": bool}
#: What a function without `parameters` takes: nothing.
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
CHOICES = ("none", "auto", "required")


@dataclasses.dataclass(frozen=True)
class ToolUse:
    """A request whose answer is tool calls."""

    #: The tool definitions as JSON text, for the chat template.
    tools_json: str
    #: The JSON schema the answer's text matches (see the module docstring).
    schema: str
    #: The function tool_choice names (the text is its arguments); None: an array of calls.
    named: str | None = None

    def answer(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The assistant message's fields and the finish_reason, for one choice's whole text."""
        calls = self._calls(text) if finish_reason == "stop" else None
        if calls is None:  # cut short: the JSON is incomplete
            return {"content": text}, finish_reason
        return {"content": None, "tool_calls": calls}, "stop" if self.named else "tool_calls"

    def _calls(self, text: str) -> list[dict] | None:
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


def tool_call_deltas(message: dict) -> list[dict]:
    """A streamed answer's tool calls: one delta per call, whole (id, name and all its arguments)."""
    return [{"tool_calls": [{"index": index, **call}]} for index, call in enumerate(message.get("tool_calls", []))]


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
    named = _named(choice, functions)
    if named is None:
        return None
    tools_json = json.dumps([{"type": "function", "function": function} for function in functions.values()],
                            ensure_ascii=False)
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
    if choice == "auto":
        raise bad_param("tool_choice", "'auto' (the default when tools are given) is not supported: telling a call "
                                       "from text needs a parser for each model's format. Use 'required' (one or "
                                       "more calls), name a function ({'type': 'function', 'function': {'name': "
                                       "...}}), or 'none'")
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
