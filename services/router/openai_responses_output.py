"""The Responses API's answer: the response object, its output items, and the stream events
that build them.

One ResponseOutput reads a generation's text as chat reads it (openai_tools.ChoiceCalls with
tools, plain text without), whether the text comes whole (an unstreamed answer) or in deltas,
so a streamed response ends as exactly the object an unstreamed one is: a `message` item whose
`output_text` is the text, if there is text or no call, then one `function_call` item per call
(text always comes before calls: tool_parsers.py). A generation cut short by the token limit
(or the full context) is `incomplete`, reason `max_output_tokens`, as OpenAI reports it.

Events are built here without their `sequence_number`; the SSE framing numbers them as it sends
them (openai_responses_stream.py), so an error event after them gets the next number.
"""

from __future__ import annotations

import copy
import uuid

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.router.openai_schema import FINISH
from services.router.openai_tools import ToolUse
from services.router.proxy import Completion


class ResponseOutput:
    """One response's output items, built from its text; each call returns the events it made."""

    def __init__(self, tool_use: ToolUse | None, tool_call_format: str = "") -> None:
        self.items: list[dict] = []
        #: "in_progress" until `finish`, then "completed" or "incomplete".
        self.status = "in_progress"
        self._calls = tool_use.stream(tool_call_format) if tool_use else None
        self._message: dict | None = None  # the message item while its text may still grow

    def feed(self, text: str) -> list[dict]:
        chat_deltas = self._calls.feed(text) if self._calls else [{"content": text}] if text else []
        return self._events(chat_deltas)

    def finish(self, finish_reason: str | None) -> list[dict]:
        """The last events: what the reading held back, and every open item done."""
        chat_deltas = []
        if self._calls:
            chat_deltas, finish_reason = self._calls.finish(finish_reason)
        self.status = "incomplete" if finish_reason == "length" else "completed"
        events = self._events(chat_deltas)
        if not self.items:  # nothing said and nothing called: still one (empty) message, as OpenAI answers
            events += self._text("")
        return events + self._close_message()

    def _events(self, chat_deltas: list[dict]) -> list[dict]:
        events = []
        for delta in chat_deltas:
            if "tool_calls" in delta:
                events += self._close_message() + self._function_call(delta["tool_calls"][0])
            else:
                events += self._text(delta["content"])
        return events

    def _text(self, text: str) -> list[dict]:
        events = []
        if self._message is None:
            self._message = {"type": "message", "id": f"msg_{uuid.uuid4().hex}", "role": "assistant",
                             "status": "in_progress", "content": []}
            self.items.append(self._message)
            events.append(self._event("response.output_item.added", item=copy.deepcopy(self._message)))
            self._message["content"].append(_output_text(""))
            events.append(self._event("response.content_part.added", self._message, content_index=0,
                                      part=_output_text("")))
        if text:
            self._message["content"][0]["text"] += text
            events.append(self._event("response.output_text.delta", self._message, content_index=0, delta=text,
                                      logprobs=[]))
        return events

    def _close_message(self) -> list[dict]:
        message, self._message = self._message, None
        if message is None:
            return []
        # the text is whole: the message is done, whether or not the response goes on to call tools
        message["status"] = "incomplete" if self.status == "incomplete" else "completed"
        part = message["content"][0]
        return [self._event("response.output_text.done", message, content_index=0, text=part["text"], logprobs=[]),
                self._event("response.content_part.done", message, content_index=0, part=dict(part)),
                self._event("response.output_item.done", item=copy.deepcopy(message))]

    def _function_call(self, call: dict) -> list[dict]:
        """One call of chat's ({id, type, function: {name, arguments}}), read whole: its item
        opens, takes all its arguments in one delta, and is done."""
        function = call["function"]
        item = {"type": "function_call", "id": f"fc_{uuid.uuid4().hex}", "call_id": call["id"],
                "name": function["name"], "arguments": function["arguments"], "status": "completed"}
        self.items.append(item)
        return [self._event("response.output_item.added", item={**item, "arguments": "", "status": "in_progress"}),
                self._event("response.function_call_arguments.delta", item, delta=item["arguments"]),
                self._event("response.function_call_arguments.done", item, arguments=item["arguments"]),
                self._event("response.output_item.done", item=dict(item))]

    def _event(self, kind: str, of: dict | None = None, **fields) -> dict:
        """An event about the last item (`of` names it by item_id where the event does)."""
        where = {"item_id": of["id"]} if of is not None else {}
        return {"type": kind, **where, "output_index": len(self.items) - 1, **fields}


def _output_text(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def usage(value: gen.Usage) -> dict:
    return {"input_tokens": value.prompt_tokens,
            # cached: the prompt tokens the node read from its prefix cache (the caller's own earlier
            # requests); cache writes are OpenAI's explicit caching (prompt_cache_options), never made here
            "input_tokens_details": {"cached_tokens": value.cached_prompt_tokens, "cache_write_tokens": 0},
            "output_tokens": value.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": value.total_tokens}


def response_body(response_id: str, created: int, model: str, settings: dict, status: str = "in_progress",
                  output: list[dict] | None = None, usage_: dict | None = None) -> dict:
    """A response object; `settings` are the request's, repeated (openai_responses._settings)."""
    return {"id": f"resp_{response_id}", "object": "response", "created_at": created, "status": status,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "model": model, "output": output or [], "usage": usage_, **settings}


def response_object(done: list[Completion], response_id: str, created: int, options) -> dict:
    """The unstreamed answer (`options`: openai_responses.ResponseOptions; one choice)."""
    choice = done[0]
    output = ResponseOutput(options.tool_use, choice.tool_call_format)
    output.feed(choice.text)
    output.finish(FINISH.get(choice.finish_reason))
    return response_body(response_id, created, choice.target.model, options.settings, output.status, output.items,
                         usage(choice.usage))
