"""Dataset examples: one JSONL line -> a checked example -> token ids and loss labels.

The same code serves dataset validation (is the line well-formed, how many tokens) and the
training worker (inputs and labels), so what was validated is exactly what is trained.

- chat: `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}]}`, rendered
  with the base tokenizer's chat template; loss on what the model generates for each assistant
  turn and its end-of-turn token (chat_masks.py). An assistant message may carry `"weight": 0`
  or `1` (OpenAI's fine-tuning format): 0 keeps it as context without learning it. Any other
  key that holds something is refused, naming it: dropping a participant `name` or the
  `tool_calls` of a turn would train on a conversation other than the one written (the
  Router refuses the same keys at inference; null and empty values count as absent).
- prompt_completion: `{"prompt": "...", "completion": "..."}`: prompt tokens (with the
  tokenizer's special tokens, e.g. BOS) + completion tokens + EOS; loss on completion + EOS, so
  the adapter learns where to stop.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jinja2 import TemplateError

from services.trainer.chat_masks import assistant_mask

CHAT, PROMPT_COMPLETION = "chat", "prompt_completion"
FORMATS = (CHAT, PROMPT_COMPLETION)
ROLES = ("system", "user", "assistant")
IGNORE_INDEX = -100


class BadExample(ValueError):
    """A line that cannot be trained on; the message says why, for a person."""


@dataclasses.dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken

    @property
    def num_label_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def detect_format(obj: Any) -> str:
    if isinstance(obj, dict) and "messages" in obj:
        return CHAT
    if isinstance(obj, dict) and ("prompt" in obj or "completion" in obj):
        return PROMPT_COMPLETION
    raise BadExample('expected an object with "messages" (chat) or "prompt" and "completion"')


def _brief(value: Any) -> str:
    """A caller's value, short: reasons travel in gRPC trailers, which a client refuses beyond a
    few KiB (a content swapped into "role" on ten lines would hide every reason), and the repr
    of a deeply nested list could exceed the recursion limit."""
    if isinstance(value, list | dict):
        return f"a JSON {'array' if isinstance(value, list) else 'object'}"
    shown = repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _text(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise BadExample(f"{where} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise BadExample(f"{where} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # JSON may spell a lone surrogate ("\ud800"), which is no character: the tokenizer
        # refuses such a string with a TypeError, so it is refused here, naming the line.
        raise BadExample(f"{where} holds an unpaired surrogate ({exc.object[exc.start]!r}) at character "
                         f"{exc.start + 1}, which is not text") from None
    return value


def _extras(message: dict, role: str, i: int) -> dict[str, int]:
    """{"weight": 0} for an assistant message not to learn, else {}; BadExample for any other key."""
    for key, value in message.items():
        if key not in ("role", "content", "weight") and value not in (None, "", [], {}):
            raise BadExample(f"messages[{i}] has {_brief(key)}, which training would drop (only role, content "
                             "and an assistant's weight are read); remove it")
    weight = message.get("weight")
    if weight is None:
        return {}
    if role != "assistant":
        raise BadExample(f"messages[{i}].weight is only for assistant messages (this one is {role})")
    if isinstance(weight, bool) or weight not in (0, 1):
        raise BadExample(f"messages[{i}].weight must be 0 (keep as context, do not learn) or 1, got {_brief(weight)}")
    return {"weight": 0} if weight == 0 else {}


def check_example(obj: Any, fmt: str) -> dict[str, Any]:
    """The example in canonical form; BadExample when `obj` does not fit `fmt`."""
    if not isinstance(obj, dict):
        raise BadExample(f"expected a JSON object, got {type(obj).__name__}")
    if fmt == CHAT:
        messages = obj.get("messages")
        if "messages" not in obj:
            raise BadExample('missing "messages" (this dataset is in chat format)')
        if not isinstance(messages, list) or not messages:
            raise BadExample('"messages" must be a non-empty list')
        checked = []
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise BadExample(f"messages[{i}] must be an object")
            role = message.get("role")
            if role not in ROLES:
                raise BadExample(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {_brief(role)}")
            checked.append({"role": role, "content": _text(message.get("content"), f"messages[{i}].content"),
                            **_extras(message, role, i)})
        if not any(message["role"] == "assistant" for message in checked):
            raise BadExample("no assistant message: there is nothing to learn from")
        if all(message.get("weight") == 0 for message in checked if message["role"] == "assistant"):
            raise BadExample('every assistant message has "weight": 0: there is nothing to learn from')
        return {"messages": checked}
    if "prompt" not in obj or "completion" not in obj:
        raise BadExample('expected "prompt" and "completion" (this dataset is in prompt/completion format)')
    return {"prompt": _text(obj["prompt"], "prompt"), "completion": _text(obj["completion"], "completion")}


def text_chars(example: dict[str, Any]) -> int:
    """How many characters of the caller's text a checked example holds (templates add more)."""
    if "messages" in example:
        return sum(len(message["content"]) for message in example["messages"])
    return len(example["prompt"]) + len(example["completion"])


def encode_chat(tokenizer, messages: list[dict]) -> Encoded:
    try:
        return _encode_chat(tokenizer, messages)
    except TemplateError as exc:
        # Many chat templates refuse conversations themselves (`raise_exception`: roles must
        # alternate, a system message only first, ...): that is this example's fault, not the
        # trainer's, so it is a BadExample naming the line.
        raise BadExample(f"the base model's chat template refuses it: {str(exc)[:200]}") from None


def _encode_chat(tokenizer, messages: list[dict]) -> Encoded:
    skipped = {i for i, message in enumerate(messages) if message.get("weight") == 0}
    turns = [{"role": message["role"], "content": message["content"]} for message in messages]
    located = assistant_mask(tokenizer, turns, skipped)
    if located is None:
        raise BadExample('an assistant message has "weight": 0 but the chat template does not show its text as '
                         "written, so its tokens cannot be left out")
    ids, mask = located
    return Encoded(ids, [token if keep else IGNORE_INDEX for token, keep in zip(ids, mask)])


def encode_prompt_completion(tokenizer, prompt: str, completion: str) -> Encoded:
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    completion_ids = list(tokenizer(completion, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is not None:
        completion_ids.append(tokenizer.eos_token_id)
    return Encoded(prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids)


def encode(tokenizer, fmt: str, example: dict[str, Any]) -> Encoded:
    """Token ids and labels of a checked example (see check_example)."""
    if fmt == CHAT:
        encoded = encode_chat(tokenizer, example["messages"])
    else:
        encoded = encode_prompt_completion(tokenizer, example["prompt"], example["completion"])
    if encoded.num_label_tokens == 0:
        raise BadExample("the chat template left no assistant tokens to learn from")
    return encoded
