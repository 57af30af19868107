"""OpenAI's Responses API (`POST /v1/responses`) request -> the chat path's GenerateCall.

A Responses request is a chat request in other words: `instructions` and the `input` items are
the conversation, `text.format` is chat's response_format, flat function tools
(`{type, name, parameters}`) are chat's nested ones, `max_output_tokens` is
max_completion_tokens. So the body is rewritten into a chat body and handed to
openai_schema.chat_call: both APIs validate, sample, constrain output and call tools alike, on
the same node path (chat template, tenant auth, quotas, placement, usage metrics). A 400 that
chat raises is renamed to what this caller sent (`input[2].arguments`, `text.format.name`,
`tools[0].parameters`); what only the Responses API has is checked here.

Input items: messages (`role` user, assistant, system or developer; `content` text or text
parts), `function_call` items (an assistant's calls: consecutive ones, and those right after an
assistant message, are one assistant turn, as chat has them) and `function_call_output` items
(tool turns, answering a call made earlier in `input`). Items replayed from an earlier
response's `output` are taken as they are (their ids and statuses change nothing the model
sees); so are `reasoning` items, which are left out (chat templates drop earlier turns' thinking
too). Anything else (images, files, item references) is a 400 naming the item.

Responses are not stored: every response is as with `store: false` (`store: true` is accepted
and changes nothing), so `previous_response_id`, `conversation` and `background` are 400s that
say so, and GET /v1/responses/{id} is a 404. Features of OpenAI's we do not serve are 400s naming
the parameter, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from services.common import errors
from services.router import openai_schema as schema
from services.router.openai_messages import bad_param
from services.router.proxy import GenerateCall

NOT_STORED = "responses are not stored on this server (every response is as with store: false)"
NO_EARLIER = f"{NOT_STORED}, so there is no earlier response to refer to: send the whole conversation in `input`"
#: Passed to chat as they are (chat checks them); vLLM's extensions as chat takes them.
AS_IN_CHAT = set(schema.NO_OP_FIELDS) | {"model", "temperature", "top_p", "stream", "stream_options",
                                         "parallel_tool_calls", "top_k", "ignore_eos", "repetition_penalty",
                                         "chat_template_kwargs"}
#: Defined by OpenAI, not served here: each refused (with why) unless null or its "off" value.
REFUSED = {"previous_response_id": NO_EARLIER, "conversation": NO_EARLIER,
           "background": "background responses are not supported (they must be stored to be retrieved)",
           "prompt": "stored prompt templates are not supported: send the text in `instructions` and `input`",
           "truncation": "only 'disabled' is supported: an input too long for the context is a 400",
           "reasoning": "reasoning effort and summaries cannot be set: a model that thinks always does (its "
                        "thinking comes as a reasoning item)",
           "max_tool_calls": "not supported: use parallel_tool_calls false for at most one call",
           "context_management": "context management is not supported", "moderation": "moderation is not supported",
           "access_programs": "not supported", "image": "image output is not supported",
           "background_options": "background responses are not supported"}
OFF = {"background": False, "truncation": "disabled"}
FIELDS = AS_IN_CHAT | set(REFUSED) | {"input", "instructions", "max_output_tokens", "text", "tools", "tool_choice",
                                      "include", "top_logprobs"}
#: What `include` may ask for: each token's logprob on the answer's text; and reasoning items'
#: encrypted content, which agents ask for with store false: there is none here to include (the
#: thinking is in the item as text), so asking is answered by the items as they are.
LOGPROBS = "message.output_text.logprobs"
INCLUDABLE = (LOGPROBS, "reasoning.encrypted_content")
#: Chat's names for what this API names otherwise, for its errors (longest prefix wins).
CHAT_NAMES = {"messages": "input", "max_completion_tokens": "max_output_tokens", "response_format": "text.format",
              "response_format.json_schema": "text.format"}
#: Each input item's keys; those beyond type and its content change nothing the model sees.
ITEM_KEYS = {"message": {"type", "role", "content", "id", "status", "phase"},
             "function_call": {"type", "call_id", "name", "arguments", "id", "status"},
             "function_call_output": {"type", "call_id", "output", "id", "status"},
             "reasoning": {"type", "id", "summary", "content", "encrypted_content", "status"}}
ROLES = ("user", "assistant", "system", "developer")
#: Text content parts: what a caller writes, and what a replayed assistant output holds.
TEXT_PART_KEYS = {"input_text": {"type", "text", "prompt_cache_breakpoint"},
                  "output_text": {"type", "text", "annotations", "logprobs"}}


@dataclasses.dataclass(frozen=True)
class ResponseOptions(schema.Options):
    #: The request's settings that the response object repeats, as OpenAI's does.
    settings: dict = dataclasses.field(default_factory=dict)


def responses_call(body: dict) -> tuple[GenerateCall, ResponseOptions]:
    """The chat call a Responses body asks for; a 400 naming the parameter for anything malformed,
    unknown, or that this server cannot honour."""
    body = {key: value for key, value in body.items() if value is not None}  # null is unset, as OpenAI reads it
    unknown = sorted(set(body) - FIELDS)
    if unknown:
        raise bad_param(unknown[0], f"unrecognized request argument (not part of this API): {', '.join(unknown)}")
    for field, why in REFUSED.items():
        if field in body and body[field] != OFF.get(field, object()):
            raise bad_param(field, why)
    chat = {key: body[key] for key in AS_IN_CHAT if key in body}
    paths = dict(CHAT_NAMES)  # chat's parameter paths -> ours, filled in as the body is rewritten
    chat["messages"] = _conversation(body.get("instructions"), body.get("input"), paths)
    chat.update(_logprobs(body))
    if "max_output_tokens" in body:
        chat["max_completion_tokens"] = body["max_output_tokens"]
    if "text" in body:
        chat["response_format"] = _response_format(body["text"])
    tools = body.get("tools", [])
    if tools != []:  # OpenAI's default: none, which chat spells by leaving tools out
        chat["tools"] = _nested_tools(tools, paths)
    if "tool_choice" in body and (tools or body["tool_choice"] not in ("auto", "none")):
        chat["tool_choice"] = _nested_tool_choice(body["tool_choice"])
    try:
        call, options = schema.chat_call(chat)
    except errors.InvalidArgument as error:
        raise _in_our_terms(error, paths) from None
    fields = {field.name: getattr(options, field.name) for field in dataclasses.fields(options)}
    fields.update(max_tokens_param="max_output_tokens",
                  structured_output_param="tools" if options.tool_use else "text.format")
    return call, ResponseOptions(**fields, settings=_settings(body))


def not_stored(response_id: str) -> errors.NotFound:
    """What GET (or DELETE) /v1/responses/{id} answers: there is nothing to find."""
    return errors.NotFound(f"response {response_id[:100]!r} not found: {NOT_STORED}, so none can be retrieved or "
                           "deleted", reason="RESPONSE_NOT_STORED", field="response_id")


def _conversation(instructions: Any, items: Any, paths: dict[str, str]) -> list[dict]:
    """Chat's messages: `instructions` as the system turn first, then `input`'s items."""
    messages: list[dict] = []
    if instructions is not None:
        if not isinstance(instructions, str):
            raise bad_param("instructions", f"expected a string, got {instructions!r}"[:200])
        paths.update({"messages[0]": "instructions", "messages[0].content": "instructions"})
        messages.append({"role": "system", "content": instructions})
    if isinstance(items, str):
        paths[f"messages[{len(messages)}]"] = "input"
        return [*messages, {"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise bad_param("input", "expected a string or a non-empty list of items (messages, function_call, "
                                 "function_call_output)")
    call_ids: set[str] = set()  # of the calls made so far: what a function_call_output may answer
    for index, item in enumerate(items):
        where = f"input[{index}]"
        kind = _item_kind(item, where)
        at = f"messages[{len(messages)}]"
        if kind == "reasoning":
            continue  # an earlier answer's thinking, replayed: chat templates leave old thinking out too
        if kind == "message":
            paths[at] = where
            messages.append({"role": item["role"], "content": _text(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            if not (messages and messages[-1]["role"] == "assistant"):
                messages.append({"role": "assistant", "content": None})
            turn = messages[-1]
            turn.setdefault("tool_calls", [])
            call = f"messages[{len(messages) - 1}].tool_calls[{len(turn['tool_calls'])}]"
            paths.update({call: where, f"{call}.id": f"{where}.call_id", f"{call}.function": where,
                          f"{call}.function.name": f"{where}.name", f"{call}.function.arguments": f"{where}.arguments"})
            turn["tool_calls"].append({"id": item.get("call_id"), "type": "function",
                                       "function": {"name": item.get("name"), "arguments": item.get("arguments")}})
            call_ids.add(str(item.get("call_id")))  # one that is no string is chat's 400, by its path
        else:
            if not isinstance(item.get("call_id"), str) or item["call_id"] not in call_ids:
                raise bad_param(f"{where}.call_id", "a function_call_output answers a function_call earlier in "
                                                    "input: its call_id must be one of theirs")
            paths.update({at: where, f"{at}.content": f"{where}.output"})
            messages.append({"role": "tool", "tool_call_id": item["call_id"],
                             "content": _text(item.get("output"), f"{where}.output")})
    return messages


def _item_kind(item: Any, where: str) -> str:
    """An input item's type (a message may leave it out), its keys checked."""
    if not isinstance(item, dict):
        raise bad_param(where, f"expected an input item (an object), got {item!r}"[:200])
    item = {key: value for key, value in item.items() if value is not None}
    kind = item.get("type", "message" if "role" in item else None)
    if not isinstance(kind, str) or kind not in ITEM_KEYS:
        raise bad_param(f"{where}.type", f"unsupported input item type {kind!r}: only messages (text), function_call, "
                                         f"function_call_output and reasoning items are supported"[:300])
    unknown = sorted(set(item) - ITEM_KEYS[kind])
    if unknown:
        raise bad_param(f"{where}.{unknown[0]}", f"unrecognized key for a {kind} item: {', '.join(unknown)}")
    if kind == "message" and item.get("role") not in ROLES:
        raise bad_param(f"{where}.role", f"must be one of {', '.join(ROLES)}, got {item.get('role')!r}"[:200])
    return kind


def _text(content: Any, where: str) -> str:
    """A message's content (or a call's output) as the text the model sees."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_param(where, "expected a string or a list of text parts")
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str) or kind not in TEXT_PART_KEYS:
            raise bad_param(f"{where}[{index}].type", f"only text parts ({', '.join(TEXT_PART_KEYS)}) are "
                                                      f"supported, got {kind!r}"[:200])
        unknown = sorted(key for key, value in part.items() if key not in TEXT_PART_KEYS[kind] and value is not None)
        if unknown:
            raise bad_param(f"{where}[{index}].{unknown[0]}", f"unrecognized key for {kind}: {', '.join(unknown)}")
        if not isinstance(part.get("text"), str):
            raise bad_param(f"{where}[{index}].text", "required: a string")
        texts.append(part["text"])
    return "".join(texts)


def _response_format(text: Any) -> Any:
    """`text: {format}` -> chat's response_format: json_schema's keys sit one level up here."""
    if not isinstance(text, dict):
        raise bad_param("text", "expected an object with a format")
    text = {key: value for key, value in text.items() if value is not None}
    unknown = sorted(set(text) - {"format", "verbosity"})
    if unknown:
        raise bad_param(f"text.{unknown[0]}", f"unrecognized key: {', '.join(unknown)}")
    if "verbosity" in text:
        raise bad_param("text.verbosity", "verbosity is not supported")
    form = text.get("format")
    if isinstance(form, dict) and form.get("type") == "json_schema":
        return {"type": "json_schema", "json_schema": {key: value for key, value in form.items() if key != "type"}}
    return form


def _nested_tools(tools: Any, paths: dict[str, str]) -> Any:
    """Flat function tools -> chat's {type, function: {...}}; other kinds are not served."""
    if not isinstance(tools, list):
        return tools  # chat's 400 says what it must be
    nested = []
    for index, tool in enumerate(tools):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise bad_param(f"tools[{index}].type", f"only function tools ({{'type': 'function', 'name': ..., "
                                                    f"'parameters': ...}}) are supported, got {kind!r}"[:200])
        paths[f"tools[{index}].function"] = f"tools[{index}]"
        nested.append({"type": "function", "function": {key: value for key, value in tool.items() if key != "type"}})
    return nested


def _nested_tool_choice(choice: Any) -> Any:
    if isinstance(choice, str) or (isinstance(choice, dict) and choice.get("type") == "function"
                                   and set(choice) == {"type", "name"}):
        return choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice["name"]}}
    raise bad_param("tool_choice", f"expected 'none', 'auto', 'required' or {{'type': 'function', 'name': ...}}, "
                                   f"got {choice!r}"[:300])


def _in_our_terms(error: errors.InvalidArgument, paths: dict[str, str]) -> errors.InvalidArgument:
    """Chat's 400 with `param` (and the message's opening) naming what this request sent: the
    longest of `paths` that the chat parameter starts with is swapped for ours."""
    field = error.metadata.get("field", "")
    ends = sorted({match.start() for match in re.finditer(r"[.\[]", field)} | {len(field)}, reverse=True)
    prefix = next((field[:end] for end in ends if field[:end] in paths), None)
    if prefix is None:
        return error
    ours = paths[prefix] + field[len(prefix):]
    message = error.message.removeprefix(f"'{field}': ")
    return errors.InvalidArgument(f"'{ours}': {message}", reason=error.reason, **{**error.metadata, "field": ours})


def _logprobs(body: dict) -> dict:
    """include [message.output_text.logprobs] and top_logprobs -> chat's logprobs and top_logprobs
    (asking for top_logprobs asks for logprobs too, as OpenAI reads it)."""
    include = body.get("include", [])
    if not isinstance(include, list) or any(item not in INCLUDABLE for item in include):
        raise bad_param("include", f"only {' and '.join(INCLUDABLE)} can be included (no sources or other extra "
                                   f"data here), got {include!r}"[:300])
    top = body.get("top_logprobs", 0)
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= schema.MAX_TOP_LOGPROBS:
        raise bad_param("top_logprobs", f"expected an integer from 0 to {schema.MAX_TOP_LOGPROBS}, got {top!r}"[:200])
    if LOGPROBS not in include and not top:
        return {}
    return {"logprobs": True, **({"top_logprobs": top} if top else {})}


def _settings(body: dict) -> dict:
    """The settings a response repeats, with OpenAI's defaults for those not sent."""
    return {"instructions": body.get("instructions"), "max_output_tokens": body.get("max_output_tokens"),
            "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
            "tools": body.get("tools", []), "tool_choice": body.get("tool_choice", "auto"),
            "parallel_tool_calls": body.get("parallel_tool_calls", True),
            "text": {"format": {"type": "text"}, **{key: value for key, value in body.get("text", {}).items()
                                                    if value is not None}},
            "metadata": body.get("metadata", {}),
            "user": body.get("user"), "previous_response_id": None, "reasoning": None, "truncation": "disabled",
            "background": False, "top_logprobs": body.get("top_logprobs", 0)}
