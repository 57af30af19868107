"""The README's code blocks, each with how the tests exercise it.

A bash or python block must be preceded by `<!-- readme-test: run -->` (executed against a
live demo stack) or `<!-- readme-test: static (why) -->` (each command checked without running
it: Docker, GPUs or real checkpoints do not exist on the test machines). Other blocks
(diagrams, sample output) are prose.
"""

from __future__ import annotations

import dataclasses
import re
import shlex
from pathlib import Path

MARKER = re.compile(r"<!-- readme-test: (run|static)(?: \((.+)\))? -->")
FENCE = re.compile(r"^```(\w*)\s*$")
CODE_LANGUAGES = ("bash", "python")


@dataclasses.dataclass(frozen=True)
class Block:
    language: str
    mode: str  # "run", "static" or "" (no marker)
    reason: str
    text: str
    line: int  # 1-based line of the opening fence

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.language or 'text'} block)"


def blocks(readme: Path) -> list[Block]:
    found, lines, marker, index = [], readme.read_text().splitlines(), None, 0
    while index < len(lines):
        line = lines[index]
        if match := MARKER.fullmatch(line.strip()):
            marker = match
        elif fence := FENCE.match(line):
            end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
            mode, reason = (marker.group(1), marker.group(2) or "") if marker else ("", "")
            found.append(Block(fence.group(1), mode, reason, "\n".join(lines[index + 1:end]) + "\n", index + 1))
            marker, index = None, end
        elif line.strip():
            marker = None  # a marker applies to the block right below it only
        index += 1
    return found


def commands(block: Block) -> list[list[str]]:
    """A bash block's commands as argument lists (continuations joined, comments dropped; a
    quoted argument may span lines, as a grpcurl -d JSON body does)."""
    found, pending = [], ""
    for line in block.text.replace("\\\n", " ").splitlines():
        pending = f"{pending}\n{line}" if pending else line
        try:
            tokens = shlex.split(pending, comments=True)
        except ValueError:  # a quote still open: the command goes on on the next line
            continue
        pending = ""
        if tokens:
            found.append(tokens)
    assert not pending, f"{block}: unclosed quote in {pending!r}"
    return found


def split_assignments(tokens: list[str]) -> tuple[dict[str, str], list[str]]:
    """Leading `NAME=value` words (as in `COMPOSE_PROFILES=cpu docker compose up`) and the rest."""
    env = {}
    while tokens and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", tokens[0]):
        name, value = tokens[0].split("=", 1)
        env[name] = value
        tokens = tokens[1:]
    return env, tokens
