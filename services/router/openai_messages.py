"""Chat `messages` -> the node's ChatMessages, as its chat template takes them.

A turn reaches the node as a role, a text and, for tool use, an assistant's calls (id, name,
arguments) or the id of the call a tool turn answers. Every part of a message that would
change what the model sees and that we cannot pass on is refused with a 400 naming it, never
dropped: a participant `name` (OpenAI shows it to the model), an assistant's deprecated
`function_call`, `audio` or `refusal` (a conversation replayed from an audio exchange would
otherwise lose those turns' substance), non-text content parts. A key OpenAI does not define
for the role is refused as the body's unknown fields are. Null counts as absent, as for the
body's fields, so an SDK message object dumped with its unset fields (`tool_calls: None`,
`annotations: None`, ...) is accepted.

Tool use as OpenAI checks it: a call's arguments are JSON text of an object (the node hands
the template the object), and a tool turn answers a call an earlier assistant turn made.
"""

from __future__ import annotations

import json
from typing import Any

from services.common.errors import InvalidArgument
from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.inference.chat_template import template_kwargs

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
#: Keys OpenAI defines per role, beyond role and content.
EXTRA_KEYS = {"system": {"name"}, "developer": {"name"}, "user": {"name"},
              "assistant": {"name", "tool_calls", "function_call", "audio", "refusal"}, "tool": {"tool_call_id"}}
#: Defined keys we cannot pass to the node, and why (refused when set to anything but empty).
NOT_PASSED = {"name": "participant names are not supported (the turn would reach the model without it)",
              "function_call": "the deprecated function_call is not supported: use tool_calls",
              "audio": "audio is not supported", "refusal": "refusals in the conversation are not supported"}
#: The keys of an assistant's tool call, and of its `function`.
TOOL_CALL_KEYS, FUNCTION_KEYS = {"id", "type", "function"}, {"name", "arguments"}


def bad_param(field: str, message: str) -> InvalidArgument:
    """OpenAI's kind of 400: the message and `param` name the request's field."""
    return InvalidArgument(f"'{field}': {message}", field=field)


def flag(body: dict, field: str, default: bool = False) -> bool:
    """A boolean request field (`default` when absent); anything else is a 400 naming it."""
    value = body.get(field, default)
    if not isinstance(value, bool):
        raise bad_param(field, f"expected true or false, got {value!r}")
    return value


def chat_messages(messages: Any) -> gen.ChatMessages:
    if not isinstance(messages, list) or not messages:
        raise bad_param("messages", "expected a non-empty list of {role, content} objects")
    chat = gen.ChatMessages()
    call_ids: set[str] = set()  # of the calls made so far: what a tool turn may answer
    for index, message in enumerate(messages):
        turn = _turn(message, index, call_ids)
        call_ids.update(call.id for call in turn.tool_calls)
        chat.messages.append(turn)
    return chat


def _turn(message: Any, index: int, call_ids: set[str]) -> gen.ChatMessage:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_param(where, f"expected an object with role and content, got {message!r}")
    message = {key: value for key, value in message.items() if value is not None}
    role = message.get("role")
    if role not in ROLES:
        raise bad_param(f"{where}.role", f"must be one of {sorted(ROLES)}, got {role!r}")
    unknown = sorted(set(message) - {"role", "content"} - EXTRA_KEYS[role])
    if unknown:
        raise bad_param(f"{where}.{unknown[0]}", f"unrecognized key for a {role} message: {', '.join(unknown)}")
    for key, why in NOT_PASSED.items():
        if message.get(key) not in (None, "", []):  # empty carries nothing the model would see
            raise bad_param(f"{where}.{key}", why)
    turn = gen.ChatMessage(role=ROLES[role], content=_text(message.get("content"), where))
    turn.tool_calls.extend(_tool_call(call, f"{where}.tool_calls[{k}]")
                           for k, call in enumerate(_list(message.get("tool_calls", []), f"{where}.tool_calls")))
    if role == "tool":
        call_id = message.get("tool_call_id")
        if not isinstance(call_id, str) or call_id not in call_ids:
            raise bad_param(f"{where}.tool_call_id", "a tool message answers a call of an earlier assistant message: "
                                                     "its tool_call_id must be one of their tool_calls' ids")
        turn.tool_call_id = call_id
    return turn


def _tool_call(call: Any, where: str) -> gen.ToolCall:
    call = _object(call, where, TOOL_CALL_KEYS)
    if call.get("type") != "function":
        raise bad_param(f"{where}.type", f"must be 'function', got {call.get('type')!r}")
    function = _object(call.get("function"), f"{where}.function", FUNCTION_KEYS)
    for key, value in (("id", call.get("id")), ("function.name", function.get("name")),
                       ("function.arguments", function.get("arguments"))):
        if not isinstance(value, str) or not value:
            raise bad_param(f"{where}.{key}", f"required: a non-empty string, got {value!r}"[:200])
    try:
        arguments = json.loads(function["arguments"])
    except (ValueError, RecursionError):
        arguments = None
    if not isinstance(arguments, dict):  # the template gets the object: anything else has no place there
        raise bad_param(f"{where}.function.arguments", "must be JSON text of an object")
    return gen.ToolCall(id=call["id"], name=function["name"], arguments=function["arguments"])


def _object(value: Any, where: str, keys: set[str]) -> dict:
    if not isinstance(value, dict):
        raise bad_param(where, f"expected an object, got {value!r}"[:200])
    present = {key: item for key, item in value.items() if item is not None}
    unknown = sorted(set(present) - keys)
    if unknown:
        raise bad_param(f"{where}.{unknown[0]}", f"unrecognized key: {', '.join(unknown)}")
    return present


def _list(value: Any, where: str) -> list:
    if not isinstance(value, list):
        raise bad_param(where, f"expected a list, got {value!r}"[:200])
    return value


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_param(f"{where}.content", "only text content parts are supported")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        return ""
    raise bad_param(f"{where}.content", "expected a string or a list of text parts")


def template_kwargs_json(body: dict) -> str:
    """vLLM's chat_template_kwargs ({"enable_thinking": false} for Qwen3) as ChatMessages'
    template_kwargs_json, checked by the node's own rules here so the 400 names this param."""
    value = body.get("chat_template_kwargs")
    if value is None:
        return ""
    try:
        return json.dumps(template_kwargs(json.dumps(value)), separators=(",", ":"))
    except InvalidArgument as exc:
        raise bad_param("chat_template_kwargs", exc.message.removeprefix("messages.template_kwargs_json")
                        .lstrip(": ")) from None
