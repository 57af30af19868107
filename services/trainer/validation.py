"""JSONL datasets checked line by line before anything is stored.

Every line is read as UTF-8 JSON, checked against the dataset's format (given, or detected
from the first line that parses) and tokenized with the base model's tokenizer to compare its
length with max_seq_len (a line far too long to fit is refused before it is tokenized; a
UTF-16 or UTF-32 file is refused as a whole, saying so; a UTF-8 BOM is fine). Blank lines
are skipped (line numbers still count them). Validation does not stop at the first bad line:
the caller learns how many lines are bad and which ones (the first MAX_REPORTED, with
reasons) so one upload round trip fixes most files.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from services.common.errors import InvalidArgument
from services.trainer.examples import CHAT, BadExample, check_example, detect_format, encode, text_chars

AUTO = "auto"
MAX_REPORTED = 10
#: Normalizers may shorten text before it is split into tokens (NFKC composes characters): a
#: margin, so that the length guard (`max_text_chars`) never refuses a line that could fit.
NORMALIZATION_MARGIN = 4
#: Byte order marks of UTF-16 (either order) and UTF-32 (UTF-32LE's starts with UTF-16LE's):
#: what Windows PowerShell's `>` and Notepad's "Unicode" write instead of UTF-8.
WIDE_BOMS = (b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")


@dataclasses.dataclass(frozen=True)
class DatasetSummary:
    format: str
    num_examples: int
    longest_example: int  # tokens


def iter_json_lines(path: Path) -> Iterator[tuple[int, Any | BadExample]]:
    """(line number, parsed JSON or the reason it is not JSON) for every non-blank line."""
    with open(path, "rb") as source:
        yield from parse_json_lines(source)


def parse_json_lines(raw_lines: Iterable[bytes]) -> Iterator[tuple[int, Any | BadExample]]:
    """iter_json_lines over lines already read (split after each b"\\n", as a binary file
    iterates): the router checks an OpenAI file upload with it before passing it on."""
    for number, raw in enumerate(raw_lines, start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            yield number, BadExample(f"not UTF-8 (invalid byte at column {exc.start + 1})")
            continue
        text = text.rstrip("\r\n")
        if number == 1:
            text = text.removeprefix("\ufeff")
        if not text.strip():
            continue
        # The parser gives up on nesting deeper than the interpreter's recursion limit and on
        # integers of more than 4300 digits (CPython's int conversion limit) with errors that
        # are not JSONDecodeError: they are this line's fault, so they name it like any other.
        try:
            parsed: Any = json.loads(text)
        except json.JSONDecodeError as exc:
            parsed = BadExample(f"not valid JSON ({exc.msg} at column {exc.pos + 1})")
        except RecursionError:
            parsed = BadExample("not valid JSON (nested too deeply)")
        except ValueError as exc:
            parsed = BadExample(f"not valid JSON ({str(exc).split(':')[0]})")
        yield number, parsed


def _refusal(errors: list[tuple[int, str]], total_bad: int) -> InvalidArgument:
    shown = "; ".join(f"line {number}: {why}" for number, why in errors)
    more = f"; and {total_bad - len(errors)} more" if total_bad > len(errors) else ""
    noun = "line" if total_bad == 1 else "lines"
    return InvalidArgument(f"dataset has {total_bad} invalid {noun}: {shown}{more}", reason="INVALID_DATASET_LINES",
                           field="chunk", lines=",".join(str(number) for number, _ in errors),
                           invalid_lines=total_bad)


def _refuse_wide_encodings(path: Path) -> None:
    """Read line by line, such a file was refused with its first line "not UTF-8" and every
    other one "not valid JSON" (its NULs decode as UTF-8), though each looks right in an editor."""
    with open(path, "rb") as source:
        head = source.read(4)
    if head.startswith(WIDE_BOMS):
        raise InvalidArgument("the dataset is UTF-16 or UTF-32 text (it starts with that byte order mark); JSONL "
                              "must be UTF-8: save it as UTF-8 (PowerShell: Out-File -Encoding utf8)",
                              reason="NOT_UTF8", field="chunk")


def max_text_chars(tokenizer, max_seq_len: int) -> int:
    """Characters of text that surely make more than `max_seq_len` tokens, so a line with more is
    refused without tokenizing it: tokenizing takes ~140 bytes of memory per character (a 20 MB
    line: about 3 GB, 18 s), so one line of a few hundred MB, within --max-dataset-mb, could exhaust
    the trainer's memory and end every job on it. Sound for the Llama family's tokenizers
    (byte-level BPE, SentencePiece with byte fallback): every character lies in one token, and
    no token spells more characters than its vocabulary string has."""
    longest_token = max(map(len, tokenizer.get_vocab()), default=1)
    return max_seq_len * longest_token * NORMALIZATION_MARGIN


def validate_jsonl(path: Path, fmt: str, tokenizer, max_seq_len: int) -> DatasetSummary:
    """Checks every line; InvalidArgument naming the bad lines, or the dataset's summary."""
    _refuse_wide_encodings(path)
    char_limit = max_text_chars(tokenizer, max_seq_len)
    errors: list[tuple[int, str]] = []
    total_bad = count = longest = 0
    template_checked = False

    def bad(number: int, why: str) -> None:
        nonlocal total_bad
        total_bad += 1
        if len(errors) < MAX_REPORTED:
            errors.append((number, why))

    for number, parsed in iter_json_lines(path):
        if isinstance(parsed, BadExample):
            bad(number, str(parsed))
            continue
        try:
            if fmt == AUTO:
                fmt = detect_format(parsed)
            if fmt == CHAT and not template_checked:
                if not getattr(tokenizer, "chat_template", None):
                    raise InvalidArgument("the base model's tokenizer has no chat template, so chat examples "
                                          "cannot be rendered; upload prompt/completion examples instead",
                                          reason="NO_CHAT_TEMPLATE", field="header.format")
                template_checked = True
            example = check_example(parsed, fmt)
            if (chars := text_chars(example)) > char_limit:
                bad(number, f"too long: {chars} characters of text, far more than max_seq_len {max_seq_len} tokens "
                            "can hold")
                continue
            encoded = encode(tokenizer, fmt, example)
        except BadExample as exc:
            bad(number, str(exc))
            continue
        length = len(encoded.input_ids)
        if length > max_seq_len:
            bad(number, f"too long: {length} tokens, above max_seq_len {max_seq_len}")
            continue
        count += 1
        longest = max(longest, length)
    if total_bad:
        raise _refusal(errors, total_bad)
    if count == 0:
        raise InvalidArgument("dataset has no examples (every line is blank)", reason="EMPTY_DATASET", field="chunk")
    return DatasetSummary(fmt, count, longest)


def read_examples(path: Path, fmt: str) -> list[dict[str, Any]]:
    """The examples of an already validated dataset, in file order."""
    examples = []
    for number, parsed in iter_json_lines(path):
        if isinstance(parsed, BadExample):
            raise BadExample(f"line {number}: {parsed}")
        examples.append(check_example(parsed, fmt))
    return examples
