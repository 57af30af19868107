"""The Responses API's answer: the response object, its output items, and the stream events
that build them.

One ResponseOutput reads a generation's text as chat reads it (choice_reader.ChoiceReader:
thinking, answer, tool calls), whether the text comes whole (an unstreamed answer) or in deltas,
so a streamed response ends as exactly the object an unstreamed one is: a `reasoning` item whose
`reasoning_text` is the model's thinking, if it thought; a `message` item whose `output_text`
is the answer, if there is one or no call; then one `function_call` item per call (thinking
comes first and text before calls: reasoning_text.py, tool_parsers.py). A generation cut short
by the token limit (or the full context) is `incomplete`, reason `max_output_tokens`, as OpenAI
reports it.

Events are built here without their `sequence_number`; the SSE framing numbers them as it sends
them (openai_responses_stream.py), so an error event after them gets the next number.
"""

from __future__ import annotations

import copy
import uuid

from services.common.pb.loraplex.common.v1 import generation_pb2 as gen
from services.router.choice_reader import ChoiceReader
from services.router.openai_schema import FINISH, chat_logprobs
from services.router.openai_tools import ToolUse
from services.router.proxy import Completion

#: The item each kind of text goes into: its item type, id prefix and content part type.
TEXT_ITEMS = {"reasoning_content": ("reasoning", "rs", "reasoning_text"), "content": ("message", "msg", "output_text")}


class ResponseOutput:
    """One response's output items, built from its text; each call returns the events it made."""

    def __init__(self, tool_use: ToolUse | None, tool_call_format: str = "", reasoning_start: str = "",
                 constrained: bool = False) -> None:
        self.items: list[dict] = []
        #: "in_progress" until `finish`, then "completed" or "incomplete".
        self.status = "in_progress"
        self._reader = ChoiceReader(tool_use, tool_call_format, reasoning_start, constrained)
        self._open: dict | None = None  # the reasoning or message item while its text may still grow
        #: Logprobs of tokens not yet given out with answer text (thinking, markup held back): as in
        #: chat, every generated token has one, and they ride on the next answer text.
        self._logprobs: list[dict] = []

    def feed(self, text: str, logprobs: list[dict] = ()) -> list[dict]:
        """Events for the text that came; `logprobs`: its tokens' (chat's entries), when asked for."""
        self._logprobs += logprobs
        return self._events(self._reader.feed(text))

    def finish(self, finish_reason: str | None) -> list[dict]:
        """The last events: what the reading held back, and every open item done."""
        chat_deltas, finish_reason = self._reader.finish(finish_reason)
        self.status = "incomplete" if finish_reason == "length" else "completed"
        events = self._events(chat_deltas)
        if not any(item["type"] != "reasoning" for item in self.items):
            events += self._text("content", "")  # nothing said, nothing called: one empty message, as OpenAI's
        message = next((item for item in self.items if item["type"] == "message"), None)
        if message is not None:  # tokens after the last answer text: on the part, so it has them all
            message["content"][0]["logprobs"] += self._logprobs
            self._logprobs = []
        return events + self._close()

    def _events(self, chat_deltas: list[dict]) -> list[dict]:
        events = []
        for delta in chat_deltas:
            if "tool_calls" in delta:
                events += self._close() + self._function_call(delta["tool_calls"][0])
            else:
                (kind, text), = delta.items()
                events += self._text(kind, text)
        return events

    def _text(self, kind: str, text: str) -> list[dict]:
        """Text for the open item of its kind (reasoning or message), opening one if needed."""
        item_type, prefix, part_type = TEXT_ITEMS[kind]
        events = []
        if self._open is not None and self._open["type"] != item_type:
            events += self._close()  # the thinking ended: the answer begins
        if self._open is None:
            self._open = {"type": item_type, "id": f"{prefix}_{uuid.uuid4().hex}", "status": "in_progress"}
            self._open.update({"summary": [], "content": []} if item_type == "reasoning" else
                              {"role": "assistant", "content": []})
            self.items.append(self._open)
            events.append(self._event("response.output_item.added", item=copy.deepcopy(self._open)))
            self._open["content"].append(_part(part_type, ""))
            events.append(self._event("response.content_part.added", self._open, content_index=0,
                                      part=_part(part_type, "")))
        if text:
            self._open["content"][0]["text"] += text
            logprobs = {}
            if part_type == "output_text":
                logprobs, self._logprobs = {"logprobs": self._logprobs}, []
                self._open["content"][0]["logprobs"] += logprobs["logprobs"]
            events.append(self._event(f"response.{part_type}.delta", self._open, content_index=0, delta=text,
                                      **logprobs))
        return events

    def _close(self) -> list[dict]:
        item, self._open = self._open, None
        if item is None:
            return []
        # its text is whole: the item is done, whether or not the response goes on
        item["status"] = "incomplete" if self.status == "incomplete" else "completed"
        part = item["content"][0]
        done = {"logprobs": part["logprobs"]} if part["type"] == "output_text" else {}
        return [self._event(f"response.{part['type']}.done", item, content_index=0, text=part["text"], **done),
                self._event("response.content_part.done", item, content_index=0, part=dict(part)),
                self._event("response.output_item.done", item=copy.deepcopy(item))]

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


def _part(part_type: str, text: str) -> dict:
    if part_type == "reasoning_text":
        return {"type": part_type, "text": text}
    return {"type": part_type, "text": text, "annotations": [], "logprobs": []}




def logprob_entries(entries) -> list[dict]:
    """The node's token logprobs as the Responses API has them (chat's entries)."""
    return chat_logprobs(entries)["content"]


def usage(value: gen.Usage) -> dict:
    return {"input_tokens": value.prompt_tokens,
            # cached: the prompt tokens the node read from its prefix cache (the caller's own earlier
            # requests); cache writes are OpenAI's explicit caching (prompt_cache_options), never made here
            "input_tokens_details": {"cached_tokens": value.cached_prompt_tokens, "cache_write_tokens": 0},
            "output_tokens": value.completion_tokens, "output_tokens_details": {"reasoning_tokens": value.reasoning_tokens},
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
    output = ResponseOutput(options.tool_use, choice.tool_call_format, choice.reasoning_start, options.constrained)
    output.feed(choice.text, logprob_entries(choice.logprobs) if options.logprobs else [])
    output.finish(FINISH.get(choice.finish_reason))
    return response_body(response_id, created, choice.target.model, options.settings, output.status, output.items,
                         usage(choice.usage))
