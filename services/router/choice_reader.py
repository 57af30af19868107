"""One choice's generated text read into what the OpenAI APIs answer: the model's thinking
(`reasoning_content`), its answer (`content`) and its tool calls, in that order.

The text is read in two layers, each streamed, so a streamed answer and an unstreamed one agree
by construction (the unstreamed one is the text fed whole): first the thinking is split off
(reasoning_text.py, when the node says its model thinks: GenerationDelta.reasoning_start),
then the rest is the answer, read for tool calls when the request has tools (openai_tools.py).
Under a grammar (a JSON response_format, or tool calls the grammar guarantees) the text is all
answer: the grammar shapes it from the first token, so there is no thinking to split.

Chat's streamed deltas come out ({"reasoning_content"}, {"content"}, {"tool_calls"}); the
Responses API builds its items from the same deltas (openai_responses_output.py).
"""

from __future__ import annotations

from services.router.openai_tools import ChoiceCalls, ToolUse
from services.common.reasoning_text import STARTS, ReasoningSplitter


class ChoiceReader:
    def __init__(self, tool_use: ToolUse | None, tool_call_format: str = "", reasoning_start: str = "",
                 constrained: bool = False) -> None:
        self._calls: ChoiceCalls | None = tool_use.stream(tool_call_format) if tool_use else None
        thinks = reasoning_start in STARTS and not constrained
        self._thinking = ReasoningSplitter(reasoning_start) if thinks else None

    @property
    def thought(self) -> bool:
        """The text had a thinking block (perhaps empty): its answer has reasoning_content."""
        return self._thinking is not None and self._thinking.thought

    def feed(self, text: str) -> list[dict]:
        """Chat deltas for the text that came."""
        if self._thinking is None:
            return self._answer(text)
        reasoning, answer = self._thinking.feed(text)
        return ([{"reasoning_content": reasoning}] if reasoning else []) + self._answer(answer)

    def finish(self, finish_reason: str | None) -> tuple[list[dict], str | None]:
        """The last deltas, and the choice's finish_reason (tool_calls when it called)."""
        deltas = []
        if self._thinking is not None:
            reasoning, answer = self._thinking.finish()
            deltas = ([{"reasoning_content": reasoning}] if reasoning else []) + self._answer(answer)
        if self._calls is not None:
            last, finish_reason = self._calls.finish(finish_reason)
            deltas += last
        return deltas, finish_reason

    def _answer(self, text: str) -> list[dict]:
        if self._calls is not None:
            return self._calls.feed(text)
        return [{"content": text}] if text else []

    def answer(self, text: str, finish_reason: str | None) -> tuple[dict, str | None]:
        """The whole text's assistant message fields (content, tool_calls, reasoning_content),
        and its finish_reason: what its stream gives, added up."""
        deltas = self.feed(text)
        more, finish_reason = self.finish(finish_reason)
        deltas += more
        content = "".join(delta.get("content", "") for delta in deltas)
        tool_calls = [{key: value for key, value in delta["tool_calls"][0].items() if key != "index"}
                      for delta in deltas if "tool_calls" in delta]
        message = {"content": content or None, "tool_calls": tool_calls} if tool_calls else {"content": content}
        if self.thought:
            message["reasoning_content"] = "".join(delta.get("reasoning_content", "") for delta in deltas)
        return message, finish_reason
