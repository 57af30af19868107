"""A reasoning model's thinking split from its answer (vLLM's reasoning parsers, DeepSeek's API).

Pure: no grpc, no HTTP. Models of the Qwen3 and DeepSeek-R1 families think first, between
`<think>` and `</think>`, then answer. Clients of those APIs read the thinking as
`reasoning_content` and the answer as `content`, so the thinking never shows up as the answer
(nor is read for tool calls). The inference node says where generation starts
(GenerationDelta.reasoning_start): "open" when the rendered prompt already opened the block (the
R1 templates end the prompt with `<think>\n`), "closed" when the template shows a `<think>`
block the model opens itself (Qwen3), "" for a model that does not reason that way.

`ReasoningSplitter` reads one choice's text as it streams; read whole, it is the same reader fed
everything at once, so streamed and unstreamed answers agree by construction:
- "closed": leading whitespace, then `<think>`, opens the block; any other first text means no
  thinking: all of it is content.
- Inside the block, everything up to `</think>` is reasoning; the whitespace right after the
  closing tag is dropped (templates put a blank line there); the rest is content.
- Text that could be the start of a tag is held until it cannot be, so tags never leak.
- A text that ends inside the block is all reasoning, with no content (the model was cut off
  by max_tokens while thinking), as vLLM and DeepSeek answer it.
"""

from __future__ import annotations

OPEN, CLOSE = "<think>", "</think>"
#: GenerationDelta.reasoning_start values.
STARTS = ("open", "closed")


class ReasoningSplitter:
    def __init__(self, start: str) -> None:
        assert start in STARTS, start
        self.state = "reasoning" if start == "open" else "lead"  # lead -> reasoning -> after -> content
        self.held = ""
        self.thought = start == "open"  # the text has a thinking block (perhaps an empty one)

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) to give out now."""
        self.held += text
        reasoning: list[str] = []
        content: list[str] = []
        while self._step(reasoning, content, final=False):
            pass
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """What is left at the end of the text."""
        reasoning: list[str] = []
        content: list[str] = []
        while self._step(reasoning, content, final=True):
            pass
        (reasoning if self.state == "reasoning" else content).append(self.held)
        self.held = ""
        return "".join(reasoning), "".join(content)

    def _step(self, reasoning: list[str], content: list[str], final: bool) -> bool:
        """Moves on as far as the text held allows; True when it changed state (step again)."""
        if self.state == "content":
            content.append(self.held)
            self.held = ""
        elif self.state == "lead":
            rest = self.held.lstrip()
            if rest.startswith(OPEN):
                self.held, self.state, self.thought = rest[len(OPEN):], "reasoning", True
                return True
            if final or not OPEN.startswith(rest):  # no thinking: the whole text is the answer
                self.state = "content"
                return True
        elif self.state == "reasoning":
            found = self.held.find(CLOSE)
            if found >= 0:
                reasoning.append(self.held[:found])
                self.held, self.state = self.held[found + len(CLOSE):], "after"
                return True
            keep = _partial_tag(self.held, CLOSE)
            reasoning.append(self.held[:len(self.held) - keep])
            self.held = self.held[len(self.held) - keep:]
        elif self.state == "after":
            rest = self.held.lstrip()
            if rest or final:
                self.held, self.state = rest, "content"
                return True
            self.held = ""
        return False


def _partial_tag(text: str, tag: str) -> int:
    """How many characters at the end of `text` could begin `tag`."""
    return next((k for k in range(min(len(tag) - 1, len(text)), 0, -1) if text.endswith(tag[:k])), 0)


def split_reasoning(start: str, text: str) -> tuple[str | None, str]:
    """A whole text's (reasoning, content); reasoning None when the model did not think."""
    splitter = ReasoningSplitter(start)
    reasoning, content = splitter.feed(text)
    more_reasoning, more_content = splitter.finish()
    return (reasoning + more_reasoning) if splitter.thought else None, content + more_content


class ReasoningTokens:
    """How many of a generation's tokens are thinking (usage's reasoning_tokens), counted where
    the tokens are (the node) with the splitter the Router reads the text with. Fed each delta's
    text and token count: a delta that ends the thinking counts whole (its closing tag is
    thinking; an answer token sharing the delta is the rare overcount); a text that turns out
    not to think counts none."""

    def __init__(self, start: str) -> None:
        self._splitter = ReasoningSplitter(start)
        self._thinking = True
        self.count = 0

    def feed(self, text: str, num_tokens: int) -> None:
        if not self._thinking:
            return
        _, answer = self._splitter.feed(text)
        self.count += num_tokens
        if answer or self._splitter.state in ("after", "content"):
            self._thinking = False
            if not self._splitter.thought:
                self.count = 0
