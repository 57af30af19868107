"""The Responses API streamed (`stream: true`): its events, and how they go on the wire.

Events, in order: response.created and response.in_progress (the response, no output yet);
for a model's thinking, output_item.added, content_part.added, reasoning_text.delta as it comes,
reasoning_text.done, content_part.done, output_item.done (a `reasoning` item); for the message, output_item.added, content_part.added, output_text.delta as text comes,
output_text.done, content_part.done, output_item.done; for each function call,
output_item.added, function_call_arguments.delta (the arguments whole: calls are read whole),
function_call_arguments.done, output_item.done; last, response.completed or
response.incomplete with the whole response, usage included. The first token exists before the
first event (RouterCore.open), so a failure before it is the HTTP status; one after it is an
`error` event, and the stream ends there.
"""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator

from services.router.openai_choices import Streams
from services.router.openai_responses_output import ResponseOutput, logprob_entries, response_body, usage
from services.router.openai_schema import FINISH


async def response_events(streams: Streams, response_id: str, created: int, options) -> AsyncIterator[dict]:
    """`options`: openai_responses.ResponseOptions (one choice: the Responses API has no `n`)."""
    body = functools.partial(response_body, response_id, created, streams.target.model, options.settings)
    yield {"type": "response.created", "response": body()}
    yield {"type": "response.in_progress", "response": body()}
    output = None
    async for _, delta in streams.deltas():
        if output is None:  # the first delta says how the node's model writes tool calls, and thinks
            output = ResponseOutput(options.tool_use, delta.tool_call_format, delta.reasoning_start,
                                    options.constrained)
        logprobs = logprob_entries(delta.logprobs) if options.logprobs and delta.logprobs else []
        for event in output.feed(delta.text, logprobs):
            yield event
        if delta.finish_reason:
            for event in output.finish(FINISH.get(delta.finish_reason)):
                yield event
    yield {"type": f"response.{output.status}", "response": body(output.status, output.items, usage(streams.usage()))}


class ResponseFrames:
    """The Responses API's SSE framing (one per response): `event: <type>` before each `data:`
    line, as OpenAI sends them; each event numbered by `sequence_number` from 0 in the order
    sent; no [DONE] at the end; a failure as an `error` event carrying the code, message and
    param the HTTP status answer would have had."""

    def __init__(self) -> None:
        self.sent = 0

    def event(self, payload: dict) -> str:
        payload = {**payload, "sequence_number": self.sent}
        self.sent += 1
        return f"event: {payload['type']}\ndata: {json.dumps(payload, separators=(',', ':'))}\n\n"

    def end(self) -> str:
        return ""

    def error(self, body: dict) -> str:
        """`body`: the OpenAI error body, {"error": {message, type, param, code}}."""
        error = body["error"]
        return self.event({"type": "error", "code": error["code"], "message": error["message"],
                           "param": error["param"]})
