"""multipart/form-data bodies (RFC 7578), as the OpenAI SDK sends a file upload.

The body arrives whole (the HTTP layer bounds it by --max-upload-mb before it gets here) and
is parsed by the standard library's `email` parser, which knows what clients really send
(quoted boundaries, a preamble, RFC 2231 and UTF-8 file names) and hands back each part's
bytes exactly as sent (CRLF inside a file stays CRLF). No new dependency for one form.
Parsing is blocking and linear in the body's size: callers run it off the event loop.

A malformed form is a 400 naming `body`, never a guess: no boundary, a body that is not
closed by its final boundary (a truncated upload), a field given twice, a text field that is
not UTF-8.
"""

from __future__ import annotations

import dataclasses
import email.parser
import email.policy
import email.utils
from email.message import Message

from services.common.errors import InvalidArgument

#: Defects that mean the body is not the form it claims to be (a truncated upload, most often).
FATAL_DEFECTS = ("StartBoundaryNotFoundDefect", "CloseBoundaryNotFoundDefect", "NoBoundaryInMultipartDefect",
                 "MultipartInvariantViolationDefect")


@dataclasses.dataclass(frozen=True)
class FormFile:
    filename: str
    content: bytes


@dataclasses.dataclass(frozen=True)
class Form:
    fields: dict[str, str]  # plain fields, UTF-8 text
    files: dict[str, FormFile]  # parts sent with a filename


def _bad(message: str) -> InvalidArgument:
    return InvalidArgument(message, reason="BAD_MULTIPART", field="body")


def parse_form(content_type: str, body: bytes) -> Form:
    """The fields and files of a multipart/form-data `body` sent with `content_type`."""
    if content_type.split(";")[0].strip().lower() != "multipart/form-data":
        raise _bad(f"expected a multipart/form-data body (a file upload), got Content-Type "
                   f"{content_type[:100] or 'none'!r}")
    if "\r" in content_type or "\n" in content_type:  # it becomes a header line of the parsed message
        raise _bad("the Content-Type header holds a line break")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode("latin-1", "replace") + body)
    if not message.get_boundary():
        raise _bad("the multipart/form-data Content-Type has no boundary parameter")
    defects = [type(defect).__name__ for defect in message.defects]
    if any(name in FATAL_DEFECTS for name in defects) or not message.is_multipart():
        raise _bad("the multipart body does not match its boundary or is not closed by it (was the upload cut "
                   "short?)")
    fields: dict[str, str] = {}
    files: dict[str, FormFile] = {}
    for part in message.iter_parts():
        name = _part_name(part)
        if name in fields or name in files:
            raise _bad(f"form field {name[:80]!r} is given twice")
        content = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is not None:
            files[name] = FormFile(filename, content)
            continue
        try:
            fields[name] = content.decode("utf-8")
        except UnicodeDecodeError:
            raise _bad(f"form field {name[:80]!r} is not UTF-8 text") from None
    return Form(fields, files)


def _part_name(part: Message) -> str:
    if part.get_content_disposition() != "form-data":
        raise _bad("every part of a multipart/form-data body needs a 'Content-Disposition: form-data' header")
    name = part.get_param("name", header="content-disposition")
    if name is None:
        raise _bad("a form part has no name (Content-Disposition: form-data; name=\"...\")")
    return email.utils.collapse_rfc2231_value(name)
