"""A conversation -> prompt token ids, with the tokenizer's chat template (no grpc here).

Turns are handed to the template in Hugging Face's chat format, tool use included:
an assistant turn's calls as `tool_calls: [{"type": "function", "id", "function": {"name",
"arguments": <object>}}]` (the arguments as an object, not JSON text: templates write them with
`tojson`), a tool turn as `{"role": "tool", "tool_call_id", "content"}`, and the tool
definitions as `tools=`. A template that knows nothing of tools renders what it knows (the
tool turns' content, say) and drops the rest; one that refuses a conversation (a role it does
not take, turns out of order) raises a TemplateError, which is the caller's 400, not a crash.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence

from jinja2 import TemplateError

from services.common.errors import InvalidArgument

ROLES = ("system", "user", "assistant", "tool")


@dataclasses.dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    #: JSON text of an object.
    arguments: str


@dataclasses.dataclass(frozen=True)
class ChatTurn:
    role: str
    content: str
    #: An assistant turn's calls.
    tool_calls: Sequence[ToolCall] = ()
    #: A tool turn: the call it answers.
    tool_call_id: str = ""

    def text_bytes(self) -> int:
        """What the turn's text costs at least in prompt bytes (for the node's size check)."""
        return len(self.content.encode()) + sum(len(c.name.encode()) + len(c.arguments.encode())
                                                for c in self.tool_calls)


def render(tokenizer, turns: Sequence[ChatTurn], tools_json: str = "", template_kwargs_json: str = "") -> list[int]:
    """Token ids of the conversation followed by the assistant's generation prompt;
    INVALID_ARGUMENT naming the part of the conversation at fault."""
    chat = [_hf_message(turn, i) for i, turn in enumerate(turns)]
    tools = _tools(tools_json)
    extra = template_kwargs(template_kwargs_json)
    try:
        return list(tokenizer.apply_chat_template(chat, tools=tools, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False, **extra))
    except TemplateError as exc:  # the template's raise_exception(...): its refusal of this conversation
        raise InvalidArgument(f"messages: the model's chat template refuses this conversation: {exc}",
                              field="messages") from None


def _hf_message(turn: ChatTurn, index: int) -> dict:
    where = f"messages[{index}]"
    if turn.role not in ROLES:
        raise InvalidArgument(f"{where}.role must be one of {ROLES}, got {turn.role!r}", field=f"{where}.role")
    if turn.tool_calls and turn.role != "assistant":
        raise InvalidArgument(f"{where}.tool_calls: only assistant turns call tools", field=f"{where}.tool_calls")
    if (turn.role == "tool") != bool(turn.tool_call_id):
        raise InvalidArgument(f"{where}.tool_call_id: a tool turn names the call it answers, and only a tool turn "
                              "does", field=f"{where}.tool_call_id")
    message = {"role": turn.role, "content": turn.content}
    if turn.tool_calls:
        message["tool_calls"] = [{"type": "function", "id": call.id, "function": {
            "name": call.name, "arguments": _arguments(call.arguments, f"{where}.tool_calls[{k}].arguments")}}
            for k, call in enumerate(turn.tool_calls)]
    if turn.tool_call_id:
        message["tool_call_id"] = turn.tool_call_id
    return message


def _arguments(text: str, where: str) -> dict:
    try:
        arguments = json.loads(text)
    except (ValueError, RecursionError):
        arguments = None
    if not isinstance(arguments, dict):
        raise InvalidArgument(f"{where} must be JSON text of an object, got {text[:80]!r}", field=where)
    return arguments


#: What apply_chat_template or the renderer set: a caller's value would change how the prompt is
#: built (or tokenized), not just a switch the template reads.
_RESERVED = frozenset({"messages", "conversation", "tools", "documents", "add_generation_prompt", "tokenize",
                       "return_dict", "return_tensors", "padding", "truncation", "max_length", "chat_template",
                       "continue_final_message", "return_assistant_tokens_mask", "tokenizer_kwargs",
                       "bos_token", "eos_token", "pad_token", "unk_token", "raise_exception", "strftime_now"})
MAX_TEMPLATE_KWARGS = 16
_KWARG_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


def template_kwargs(text: str) -> dict:
    """The chat template's extra variables (ChatMessages.template_kwargs_json), checked."""
    field = "messages.template_kwargs_json"
    if not text:
        return {}
    try:
        kwargs = json.loads(text)
    except (ValueError, RecursionError):
        kwargs = None
    if not isinstance(kwargs, dict):
        raise InvalidArgument(f"{field} must be JSON text of an object", field=field)
    if len(kwargs) > MAX_TEMPLATE_KWARGS:
        raise InvalidArgument(f"{field}: at most {MAX_TEMPLATE_KWARGS} keys, got {len(kwargs)}", field=field)
    for name, value in kwargs.items():
        if not _KWARG_NAME.match(name) or name in _RESERVED:
            raise InvalidArgument(f"{field}: {name[:80]!r} is not a variable a request may set (a name of letters, "
                                  "digits and _, not one the renderer sets)", field=field)
        scalar = value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 256)
        if not scalar:
            raise InvalidArgument(f"{field}: {name} must be true, false, null, a number or a string of at most 256 "
                                  "characters", field=field)
    return kwargs


def _tools(tools_json: str) -> list[dict] | None:
    if not tools_json:
        return None
    try:
        tools = json.loads(tools_json)
    except (ValueError, RecursionError):
        tools = None
    if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
        raise InvalidArgument("messages.tools_json must be JSON text of a list of tool objects",
                              field="messages.tools_json")
    return tools
