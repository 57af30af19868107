"""Chat `messages` -> (role, text) turns, as the node's chat template takes them.

A turn reaches the node as a role and a text, nothing else, so every part of a message that
would change what the model sees and that we cannot pass on is refused with a 400 naming it,
never dropped: a participant `name` (OpenAI shows it to the model), an assistant's
`tool_calls`, `function_call`, `audio` or `refusal` (a conversation replayed from a
tool-calling or audio exchange would otherwise lose those turns' substance), non-text content
parts. A key OpenAI does not define for the role is refused as the body's unknown fields are.
Null counts as absent, as for the body's fields, so an SDK message object dumped with its
unset fields (`tool_calls: None`, `annotations: None`, ...) is accepted.
"""

from __future__ import annotations

from typing import Any

from services.common.errors import InvalidArgument

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
#: Keys OpenAI defines per role, beyond role and content.
EXTRA_KEYS = {"system": {"name"}, "developer": {"name"}, "user": {"name"},
              "assistant": {"name", "tool_calls", "function_call", "audio", "refusal"}}
#: Defined keys we cannot pass to the node, and why (refused when set to anything but empty).
NOT_PASSED = {"name": "participant names are not supported (the turn would reach the model without it)",
              "tool_calls": "tool and function calling are not supported",
              "function_call": "tool and function calling are not supported",
              "audio": "audio is not supported", "refusal": "refusals in the conversation are not supported"}


def bad_param(field: str, message: str) -> InvalidArgument:
    """OpenAI's kind of 400: the message and `param` name the request's field."""
    return InvalidArgument(f"'{field}': {message}", field=field)


def chat_turns(messages: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        raise bad_param("messages", "expected a non-empty list of {role, content} objects")
    return tuple(_turn(message, i) for i, message in enumerate(messages))


def _turn(message: Any, index: int) -> tuple[str, str]:
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
    return ROLES[role], _text(message.get("content"), where)


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
